"""Two processes x 4 CPU devices (jax.distributed, gloo) train exactly like one process with 8 devices."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import portpicker
import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")
REPO = Path(__file__).resolve().parents[1]


def load_worker():
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_8_devices(tmp_path):
    port = portpicker.pick_unused_port()
    out = tmp_path / "results.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), "2", str(out)], env=env, cwd=REPO,
                              stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    try:
        single = load_worker().run()  # the same training in this process, 8 devices, meanwhile
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    tails = "\n".join((tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], tails
    multi = json.loads(out.read_text())

    assert multi.keys() == single.keys() == {"2x2x2", "1x8x1"}
    for mesh in multi:
        m, s = multi[mesh], single[mesh]
        assert (m["devices"], m["local_devices"], s["devices"], s["local_devices"]) == (8, 4, 8, 8)
        assert m["split"] == [0, 2] and s["split"] == [0, 1]  # process 0 loads the first half of each batch
        np.testing.assert_allclose(m["loss"], s["loss"], rtol=1e-5, err_msg=mesh)
        np.testing.assert_allclose(m["grad_norm"], s["grad_norm"], rtol=1e-5, err_msg=mesh)
        np.testing.assert_allclose(m["kernel_sum"], s["kernel_sum"], rtol=1e-5, atol=1e-6, err_msg=mesh)
        assert m["kernel_shard"] == s["kernel_shard"]
        assert s["loss"][2] < s["loss"][0] - 0.05
    assert multi["2x2x2"]["kernel_shard"] == [32, 64] and multi["1x8x1"]["kernel_shard"] == [8, 128]
