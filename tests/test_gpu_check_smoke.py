"""scripts/gpu_check.py runs end to end on CPU in --smoke mode (xla + pallas and tokamax emulated) at two head
dims and writes its JSON as it goes."""

import importlib.util
import inspect
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_smoke_writes_passing_json_after_every_check(tmp_path, monkeypatch):
    gpu_check = load_script("scripts/gpu_check.py")
    out = tmp_path / "check.json"
    sizes = []
    real_print = gpu_check._print
    monkeypatch.setattr(gpu_check, "_print", lambda r: sizes.append(len(json.loads(out.read_text())["correctness"]))
                        or real_print(r))
    result = gpu_check.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["command"] == f"python scripts/gpu_check.py --smoke --out {out}"
    assert saved["backend"] == "cpu" and saved["auto_picks"] == "xla"
    assert saved["auto_choice_bf16_d128_gqa_32_8"] == "xla (no flash kernel is tried on cpu with bfloat16)"
    from jax._src.cudnn import fused_attention_stablehlo as fas  # jax <= 0.11.0: kv offsets use the q heads

    assert saved["jax_packed_gqa_is_fixed"] == ("N_kv" in inspect.getsource(fas._fix_seqlen_offsets))
    checks = {(c["impl"], c["head_dim"]): c for c in saved["correctness"]}
    assert set(checks) == {(impl, d) for impl in ("xla", "pallas", "tokamax") for d in (16, 8)}
    for check in checks.values():
        assert check["status"] == "pass", check
        assert check["padding_zero"] and check["finite"] and check["dtype"] == "float32"
        assert max(check["packed_vs_alone_max_err"].values()) < 1e-5
        assert check["max_abs_diff_vs_xla"] < 1e-5
    assert sizes[:6] == [1, 2, 3, 4, 5, 6]  # the file held each check as soon as it was printed
    timings = {t["impl"]: t for t in saved["timing"]}
    assert set(timings) == {"xla", "pallas", "tokamax"}
    for timing in timings.values():
        assert timing["status"] == "ok" and timing["L"] == 32
        assert timing["fwd_bwd_ms"] > 0 and timing["compile_s"] > 0
    assert result["path"] == str(out)


def test_gpu_check_records_an_implementation_that_cannot_run_with_the_reason(tmp_path):
    gpu_check = load_script("scripts/gpu_check.py")
    record = gpu_check.check_correctness("cudnn", "bfloat16", False, (64, 4, 2, 16))
    assert record["status"] == "unsupported" and "it needs an NVIDIA GPU" in record["reason"]


def test_gpu_check_counts_attention_flops_inside_documents():
    gpu_check = load_script("scripts/gpu_check.py")
    # one document of 2 tokens: 3 (query, key) pairs; 4*D*H FLOPs each forward, x3.5 with the backward
    assert gpu_check.attention_flops([[2]], hq=1, head_dim=1) == 3.5 * 4 * 3
    lengths = gpu_check.document_lengths(4096, 8, seed=0)
    assert len(lengths) == 8 and 0.85 * 4096 <= sum(lengths) <= 0.9 * 4096
    assert gpu_check.SHAPES == [(2048, 32, 8, 128), (2048, 32, 8, 64)]  # the GPU run checks both head dims at 2048
