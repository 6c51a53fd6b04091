"""Check and time packed attention on this device: every implementation, packed == documents alone, vs XLA's mask.

    python scripts/gpu_check.py                       # on a GPU: correctness + timings at L = 4096/8192/16384
    python scripts/gpu_check.py --smoke --out /tmp/x  # on CPU: tiny shapes, xla + pallas/tokamax (interpret) only

1. Correctness, for each implementation (xla, cudnn, tokamax, pallas), dtype (float32, bfloat16) and head shape
   (L=2048 with 32 q / 8 kv heads of head dim 128 (Llama-3-8B) and of 64 (Llama-3.2-1B)): rows packed with several
   documents and tail padding give each document the output and the q/k/v gradients it gets alone in its own row;
   padding outputs are 0; everything is finite. Also the largest difference from the XLA mask path on the same
   packed rows. An implementation that cannot run (its static checks or jsft's probe fail: AttentionUnavailable)
   is recorded with the reason.
2. Timing of one forward+backward (jit, median of --repeats) with a Llama-8B-like head config (32 q heads, 8 kv
   heads, head dim 128, bf16, several documents per row), at each L, with compile time, the compiled program's
   temporary memory and the useful TFLOP/s (causal FLOPs inside documents only). cuDNN runs with the tight bound
   (8 = the documents a row holds) and the loose L // 16, to show what the static bound costs (cuDNN sees B*M
   sequences).

The JSON (benchmarks/results/gpu_check-<device>-<date>.json, or under --out; with the command that made it) is
rewritten after every check, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from jsft.model import attention, kernels  # noqa: E402
from jsft.model.attention import packed_attention  # noqa: E402

TOLERANCE = {"float32": 2e-3, "bfloat16": 3e-2}  # packed vs alone; float32 on GPU may use TF32 in a kernel


# ----------------------------------------------------------------------------------------------- inputs


def document_lengths(length: int, num_docs: int, seed: int) -> list[int]:
    """num_docs random document lengths that fill about 90% of the row (the rest is tail padding)."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.3, 1.0, num_docs)
    lengths = np.maximum(1, np.floor(weights / weights.sum() * 0.9 * length)).astype(int)
    return [int(n) for n in lengths]


