"""benchmarks/gpu.py runs the trainer's own step end to end on CPU in --smoke mode (a tiny Llama, full and LoRA),
reports MFU and HFU from jsft.flops, and writes its JSON after every configuration."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_smoke_runs_jsft_s_train_step_full_and_lora_and_writes_json(tmp_path, monkeypatch):
    bench = load_script("benchmarks/gpu.py")
    from jsft import flops, step

    calls = []
    real_step = step.train_step
    monkeypatch.setattr(step, "train_step", lambda *a, **k: calls.append(k) or real_step(*a, **k))
    result = bench.main(["--smoke", "--peak-tflops", "0.001", "--out", str(tmp_path)])  # a CPU has no table peak
    (path,) = tmp_path.glob("cpu-*.json")
    saved = json.loads(path.read_text())
    assert saved["command"] == f"python benchmarks/gpu.py --smoke --peak-tflops 0.001 --out {tmp_path}"
    assert saved["backend"] == "cpu" and saved["peak_tflops"] == 0.001 and not saved["isolated"]
    assert saved["git_commit"] and saved["versions"]["jax"]
    assert len(calls) == 2 * 3 and all(c["loss_type"] == "nll" and c["schedule"] for c in calls)  # the trainer's step
    runs = {r["name"]: r for r in saved["runs"]}
    assert list(runs) == ["smoke-full", "smoke-lora"]
    for run in runs.values():
        assert run["status"] == "ok", run
        assert run["attention_impl"] == "xla" and run["L"] == 32
        assert run["attention_choice"] == "xla (no flash kernel is tried on cpu with float32)"
        assert run["step_ms"] > 0 and run["tokens_per_s"] > 0 and run["first_call_s"] > run["step_ms"] / 1e3
        expected_mfu = run["tokens_per_s"] * run["flops_per_token"] / 1e9  # 0.001 TFLOP/s = 1e9 FLOP/s
        assert run["mfu"] == pytest.approx(expected_mfu, rel=1e-3, abs=1e-4) and run["mfu"] > 0
        assert run["hfu"] == pytest.approx(run["tokens_per_s"] * run["hardware_flops_per_token"] / 1e9, rel=1e-3)
        losses = run["losses"]
        assert len(losses) == 3 and losses[-1] < losses[0]  # the steps train: the loss goes down on a fixed batch
        assert abs(losses[0] - math.log(384)) < 0.3  # random init: about log(vocab)
    full, lora = runs["smoke-full"], runs["smoke-lora"]
    assert full["trainable_params"] == full["params"] and full["remat"] == "none" and lora["remat"] == "full"
    # LoRA r=16 on the 7 projections of the one layer: r * (in + out) each
    adapters = 16 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert lora["trainable_params"] == adapters and lora["params"] == full["params"] + adapters
    cfg, seq = bench.MODELS["smoke"], lora["effective_seq_len"]
    assert full["flops_per_token"] == pytest.approx(flops.flops_per_token(cfg, full["effective_seq_len"]), rel=1e-3)
    assert lora["flops_per_token"] == pytest.approx(  # LoRA: no gradient for the frozen weights
        4 * flops.matmul_params(cfg) + 6 * adapters + flops.attention_flops_per_token(cfg, seq), rel=1e-3)
    assert lora["hardware_flops_per_token"] > lora["flops_per_token"]  # remat full recomputes the forward
    assert result["path"] == str(path)


def test_the_json_is_written_before_and_after_every_configuration(tmp_path, monkeypatch):
    """A GPU window that ends mid-list keeps what was measured: the file exists from the start and grows by one run
    at a time (here the second configuration fails; the first is already on disk)."""
    bench = load_script("benchmarks/gpu.py")
    out = tmp_path / "bench.json"
    seen = []

    def fake_run(spec):
        seen.append(json.loads(out.read_text())["runs"])
        if spec["name"] == "smoke-lora":
            raise KeyboardInterrupt  # the window closed
        return dict(spec, status="ok")

    monkeypatch.setattr(bench, "run_one", fake_run)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--smoke", "--out", str(out)])
    assert seen == [[], [dict(seen[1][0], name="smoke-full", status="ok")]]
    assert [r["name"] for r in json.loads(out.read_text())["runs"]] == ["smoke-full"]


def test_configurations_are_an_explicit_short_list_with_overrides():
    bench = load_script("benchmarks/gpu.py")
    default = bench.specs(bench.parse_args([]))
    assert [s["name"] for s in default] == ["1b-full", "8b-lora"]  # not a sweep
    (one,) = bench.specs(bench.parse_args(["--configs", "8b-lora", "--set", "L=16384", "attention=xla",
                                           "learning_rate=1e-4"]))
    assert (one["model"], one["mode"], one["L"], one["attention"], one["learning_rate"]) == (
        "8b", "lora", 16384, "xla", 1e-4)
    with pytest.raises(SystemExit, match="--set 'lenght=3'"):
        bench.specs(bench.parse_args(["--set", "lenght=3"]))


def test_packed_batch_follows_the_batch_contract():
    bench = load_script("benchmarks/gpu.py")
    batch = bench.packed_batch(3, 64, vocab=50, mean_doc=8, seed=1)
    seg, pos, ids = batch["segment_ids"], batch["positions"], batch["input_ids"]
    for b in range(3):
        row = seg[b]
        valid = row[row > 0]
        assert np.all(np.diff(valid) >= 0) and valid[0] == 1 and np.all(row[len(valid):] == 0)  # tail padding
        for doc in set(valid.tolist()):
            idx = np.nonzero(row == doc)[0]
            np.testing.assert_array_equal(pos[b, idx], np.arange(len(idx)))  # positions restart per document
            np.testing.assert_array_equal(batch["targets"][b, idx[:-1]], ids[b, idx[1:]])  # next token, same doc
            assert batch["loss_mask"][b, idx[:-1]].all() and not batch["loss_mask"][b, idx[-1]]
        assert not batch["loss_mask"][b, row == 0].any()


def test_mfu_of_a_known_run_uses_the_trainers_flop_count():
    bench = load_script("benchmarks/gpu.py")
    from jsft import flops

    cfg = bench.MODELS["8b"]
    # Llama-3-8B: about 7.5e9 matmul parameters (embedding lookup excluded) -> 6N = 4.5e10 FLOPs per token
    assert 7.4e9 < flops.matmul_params(cfg) < 7.6e9
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0


def test_isolated_run_returns_the_child_process_record_even_for_a_failure():
    """--isolate runs each configuration in its own process (own peak memory; an OOM cannot end the list)."""
    bench = load_script("benchmarks/gpu.py")
    spec = dict(bench.DEFAULTS, model="no-such-model", L=32, micro_batch=1, remat="none", mode="full", name="x")
    record = bench.run_isolated(spec, timeout=120)
    assert record["status"] == "error" and "no-such-model" in record["error"]
    assert record["model"] == "no-such-model" and record["L"] == 32
