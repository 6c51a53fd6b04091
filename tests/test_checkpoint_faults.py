"""Faults around checkpoints and the output directory (issue 13): a damaged checkpoint is named and the newest intact
one is used instead (resume exact, export too, nothing intact deleted); a full disk is one clear error; a half-written
metrics.jsonl line, changed data and a second run on the same output_dir are never silent."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from jsft import build, checkpoint, cli, fixtures, manifest, outdir, progress, train
from jsft.hf import CheckpointError
from jsft.outdir import OutputDirError
from train_configs import tiny_config

DISK_FULL = ("RESOURCE_EXHAUSTED: Error writing \"params.embed.embedding/0\" in OCDBT database at local file "
             "\"/x/checkpoints/6.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/\": Failed writing: "
             "Failed to write 7903 bytes to file 4: No space left on device [os_error_code='28']")  # TensorStore's


# ----------------------------------------------------------------------------------------------- fixtures


def _tiny_model(seed):
    import optax
    from flax import nnx

    from jsft.model.llama import Llama, LlamaConfig

    cfg = LlamaConfig.from_hf(dict(fixtures.TINY_LLAMA, vocab_size=64, model_type="llama"))
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)


def _params(model):
    from flax import nnx

    return {str(path): np.asarray(value[...]) for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Checkpoints 1 and 2 of a tiny model (other params each), saved once; tests damage copies of them."""
    out = tmp_path_factory.mktemp("two_checkpoints")
    saved = {}
    with checkpoint.make_manager(out, async_save=False) as manager:
        for step in (1, 2):
            model, optimizer = _tiny_model(seed=step)
            checkpoint.save(manager, step, model, optimizer, {"next_index": 8 * step})
            saved[step] = _params(model)
    return out, saved


def _copy(source, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target


def _largest_data_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _random_bytes(step_dir):
    path = _largest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 256] = np.random.default_rng(0).integers(0, 256, 256, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def _truncated(step_dir):
    path = _largest_data_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _missing_metadata(step_dir):
    path = step_dir / "state" / "_METADATA"
    path.unlink()
    return path


def _broken_json(step_dir):
    path = step_dir / "data" / "metadata"
    path.write_text(path.read_text()[:20])
    return path


def _empty_ocdbt_manifest(step_dir):
    path = step_dir / "state" / "manifest.ocdbt"
    path.write_bytes(b"")
    return path


DAMAGE = [_random_bytes, _truncated, _missing_metadata, _broken_json, _empty_ocdbt_manifest]


# ----------------------------------------------------------------------------------------------- verified restore


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_newest_checkpoint_is_named_and_the_newest_intact_one_restored(two_checkpoints, tmp_path, damage):
    source, saved = two_checkpoints
    out = _copy(source, tmp_path)
    damaged_file = damage(out / "checkpoints" / "2")
    model, optimizer = _tiny_model(seed=7)
    manager = checkpoint.make_manager(out, save_total_limit=2, async_save=False)
    with pytest.warns(UserWarning, match="checkpoint 2 is damaged: .*" + str(damaged_file.name)):
        manager, meta = checkpoint.restore_newest_intact(manager, model, optimizer)
    assert meta["step"] == 1 and meta["data_iterator"] == {"next_index": 8}
    for name, value in _params(model).items():
        np.testing.assert_array_equal(value, saved[1][name], err_msg=name)
    # the damaged one is set aside, not deleted; the intact one stays; the step can be saved again
    assert sorted(manager.all_steps()) == [1]
    assert (out / "checkpoints.damaged" / "2").is_dir() and (out / "checkpoints" / "1").is_dir()
    checkpoint.save(manager, 2, model, optimizer, {"next_index": 16})
    assert sorted(manager.all_steps()) == [1, 2]
    manager.close()


def test_every_save_writes_a_manifest_that_matches(two_checkpoints):
    source, _ = two_checkpoints
    for step in (1, 2):
        folder = source / "checkpoints" / str(step)
        files = json.loads((folder / manifest.FILE).read_text())["files"]
        assert "state/_METADATA" in files and "data/metadata" in files
        assert any(name.startswith("state/ocdbt.process_0/d/") for name in files)
        assert manifest.check(folder) is None


def test_no_intact_checkpoint_is_one_error_naming_each(two_checkpoints, tmp_path):
    out = _copy(two_checkpoints[0], tmp_path)
    _truncated(out / "checkpoints" / "2")
    _missing_metadata(out / "checkpoints" / "1")
    model, optimizer = _tiny_model(seed=7)
    manager = checkpoint.make_manager(out, async_save=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match=r"no intact checkpoint .*2: .*truncated.*; 1: .*_METADATA is "
                                                  "missing"):
            checkpoint.restore_newest_intact(manager, model, optimizer)
    manager.close()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]  # nothing moved or deleted


