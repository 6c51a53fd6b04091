"""The first GPU run's one command, `SMOKE=1 bash scripts/gpu_first_run.sh`, on CPU: every stage runs jsft's code
of today (the probe with auto's own probing, the attention timing, benchmarks/gpu.py on the trainer's step), writes
its JSON, and the summary reads it back; all without grain or datasets, which the GPU machine does not have."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_first_run_writes_every_stage_s_json_without_grain_or_datasets(tmp_path):
    blocker = tmp_path / "no_grain"
    for module in ("grain", "datasets"):  # importing either fails, as on the GPU machine
        (blocker / module).mkdir(parents=True)
        (blocker / module / "__init__.py").write_text(f"raise ImportError('the GPU machine has no {module}')\n")
    env = dict(os.environ, SMOKE="1", BUDGET="900", OUT=str(tmp_path / "out"), PY=sys.executable, JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{blocker}{os.pathsep}{ROOT}")
    blocked = subprocess.run([sys.executable, "-c", "import grain"], env=env, capture_output=True, text=True)
    assert "the GPU machine has no grain" in blocked.stderr
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_first_run.sh")], env=env, capture_output=True,
                          text=True, timeout=960)
    log = (tmp_path / "out" / "log.txt").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("probe", "attn_timing", "bench_smoke"):
        assert f"=== {stage}: rc=0 in " in log, log[-3000:]
    out = tmp_path / "out"
    probe = json.loads((out / "probe.json").read_text())
    assert probe["env"]["backend"] == "cpu" and probe["env"]["jax_packed_gqa_is_fixed"] in (True, False)
    assert probe["auto"]["8b_d128"]["impl"] == "xla" and probe["auto"]["1b_d64"]["describe"].startswith("xla (")
    checks = {c["name"]: c for c in probe["checks"]}
    assert checks["plain_cudnn_causal"]["status"] == "unsupported"
    assert checks["tokamax_interpret_gqa"]["status"] == "pass", checks["tokamax_interpret_gqa"]
    trainer = checks["trainer_step_tiny_mesh_auto"]
    assert trainer["status"] == "pass" and trainer["jit_cache_size"] == 1, trainer
    timing = {t["impl"]: t for t in json.loads((out / "attn_timing.json").read_text())["timing"]}
    assert set(timing) == {"xla", "tokamax"} and all(t["status"] == "ok" for t in timing.values()), timing
    (run,) = json.loads((out / "bench_smoke.json").read_text())["runs"]
    assert run["name"] == "smoke-lora" and run["status"] == "ok" and run["mfu"] > 0 and run["hfu"] > run["mfu"]
    summary = done.stdout[done.stdout.index("env: "):]
    assert "auto 8b_d128: xla" in summary and "check trainer_step_tiny_mesh_auto" in summary
    assert "bench_smoke      smoke-lora L=32" in summary and "=== total " in summary
