"""benchmarks/gpu.py runs end to end on CPU in --smoke mode (a tiny Llama, full and LoRA) and writes its JSON."""

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


def test_gpu_bench_smoke_trains_full_and_lora_and_writes_json(tmp_path):
    bench = load_script("benchmarks/gpu.py")
    result = bench.main(["--smoke", "--peak-tflops", "0.001", "--out", str(tmp_path)])  # a CPU has no table peak
    (path,) = tmp_path.glob("cpu-*.json")
    saved = json.loads(path.read_text())
    assert saved["command"] == f"python benchmarks/gpu.py --smoke --peak-tflops 0.001 --out {tmp_path}"
    assert saved["backend"] == "cpu" and saved["peak_tflops"] == 0.001 and not saved["isolated"]
    runs = {(r["mode"], r["remat"], r["micro_batch"]): r for r in saved["runs"]}
    assert set(runs) == {("full", "none", 1), ("lora", "full", 2)}
    for run in runs.values():
        assert run["status"] == "ok", run
        assert run["attention_impl"] == "xla" and run["L"] == 32
        assert run["step_ms"] > 0 and run["tokens_per_s"] > 0 and run["compile_s"] > 0
        expected_mfu = run["tokens_per_s"] * run["flops_per_token"] / 1e9  # 0.001 TFLOP/s = 1e9 FLOP/s
        assert run["mfu"] == pytest.approx(expected_mfu, rel=1e-3, abs=1e-4) and run["mfu"] > 0
        losses = run["losses"]
        assert len(losses) == 3 and losses[-1] < losses[0]  # the steps train: the loss goes down on a fixed batch
        assert abs(losses[0] - math.log(384)) < 0.3  # random init: about log(vocab)
    full, lora = runs["full", "none", 1], runs["lora", "full", 2]
    assert full["trainable_params"] == full["params"]
    # LoRA r=16 on the 7 projections of the one layer: r * (in + out) each
    assert lora["trainable_params"] == 16 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert lora["params"] == full["params"] + lora["trainable_params"]
    assert result["path"] == str(path)


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
    from jsft import loss

    cfg = bench.MODELS["8b"]
    # Llama-3-8B: about 7.5e9 matmul parameters (embedding lookup excluded) -> 6N = 4.5e10 FLOPs per token
    assert 7.4e9 < loss.matmul_params(cfg) < 7.6e9
    assert loss.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0


def test_isolated_run_returns_the_child_process_record_even_for_a_failure():
    """--isolate runs each configuration in its own process (own peak memory; an OOM cannot end the sweep)."""
    bench = load_script("benchmarks/gpu.py")
    spec = dict(model="no-such-model", L=32, micro_batch=1, remat="none", mode="full", attention="auto", steps=1,
                mean_doc=4, lora_rank=4, chunk_size=32, learning_rate=1e-5, peak_tflops=None)
    record = bench.run_isolated(spec, timeout=120)
    assert record["status"] == "error" and "no-such-model" in record["error"]
    assert record["model"] == "no-such-model" and record["L"] == 32
