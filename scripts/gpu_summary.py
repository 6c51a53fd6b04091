"""Print the short table of a first GPU run's output folder (probe.json, attn_timing.json, bench_*.json). No JAX needed.

    python scripts/gpu_summary.py /tmp/gpu_out
"""

import json
import sys
from pathlib import Path


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except Exception:  # noqa: BLE001 - a missing or cut file is reported as such
        return None


def gib(x):
    return "-" if not x else f"{x / 2**30:.1f}G"


def lines(folder: str) -> list[str]:
    out, said = Path(folder), []
    probe = load(out / "probe.json")
    if probe is None:
        said.append(f"probe.json: missing or cut in {out}")
    else:
        env = probe.get("env", {})
        said.append("env: " + json.dumps({k: env.get(k) for k in (
            "jax", "jaxlib", "flax", "tokamax", "cuda_runtime", "cudnn", "device_kind", "compute_capability",
            "jax_packed_gqa_is_fixed", "command_buffers_exclude_cudnn")}))
        for name, choice in (probe.get("auto") or {}).items():
            said.append(f"  auto {name}: {choice.get('describe')}"[:400])
        for c in probe.get("checks", []):
            errs = c.get("rel_err_vs_f32") or {}
            worst = f"{max(errs.values()):.2e}" if errs else "-"
            said.append(f"  check {c.get('name', '?'):34s} {c.get('status', '?'):11s} worst_rel={worst} "
                        f"temp={gib(c.get('temp_bytes'))} {(c.get('error') or c.get('reason') or '')[:160]}")
    timing = load(out / "attn_timing.json")
    for t in (timing or {}).get("timing", []):
        said.append(f"  attn {t.get('impl', '?'):16s} L={t.get('L')} {t.get('status', '?'):11s} "
                    f"ms={t.get('fwd_bwd_ms')} useful_TF/s={t.get('useful_tflops')} compile={t.get('compile_s')} "
                    f"temp={gib(t.get('temp_bytes'))} {(t.get('error') or t.get('reason') or '')[:120]}")
    for path in sorted(out.glob("bench_*.json")):
        for r in (load(path) or {}).get("runs", []):
            said.append(f"  {path.stem:16s} {r.get('name')} L={r.get('L')} B={r.get('micro_batch')} "
                        f"attn={r.get('attention_impl', r.get('attention'))} {r.get('status')} "
                        f"step_ms={r.get('step_ms')} tok/s={r.get('tokens_per_s')} mfu={r.get('mfu')} "
                        f"hfu={r.get('hfu')} peak={gib(r.get('peak_bytes'))} compile={r.get('compile_s')} "
                        f"{(r.get('error') or '')[:160]}")
    return said


if __name__ == "__main__":
    print("\n".join(lines(sys.argv[1] if len(sys.argv) > 1 else ".")))