# ----------------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def data_32(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults_data") / "pc.jsonl"
    return fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 32, seed=9), path)


RUN = dict(data={"packing": False, "padding_free": False}, training={"max_steps": 9},
           logging={"save_steps": 3, "save_total_limit": 2})


@pytest.fixture(scope="module")
def trained(tokenizer_dir, data_32, tmp_path_factory):
    """A 9-step run with checkpoints every 3 steps, 2 kept (6 and 9), and its logged losses."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train.run(tiny_config(tokenizer_dir, data_32, out, **RUN))
    losses = {r["step"]: r["loss"] for r in progress.read_metrics(out) if "loss" in r}
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [6, 9]
    return out, losses


def test_resume_past_a_damaged_checkpoint_is_exact_and_keeps_the_intact_one(tokenizer_dir, data_32, trained,
                                                                            tmp_path, capsys):
    """Random bytes in checkpoint 9's data file: today's code resumed from it silently, into garbage. Now: named,
    set aside, resumed from 6, the same losses for steps 7-9 as the run that never stopped, and rotation
    (save_total_limit=2) keeps 6 (it was not rotated away by the damaged 9)."""
    out = _copy(trained[0], tmp_path)
    damaged_file = _random_bytes(out / "checkpoints" / "9")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.run(tiny_config(tokenizer_dir, data_32, out, **RUN))
    messages = [str(w.message) for w in caught]
    assert any(f"checkpoint 9 is damaged: {damaged_file} differs from what was saved" in m for m in messages)
    assert not any("training data" in m and "changed" in m for m in messages)  # same data: no false alarm
    assert "resume: checkpoint 6" in capsys.readouterr().out
    got = {r["step"]: r["loss"] for r in progress.read_metrics(out) if "loss" in r}
    assert sorted(got) == list(range(1, 10))
    for step in range(1, 10):
        assert got[step] == pytest.approx(trained[1][step], rel=1e-6, abs=1e-7), step
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [6, 9]
    assert (out / "checkpoints.damaged" / "9").is_dir()
    assert manifest.check(out / "checkpoints" / "9") is None  # saved again, intact
    meta = checkpoint.read_meta(out, 9)
    assert set(meta["data_fingerprint"]) == {"examples", "tokens", "hash"} and meta["data_fingerprint"]["examples"] > 0


def test_export_names_a_damaged_checkpoint_and_otherwise_exports_the_newest_intact(tokenizer_dir, data_32, trained,
                                                                                 tmp_path):
    from jsft.export import export_checkpoint

    out = _copy(trained[0], tmp_path)
    damaged_file = _truncated(out / "checkpoints" / "9")
    config = tiny_config(tokenizer_dir, data_32, out, **RUN)
    with pytest.raises(CheckpointError, match=f"checkpoint 9 under .* is damaged: {damaged_file} has .* "
                                              r"\(truncated\)\. Fix: export another one \(--checkpoint 6"):
        export_checkpoint(config, step=9)
    with pytest.warns(UserWarning, match="checkpoint 9 is damaged: .* trying checkpoint 6 for the export"):
        written = export_checkpoint(config)
    assert (written["full"] / "model.safetensors").exists() and not (out / "export.partial").exists()
    assert (out / "checkpoints" / "9").exists()  # an export moves nothing


def test_disk_full_while_saving_is_one_error_and_the_earlier_checkpoints_stay(tokenizer_dir, data_32, trained,
                                                                             tmp_path, monkeypatch, capfd):
    """The disk fills while checkpoint 12 is written (TensorStore's RESOURCE_EXHAUSTED in Orbax's save thread, before
    the rename that completes a checkpoint): exit status 2 with one message naming the directory and the space, no
    traceback spam (today: 1,223 lines); checkpoints 6 and 9 intact, nothing of 12 left; resume works after."""
    out = _copy(trained[0], tmp_path)
    config = tmp_path / "run.py"
    from train_configs import write_config_file

    run = dict(RUN, training={"max_steps": 12})
    write_config_file(config, Path(__file__).parent, tokenizer_dir, data_32, out, **run)

    def full(directory):
        raise ValueError(DISK_FULL)

    monkeypatch.setattr(manifest, "write", full)
    capfd.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.run(train.main, ["--config", str(config)])
    assert stopped.value.code == 2
    err = capfd.readouterr().err
    assert f"error (CheckpointError): disk full while saving checkpoint 12 to {out / 'checkpoints'}: " in err
    assert "free; checkpoint 9 of this run takes" in err and "(6, 9) are intact" in err
    assert "Traceback" not in err and err.count("RESOURCE_EXHAUSTED") == 0, err[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["6", "9"]
    assert not (out / "jsft.lock").exists()  # released on the error
    monkeypatch.undo()
    summary = train.run(tiny_config(tokenizer_dir, data_32, out, **run))  # space back: resumes from 9
    assert summary["steps"] == 12 and manifest.check(out / "checkpoints" / "12") is None


def test_a_save_the_disk_cannot_hold_is_refused_before_writing(two_checkpoints, tmp_path, monkeypatch):
    out = _copy(two_checkpoints[0], tmp_path)
    monkeypatch.setattr(outdir, "free_bytes", lambda path: 1000)
    model, optimizer = _tiny_model(seed=3)
    with checkpoint.make_manager(out, save_total_limit=1, async_save=False) as manager:
        with pytest.raises(CheckpointError, match=r"disk full while saving checkpoint 3 to .*: 1,000 B free; "
                                                  r"checkpoint 2 of this run takes .* KiB\. The checkpoints saved "
                                                  r"before it \(1, 2\) are intact"):
            checkpoint.save(manager, 3, model, optimizer, {"next_index": 24})
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]


def test_disk_full_in_the_save_thread_keeps_the_only_checkpoint_with_save_total_limit_1(two_checkpoints, tmp_path,
                                                                                       monkeypatch):
    out = _copy(two_checkpoints[0], tmp_path)
    shutil.rmtree(out / "checkpoints" / "1")
    monkeypatch.setattr(manifest, "write", lambda directory: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    model, optimizer = _tiny_model(seed=3)
    with checkpoint.make_manager(out, save_total_limit=1, async_save=False) as manager:
        with pytest.raises(CheckpointError, match="disk full while saving checkpoint 3 .* checkpoints saved before "
                                                  r"it \(2\) are intact and nothing of checkpoint 3 is left"):
            checkpoint.save(manager, 3, model, optimizer, {"next_index": 24})
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    assert manifest.check(out / "checkpoints" / "2") is None


def test_disk_full_while_exporting_is_one_error_and_the_old_export_stays(tokenizer_dir, data_32, tmp_path,
                                                                         monkeypatch):
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    from jsft import hf
    from jsft.export import export

    model, _ = _tiny_model(seed=0)
    config = tiny_config(tokenizer_dir, data_32, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    old = tmp_path / "export"
    old.mkdir()
    (old / "model.safetensors").write_text("the previous export")

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(hf, "save_file", full)
    with pytest.raises(OutputDirError, match=f"disk full writing the full export to {old}: .* free, it needs about "
                                             r".* KiB \(nothing half-written is left; the export already there is "
                                             "unchanged"):
        export(model, tokenizer, config)
    assert sorted(p.name for p in tmp_path.iterdir() if "export" in p.name) == ["export"]
    assert (old / "model.safetensors").read_text() == "the previous export"
    monkeypatch.setattr(outdir, "free_bytes", lambda path: 10)
    with pytest.raises(OutputDirError, match="disk full writing the full export .*: 10 B free"):
        export(model, tokenizer, config)


# ----------------------------------------------------------------------------------------------- metrics, data


def test_a_half_written_last_metrics_line_is_cut_off_on_resume(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: its last line is incomplete .*: cut off"):
        writer = progress.MetricsWriter(tmp_path, ["jsonl"], resume_step=3)
    writer.write(4, {"loss": 0.25})
    assert [r["step"] for r in progress.read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_resuming_on_changed_data_is_warned_about_by_name(two_checkpoints, tmp_path):
    """The checkpoint holds the fingerprint of the tokenized data it was trained on; other data on resume (a row
    edited between runs: the token cache missed, but the old data position was applied without a word) warns."""
    out = _copy(two_checkpoints[0], tmp_path)
    model, optimizer = _tiny_model(seed=3)
    old = {"examples": 32, "tokens": 1200, "hash": "a" * 32}
    with checkpoint.make_manager(out, async_save=False) as manager:
        checkpoint.save(manager, 3, model, optimizer, {"next_index": 24}, {"data_fingerprint": old})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            checkpoint.restore(manager, model, optimizer, 3, data_fingerprint=dict(old))
        assert not [w for w in caught if "training data" in str(w.message)]
        config = {"data": {"dataset_name": "data/chat.jsonl"}}
        with pytest.warns(UserWarning, match=r"the training data \(data.dataset_name=data/chat.jsonl\) changed since "
                                             r"checkpoint 3 was written: 32 -> 33 examples, 1,200 -> 1,234 tokens"):
            checkpoint.restore(manager, model, optimizer, 3, config=config,
                               data_fingerprint={"examples": 33, "tokens": 1234, "hash": "b" * 32})


def test_the_data_fingerprint_is_the_tokenized_content(tokenizer_dir, data_32, tmp_path):
    from jsft.data.pipeline import prepare_dataset

    config = tiny_config(tokenizer_dir, data_32, tmp_path / "a", data={"packing": False})
    tokenizer, _ = build.build_tokenizer(config)
    first = checkpoint.data_fingerprint(prepare_dataset(config, tokenizer))
    copy = tmp_path / "copy.jsonl"
    shutil.copy(data_32, copy)  # another path and mtime, the same rows: the same data
    config = tiny_config(tokenizer_dir, copy, tmp_path / "b", data={"packing": False})
    assert checkpoint.data_fingerprint(prepare_dataset(config, tokenizer)) == first
    rows = [json.loads(line) for line in copy.read_text().splitlines()]
    rows[3]["completion"] += " changed"
    fixtures.write_jsonl(rows, copy)
    changed = checkpoint.data_fingerprint(prepare_dataset(config, tokenizer))
    assert changed["hash"] != first["hash"] and changed["examples"] == first["examples"]


# ----------------------------------------------------------------------------------------------- one writer


def _lock(out, pid, host=None):
    out.mkdir(parents=True, exist_ok=True)
    (out / outdir.LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                    "started": "2026-01-01 00:00:00 UTC", "command": "jsft.train"}))


def test_a_second_run_on_an_output_dir_fails_at_once_naming_the_first(tokenizer_dir, data_32, tmp_path):
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        _lock(out, first.pid)
        with pytest.raises(OutputDirError, match=rf"logging.output_dir={out} is in use by another jsft run: PID "
                                                 rf"{first.pid} on host {socket.gethostname()}, .*wait for it"):
            train.run(tiny_config(tokenizer_dir, data_32, out))
        assert not (out / "config.json").exists() and not (out / "checkpoints").exists()  # nothing touched
        _lock(out, 1234, host="another-host")
        with pytest.raises(OutputDirError, match=f"PID 1234 on host another-host.*delete {out / outdir.LOCK_FILE}"):
            outdir.acquire(out)
    finally:
        first.kill()
        first.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _lock(tmp_path, gone.pid)
    path = outdir.acquire(tmp_path)
    assert f"taking over the lock {path} of a run that is gone (PID {gone.pid}" in capsys.readouterr().out
    assert json.loads(path.read_text())["pid"] == os.getpid()
    outdir.release(path)
    assert not path.exists()


def test_a_file_or_a_read_only_directory_as_output_dir_is_a_clear_error(tokenizer_dir, data_32, tmp_path,
                                                                         monkeypatch, capsys):
    from train_configs import write_config_file

    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    config = write_config_file(tmp_path / "c.py", Path(__file__).parent, tokenizer_dir, data_32, a_file)
    with pytest.raises(SystemExit) as stopped:
        cli.run(train.main, ["--config", str(config)])
    assert stopped.value.code == 2
    assert f"error (OutputDirError): logging.output_dir={a_file} is a file, not a directory" in capsys.readouterr().err
    with pytest.raises(OutputDirError, match=f"{a_file} is a file, not a directory"):
        outdir.acquire(a_file / "below")

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: the refusal a user gets, as the kernel words it
        monkeypatch.setattr(outdir, "_open_exclusive", lambda path: (_ for _ in ()).throw(
            PermissionError(errno.EACCES, "Permission denied", str(path))))
    with pytest.raises(OutputDirError, match=f"logging.output_dir={read_only} is not writable \\(Permission denied\\)"):
        train.run(tiny_config(tokenizer_dir, data_32, read_only))


def test_a_checkpoint_from_before_the_stacked_layers_is_named_with_the_way_out(tmp_path):
    """A checkpoint with one array per decoder layer (jsft before 21024fe) cannot restore into the stacked layers:
    one CheckpointError saying so and how to get the weights out, not a list of missing arrays."""
    import orbax.checkpoint as ocp

    old = {"params": {"layers": {"0": {"mlp": {"kernel": np.zeros((4, 3), np.float32)}},
                                 "1": {"mlp": {"kernel": np.zeros((4, 3), np.float32)}}}}}
    (tmp_path / "1").mkdir()
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "1" / "state", old)
    (tmp_path / "1" / "data").mkdir()
    (tmp_path / "1" / "data" / "metadata").write_text("{}")
    live = {"params": {"layers": {"mlp": {"kernel": np.zeros((2, 4, 3), np.float32)}}}}
    with pytest.raises(CheckpointError, match=r"one array per decoder layer \(params\.layers\.0\.mlp\.kernel.*"
                                              r"git checkout 21024fe\^1.*jsft\.export"):
        checkpoint.check_shapes(tmp_path, 1, live)
    live_per_layer = {"params": {"layers": {"0": {"mlp": {"kernel": np.zeros((4, 5), np.float32)}}}}}
    with pytest.raises(CheckpointError, match="does not fit this run's model"):  # other differences: as before
        checkpoint.check_shapes(tmp_path, 1, live_per_layer, partial=True)
