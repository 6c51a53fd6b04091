"""scripts/gpu_check.py runs end to end on CPU in --smoke mode (xla + pallas interpret) and writes its JSON."""

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


def test_gpu_check_smoke_writes_passing_json(tmp_path):
    gpu_check = load_script("scripts/gpu_check.py")
    result = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("gpu_check-cpu-*.json")
    saved = json.loads(path.read_text())
    assert saved["command"] == f"python scripts/gpu_check.py --smoke --out {tmp_path}"
    assert saved["backend"] == "cpu" and saved["auto_picks"] == {"bfloat16": "xla", "float32": "xla"}
    assert saved["auto_picks_with_max_segments"] == "xla"
    from jax._src.cudnn import fused_attention_stablehlo as fas  # jax <= 0.11.0: kv offsets use the q heads

    assert saved["jax_packed_gqa_is_fixed"] == ("N_kv" in inspect.getsource(fas._fix_seqlen_offsets))
    checks = {(c["impl"], c["dtype"]): c for c in saved["correctness"]}
    assert set(checks) == {("xla", "float32"), ("pallas", "float32")}
    for check in checks.values():
        assert check["status"] == "pass", check
        assert check["padding_zero"] and check["finite"]
        assert max(check["packed_vs_alone_max_err"].values()) < 1e-5
    assert checks["pallas", "float32"]["max_abs_diff_vs_xla"] < 1e-5
    timings = {t["impl"]: t for t in saved["timing"]}
    assert set(timings) == {"xla", "pallas"}
    for timing in timings.values():
        assert timing["status"] == "ok" and timing["L"] == 32
        assert timing["fwd_bwd_ms"] > 0 and timing["compile_s"] > 0
    assert result["path"] == str(path)


def test_gpu_check_counts_attention_flops_inside_documents():
    gpu_check = load_script("scripts/gpu_check.py")
    # one document of 2 tokens: 3 (query, key) pairs; 4*D*H FLOPs each forward, x3.5 with the backward
    assert gpu_check.attention_flops([[2]], hq=1, head_dim=1) == 3.5 * 4 * 3
    lengths = gpu_check.document_lengths(4096, 8, seed=0)
    assert len(lengths) == 8 and 0.85 * 4096 <= sum(lengths) <= 0.9 * 4096