def segment_ids_for(rows: list[list[int]], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for r, lengths in enumerate(rows):
        start = 0
        for i, n in enumerate(lengths):
            out[r, start : start + n] = i + 1
            start += n
    return out


def random_qkv(batch, length, hq, hkv, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(batch, length, hq, head_dim), (batch, length, hkv, head_dim), (batch, length, hkv, head_dim)]
    return [jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes]


def attention_flops(rows: list[list[int]], hq: int, head_dim: int) -> float:
    """Forward+backward FLOPs of causal attention inside documents: 4*D*Hq per (query, key) pair, x3.5 for bwd."""
    pairs = sum(n * (n + 1) / 2 for lengths in rows for n in lengths)
    return 3.5 * 4 * head_dim * hq * pairs


# ----------------------------------------------------------------------------------------------- the step


@functools.lru_cache(maxsize=None)
def loss_and_grads(impl: str, interpret: bool, block_size: int | None, max_segments: int | None):
    """jit(value_and_grad) of sum(attention(q, k, v) * w) wrt q, k, v: one forward+backward."""

    def loss(q, k, v, segment_ids, w):
        out = packed_attention(
            q, k, v, segment_ids, impl=impl, interpret=interpret, block_size=block_size, max_segments=max_segments
        )
        return (out.astype(jnp.float32) * w).sum(), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def impl_options(impl: str, smoke: bool, max_segments: int | None) -> dict:
    """pallas/tokamax in --smoke: their CPU emulations (interpret); cudnn: the documents-per-row bound."""
    interpret = smoke and impl in ("pallas", "tokamax")
    return dict(interpret=interpret, block_size=16 if interpret and impl == "pallas" else None,
                max_segments=max_segments if impl == "cudnn" else None)


def unavailable_reason(impl: str, dtype, shape: tuple[int, int, int, int], max_segments: int | None,
                       smoke: bool) -> str | None:
    """Why `impl` cannot run here at this (L, q heads, kv heads, head dim): its static checks, then jsft's probe
    (cached per process). None: it runs."""
    if smoke and impl in ("pallas", "tokamax"):
        return None  # interpret mode
    length, hq, hkv, head_dim = shape
    try:
        attention.resolve(impl, dtype, length, head_dim, q_heads=hq, kv_heads=hkv, max_segments=max_segments)
    except attention.AttentionUnavailable as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------------------------- 1. correctness


# (L, q heads, kv heads, head dim) of the correctness checks: Llama-3-8B's and Llama-3.2-1B's attention at L=2048
SHAPES = [(2048, 32, 8, 128), (2048, 32, 8, 64)]
SMOKE_SHAPES = [(32, 4, 2, 16), (32, 4, 2, 8)]


def check_correctness(impl: str, dtype_name: str, smoke: bool, shape: tuple[int, int, int, int]) -> dict:
    """Packed rows vs every document alone in its own row; outputs and q/k/v gradients."""
    dtype = jnp.dtype(dtype_name)
    length, hq, hkv, head_dim = shape
    rows = [[7, 13, 5], [20]] if smoke else [document_lengths(length, 5, seed=1), document_lengths(length, 3, seed=2)]
    num_docs = sum(len(r) for r in rows)
    rows = rows + [[]] * (num_docs - len(rows))  # all-padding rows: as many rows as documents, one compile for both
    record = dict(impl=impl, dtype=dtype_name, L=length, q_heads=hq, kv_heads=hkv, head_dim=head_dim, rows=rows)
    bound = max(len(r) for r in rows)
    reason = unavailable_reason(impl, dtype, shape, bound, smoke)
    if reason is not None:
        return dict(record, status="unsupported", reason=reason)
    segment_ids = segment_ids_for(rows, length)
    q, k, v = random_qkv(len(rows), length, hq, hkv, head_dim, dtype)
    w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape, np.float32))
    docs = [(b, sum(lengths[:i]), n) for b, lengths in enumerate(rows) for i, n in enumerate(lengths)]
    alone_ids = segment_ids_for([[n] for _, _, n in docs], length)

    def alone(x):  # each document moved to the start of its own row
        values = np.asarray(x.astype(jnp.float32))
        out = np.zeros((len(docs),) + values.shape[1:], np.float32)
        for i, (b, start, n) in enumerate(docs):
            out[i, :n] = values[b, start : start + n]
        return jnp.asarray(out, x.dtype)

    step = loss_and_grads(impl, **impl_options(impl, smoke, bound))
    precision = "highest" if dtype == jnp.float32 else "default"
    try:
        with jax.default_matmul_precision(precision):
            (_, out), grads = step(q, k, v, jnp.asarray(segment_ids), w)
            (_, out_alone), grads_alone = step(alone(q), alone(k), alone(v), jnp.asarray(alone_ids), alone(w))
            (_, out_xla), grads_xla = loss_and_grads("xla", False, None, None)(q, k, v, jnp.asarray(segment_ids), w)
    except Exception as e:  # noqa: BLE001 - a failure is a result to record
        return dict(record, status="error", error=f"{type(e).__name__}: {e}"[:2000])

    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    worst = {"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}
    for i, (b, start, n) in enumerate(docs):
        sl = slice(start, start + n)
        worst["out"] = max(worst["out"], float(np.abs(f32(out[b, sl]) - f32(out_alone[i, :n])).max()))
        for name, g, g_alone in zip(("dq", "dk", "dv"), grads, grads_alone):
            scale = max(1.0, float(np.abs(f32(g_alone[i, :n])).max()))  # gradients grow with L: relative
            worst[name] = max(worst[name], float(np.abs(f32(g[b, sl]) - f32(g_alone[i, :n])).max()) / scale)
    padding = segment_ids == 0
    padding_zero = bool(np.all(f32(out)[padding] == 0)) and all(bool(np.all(f32(g)[padding] == 0)) for g in grads)
    finite = all(bool(np.all(np.isfinite(f32(x)))) for x in (out, *grads))
    vs_xla = max(float(np.abs(f32(a) - f32(b)).max()) for a, b in zip((out, *grads), (out_xla, *grads_xla)))
    ok = finite and padding_zero and max(worst.values()) <= TOLERANCE[dtype_name]
    return dict(
        record,
        status="pass" if ok else "FAIL",
        packed_vs_alone_max_err=worst,
        tolerance=TOLERANCE[dtype_name],
        padding_zero=padding_zero,
        finite=finite,
        max_abs_diff_vs_xla=vs_xla,
    )


# ----------------------------------------------------------------------------------------------- 2. timing


def time_step(impl: str, length: int, smoke: bool, repeats: int, max_segments: int | None = None, tag: str = ""):
    hq, hkv, head_dim, num_docs = (4, 2, 16, 3) if smoke else (32, 8, 128, 8)
    dtype = jnp.dtype(jnp.float32 if smoke else jnp.bfloat16)
    rows = [document_lengths(length, num_docs, seed=length)]
    record = dict(impl=impl + tag, L=length, q_heads=hq, kv_heads=hkv, head_dim=head_dim, dtype=dtype.name,
                  documents=num_docs, max_segments=max_segments)
    reason = unavailable_reason(impl, dtype, (length, hq, hkv, head_dim), max_segments, smoke)
    if reason is not None:
        return dict(record, status="unsupported", reason=reason)
    options = impl_options(impl, smoke, max_segments)
    segment_ids = jnp.asarray(segment_ids_for(rows, length))
    q, k, v = random_qkv(1, length, hq, hkv, head_dim, dtype)
    w = jnp.ones(q.shape, jnp.float32)
    try:
        start = time.perf_counter()
        compiled = loss_and_grads(impl, **options).lower(q, k, v, segment_ids, w).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(q, k, v, segment_ids, w))  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(q, k, v, segment_ids, w))
            times.append(time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - out of memory etc. is a result
        return dict(record, status="error", error=f"{type(e).__name__}: {e}"[:1000])
    median = statistics.median(times)
    flops = attention_flops(rows, hq, head_dim)
    return dict(
        record,
        status="ok",
        compile_s=round(compile_s, 3),
        fwd_bwd_ms=round(median * 1e3, 3),
        fwd_bwd_ms_all=[round(t * 1e3, 3) for t in times],
        useful_tflops=round(flops / median / 1e12, 2),
        temp_bytes=_temp_bytes(compiled),
    )


def _temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


# ----------------------------------------------------------------------------------------------- main


def device_name() -> str:
    kind = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: xla + pallas/tokamax (interpret)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="directory (or .json file) for the results")
    parser.add_argument("--lengths", type=int, nargs="*", default=None, help="timed L (default 4096 8192 16384)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per config (median reported)")
    parser.add_argument("--impls", nargs="*", default=None, choices=attention.IMPLEMENTATIONS[1:],
                        help="implementations to check and time (default: all; --smoke: xla pallas tokamax)")
    parser.add_argument("--skip-correctness", action="store_true")
    args = parser.parse_args(argv)

    impls = args.impls or (["xla", "pallas", "tokamax"] if args.smoke else ["xla", "cudnn", "tokamax", "pallas"])
    lengths = args.lengths or ([32] if args.smoke else [4096, 8192, 16384])
    repeats = args.repeats or (1 if args.smoke else 5)
    auto = attention.resolve("auto", jnp.bfloat16, lengths[0], 128, q_heads=32, kv_heads=8, max_segments=8)
    result = dict(
        command="python scripts/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        jax_version=jax.__version__,
        cudnn_version=_cudnn_version(),
        auto_choice_bf16_d128_gqa_32_8=auto.describe(),
        auto_picks=auto.impl,
        jax_packed_gqa_is_fixed=kernels.jax_packed_gqa_is_fixed(),
        correctness=[],
        timing=[],
    )
    out = Path(args.out)
    if out.suffix != ".json":
        day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        out = out / f"gpu_check-{device_name()}-{day}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def add(kind: str, record: dict) -> None:  # rewritten after every record: a run cut short keeps what it had
        result[kind].append(record)
        out.write_text(json.dumps(result, indent=1) + "\n")
        _print(record)

    out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.skip_correctness:
        dtypes = ["float32"] if args.smoke else ["bfloat16", "float32"]
        for shape in SMOKE_SHAPES if args.smoke else SHAPES:
            for impl in impls:
                for dtype_name in dtypes:
                    add("correctness", check_correctness(impl, dtype_name, args.smoke, shape))
    for length in lengths:
        for impl in impls:
            bounds = [(8, "(M=8)"), (length // 16, "(M=L//16)")] if impl == "cudnn" else [(None, "")]
            for bound, tag in bounds:
                if bound is not None and bound > 8 and length > 8192:
                    continue  # its B*M-sized buffers grow with L^2: at 16384 they may not fit
                add("timing", time_step(impl, length, args.smoke, repeats, max_segments=bound, tag=tag))
    print(f"wrote {out}")
    result["path"] = str(out)
    return result


def _cudnn_version() -> int | None:
    try:
        from jax._src.lib import cuda_versions

        return int(cuda_versions.cudnn_get_version()) if cuda_versions is not None else None
    except Exception:  # noqa: BLE001
        return None


def _print(record: dict) -> None:
    keys = ("impl", "dtype", "L", "status", "packed_vs_alone_max_err", "max_abs_diff_vs_xla", "fwd_bwd_ms",
            "useful_tflops", "compile_s", "reason", "error")
    print({k: record[k] for k in keys if k in record}, flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise SystemExit(1)
