"""Resume is exact: a run killed with SIGKILL and resumed logs the same per-step losses as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jsft import fixtures, progress, train
from train_configs import tiny_config, write_config_file

TESTS = Path(__file__).parent
ROOT = TESTS.parent
STEPS = 40
RUN = dict(data={"packing": False, "padding_free": False}, training={"max_steps": STEPS},
           logging={"save_steps": 4, "save_total_limit": 2})


@pytest.fixture(scope="module")
def data_32(tmp_path_factory):
    """32 rows = 4 steps an epoch: 40 steps cross epochs, so the iterator state (shuffle epoch, position) matters."""
    path = tmp_path_factory.mktemp("ckpt_data") / "pc.jsonl"
    return fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 32, seed=9), path)


def _checkpoints(out):
    folder = out / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _env(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),  # the second process compiles nothing
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_sigkill_then_resume_logs_the_same_losses(tokenizer_dir, data_32, tmp_path):
    reference = tiny_config(tokenizer_dir, data_32, tmp_path / "reference", **RUN)
    train.run(reference)
    want = {r["step"]: r["loss"] for r in progress.read_metrics(tmp_path / "reference") if "loss" in r}
    assert sorted(want) == list(range(1, STEPS + 1))

    out = tmp_path / "killed"
    config_file = write_config_file(tmp_path / "killed.py", TESTS, tokenizer_dir, data_32, out, **RUN)
    command = [sys.executable, "-m", "jsft.train", "--config", str(config_file)]
    proc = subprocess.Popen(command, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not _checkpoints(out):  # kill as soon as the first checkpoint is complete
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in progress.read_metrics(out))
    assert killed_at < STEPS, "the run finished before it was killed: nothing was tested"

    resumed = subprocess.run(command + ["--resume"], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: checkpoint" in resumed.stdout
    got = {r["step"]: r["loss"] for r in progress.read_metrics(out) if "loss" in r}
    assert sorted(got) == list(range(1, STEPS + 1))  # no step lost, none logged twice
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-7), f"step {s}"


def test_resume_false_starts_fresh_and_true_needs_a_checkpoint(tokenizer_dir, data_32, tmp_path, capsys):
    """resume_from_checkpoint=False (a TRL config's default) over a run's checkpoints: a fresh run from step 1; the
    old checkpoints are moved to checkpoints.previous, not deleted (one set is kept there)."""
    from jsft.config import ConfigError

    config = tiny_config(tokenizer_dir, data_32, tmp_path / "none", logging={"resume_from_checkpoint": True})
    with pytest.raises(ConfigError, match="resume_from_checkpoint=True but .* has no checkpoint"):
        train.run(config)
    out = tmp_path / "fresh"
    config = tiny_config(tokenizer_dir, data_32, out, training={"max_steps": 3})
    train.run(config)
    first = progress.read_metrics(out)
    config = tiny_config(tokenizer_dir, data_32, out, training={"max_steps": 6},
                         logging={"resume_from_checkpoint": False})
    for rerun in range(2):
        train.run(config)
        assert "starting fresh; the old checkpoints are now in" in capsys.readouterr().out
        assert sorted(p.name for p in (out / "checkpoints.previous").iterdir()) == (["3"] if rerun == 0 else ["3", "6"])
        losses = {r["step"]: r["loss"] for r in progress.read_metrics(out) if "loss" in r}
        assert sorted(losses) == list(range(1, 7)) and losses[1] == first[0]["loss"]


def test_a_resume_inside_a_logging_window_logs_what_an_uninterrupted_run_logs(tokenizer_dir, data_32, tmp_path):
    """logging_steps=5, a checkpoint at step 7: the resumed run's log at step 10 is the mean over steps 6-10 (the
    checkpoint carries steps 6 and 7), the same record as the uninterrupted run's, token count included."""
    import shutil

    out = tmp_path / "run"
    config = tiny_config(tokenizer_dir, data_32, out, training={"max_steps": 12},
                         logging={"logging_steps": 5, "save_steps": 7})
    train.run(config)
    want = {r["step"]: r for r in progress.read_metrics(out) if "loss" in r}
    shutil.rmtree(out / "checkpoints" / "12")  # as if the run had been killed after its checkpoint at step 7
    train.run(config)
    got = {r["step"]: r for r in progress.read_metrics(out) if "loss" in r}
    assert sorted(got) == sorted(want) == [5, 10, 12]
    for s in (10, 12):
        for key in ("loss", "grad_norm", "num_tokens", "num_trained", "step_losses", "learning_rate"):
            assert got[s][key] == pytest.approx(want[s][key], rel=1e-6), (s, key)
    assert len(got[10]["step_losses"]) == 5


def test_a_resume_with_other_data_settings_is_warned_about(tokenizer_dir, data_32, tmp_path):
    """The saved data position counts steps of the run that wrote it: resuming with another max_length or batch
    size trains other rows from there, so jsft names the changed settings; the same settings resume silently."""
    import warnings

    out = tmp_path / "run"
    train.run(tiny_config(tokenizer_dir, data_32, out, training={"max_steps": 3}))
    def changed(max_steps):
        return tiny_config(tokenizer_dir, data_32, out, training={"max_steps": max_steps,
                                                                  "per_device_train_batch_size": 2},
                           data={"max_length": 32})

    with pytest.warns(UserWarning, match=r"resuming checkpoint 3 with other data settings than the run that wrote it: "
                                         r"data.max_length 64 -> 32, training.per_device_train_batch_size 1 -> 2\. "):
        train.run(changed(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.run(changed(5))  # resumes checkpoint 4, written with these settings
    assert not [w for w in caught if "other data settings" in str(w.message)]


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_a_final_checkpoint(tokenizer_dir, data_32, tmp_path):
    out = tmp_path / "interrupted"
    run = dict(RUN, training={"max_steps": 400}, logging={"save_steps": 4, "save_total_limit": 1})
    config_file = write_config_file(tmp_path / "interrupted.py", TESTS, tokenizer_dir, data_32, out, **run)
    proc = subprocess.Popen([sys.executable, "-m", "jsft.train", "--config", str(config_file)], cwd=ROOT,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not _checkpoints(out):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]  # stopped, not finished: a job script can tell
    assert "stopped at step" in stdout and "done:" not in stdout
    stopped = max(r["step"] for r in progress.read_metrics(out))
    assert 4 <= stopped < 400
    assert (out / "checkpoints" / str(stopped)).exists()  # the final checkpoint is the step it stopped at
    assert not (out / "export").exists()


def test_checkpoint_saved_on_one_mesh_restores_onto_another(tmp_path):
    """Saved with params split over fsdp=8, restored into a model split over fsdp=2 on 2 devices: same values,
    the new mesh's shardings."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from jsft import checkpoint, sharding
    from jsft.model.llama import Llama, LlamaConfig

    cfg = LlamaConfig.from_hf(dict(fixtures.TINY_LLAMA, vocab_size=64, model_type="llama"))

    def build(mesh, seed):
        model = sharding.create_sharded_model(lambda: Llama(cfg, rngs=nnx.Rngs(seed)), mesh)
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        sharding.shard_model(optimizer, mesh)
        return model, optimizer

    mesh8 = sharding.create_mesh({"fsdp": -1})
    model, optimizer = build(mesh8, seed=0)
    manager = checkpoint.make_manager(tmp_path, async_save=False)
    checkpoint.save(manager, 5, model, optimizer, {"next_index": 40}, {"num_tokens": 123.0})
    manager.close()

    mesh2 = sharding.create_mesh({"fsdp": -1}, devices=jax.devices()[:2])
    other, other_opt = build(mesh2, seed=1)
    manager = checkpoint.make_manager(tmp_path)
    meta = checkpoint.restore(manager, other, other_opt)
    manager.close()
    assert meta["step"] == 5 and meta["data_iterator"] == {"next_index": 40} and meta["num_tokens"] == 123.0
    saved = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, value in nnx.to_flat_state(nnx.state(other, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(saved[path][...]))
        assert len(value[...].sharding.device_set) <= 2
    kernel = other.layer(0).mlp.up_proj.kernel[...]
    assert kernel.sharding.mesh.shape["fsdp"] == 2 and not kernel.sharding.is_fully_replicated


def test_a_lora_model_with_dropout_restores(tmp_path):
    """LoRA dropout's RNG key is a typed key in the model and raw key data in the checkpoint: the shape check before
    a restore must see them as the same array (it refused every LoRA-with-dropout resume once)."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from jsft import checkpoint
    from jsft.model.llama import Llama, LlamaConfig
    from jsft.model.lora import apply_lora

    cfg = LlamaConfig.from_hf(dict(fixtures.TINY_LLAMA, vocab_size=64, model_type="llama"))

    def build(seed):
        model = Llama(cfg, rngs=nnx.Rngs(seed))
        apply_lora(model, 4, 8.0, 0.1, "all-linear", rngs=nnx.Rngs(seed + 1))
        return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.LoRAParam)

    model, optimizer = build(0)
    model.layers.mlp.down_proj.dropout.rngs()  # advance one stream: its count must come back
    manager = checkpoint.make_manager(tmp_path, async_save=False)
    checkpoint.save(manager, 3, model, optimizer, {"next_index": 8})
    manager.close()
    other, other_optimizer = build(1)
    with checkpoint.make_manager(tmp_path) as manager:
        assert checkpoint.restore(manager, other, other_optimizer)["step"] == 3
    for (path, saved), (_, restored) in zip(nnx.to_flat_state(nnx.state(model, nnx.RngState)),
                                            nnx.to_flat_state(nnx.state(other, nnx.RngState))):
        a, b = saved[...], restored[...]
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
