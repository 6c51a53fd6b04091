"""The first GPU run's probe: what the device has, what `auto` picks there and why, whether each packed-attention
implementation is right at the models' real head shapes (bf16, head dim 128 and 64, GQA 32/8, L=2048), what the cuDNN
bound costs in memory, jsft's own train step on a tiny model, and (--timing) forward+backward times.

    python scripts/gpu_probe.py --out $OUT/probe.json                        # env + correctness (~1 min on a GPU)
    python scripts/gpu_probe.py --timing --lengths 8192 16384 --out $OUT/attn_timing.json
    python scripts/gpu_probe.py --smoke --out /tmp/probe.json                 # CPU: tiny shapes, emulated kernels

Each check is recorded, never raised: {"status": "pass" | "FAIL" | "error" | "unsupported", ...}. Errors are relative
L2 errors ||got - ref|| / ||ref|| over real tokens against a float32 reference (jsft's xla path on upcast inputs,
precision highest); bf16 measures 1e-3..1e-2. An implementation is called through jsft's packed_attention with an
explicit impl, so jsft's own probe (jsft.model.attention.probe) runs first: a kernel that fails it is an "error" with
the probe's message. The JSON is rewritten after every check, so a run cut short keeps what it measured. Imports no
grain or datasets (the GPU machine has neither).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jsft.model import attention, kernels  # noqa: E402
from jsft.model.attention import packed_attention  # noqa: E402

RESULT: dict = {}
OUT: Path | None = None


def save():
    if OUT is not None:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(RESULT, indent=1, default=str) + "\n")


def env_report() -> dict:
    info = dict(python=sys.version.split()[0], backend=jax.default_backend(), devices=[str(d) for d in jax.devices()])
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "transformers", "orbax.checkpoint", "ml_dtypes", "tokamax"):
        try:
            module = __import__(name, fromlist=["__version__"])
            info[name] = getattr(module, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            info[name] = f"missing ({type(e).__name__}: {e})"
    try:
        from jax._src.lib import cuda_versions

        if cuda_versions is not None:
            info["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
            info["cudnn"] = cuda_versions.cudnn_get_version()
    except Exception as e:  # noqa: BLE001
        info["cuda_versions_error"] = repr(e)
    d = jax.devices()[0]
    info.update(device_kind=d.device_kind, compute_capability=getattr(d, "compute_capability", None))
    try:
        info["memory_kinds"] = sorted(m.kind for m in d.addressable_memories())
    except Exception as e:  # noqa: BLE001
        info["memory_kinds"] = repr(e)
    info["bytes_limit"] = (d.memory_stats() or {}).get("bytes_limit")
    info["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    info["XLA_PYTHON_CLIENT_MEM_FRACTION"] = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    info["command_buffers_exclude_cudnn"] = kernels.command_buffers_exclude_cudnn()
    info["cudnn_unavailable_reason_bf16_d128"] = kernels.cudnn_unavailable_reason(jnp.bfloat16, 128)
    info["jax_packed_gqa_is_fixed"] = kernels.jax_packed_gqa_is_fixed()
    return info


def auto_choices(smoke: bool) -> dict:
    """What impl="auto" runs for the two models' attention (L=8192, bf16, GQA 32/8, 8 documents a row) and why:
    jsft's own probes of cudnn, tokamax, pallas (each a tiny packed forward+backward against float32)."""
    dtype = jnp.float32 if smoke else jnp.bfloat16
    choices = {}
    for name, head_dim in (("8b_d128", 128), ("1b_d64", 64)):
        start = time.perf_counter()
        choice = attention.resolve("auto", dtype, 8192, head_dim, q_heads=32, kv_heads=8, max_segments=8)
        seconds = round(time.perf_counter() - start, 2)
        choices[name] = dict(impl=choice.impl, describe=choice.describe(), seconds=seconds)
        print(f"auto {name}: {choice.describe()}", flush=True)
    return choices


# ----------------------------------------------------------------------------------------------- inputs


def rows_of(length: int, docs_per_row: list[int], seed: int) -> list[list[int]]:
    """Document lengths per row: docs_per_row[i] documents filling ~90% of row i (the rest is tail padding)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in docs_per_row:
        w = rng.uniform(0.3, 1.0, n)
        rows.append([int(x) for x in np.maximum(1, np.floor(w / w.sum() * 0.9 * length))])
    return rows


def segment_ids_for(rows: list[list[int]], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for r, lengths in enumerate(rows):
        start = 0
        for i, n in enumerate(lengths):
            out[r, start : start + n] = i + 1
            start += n
    return out


def rel(a, b, where) -> float:
    """||a - b|| / ||b|| over the positions `where` ([B, L] bool), in float64 on the host."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = np.broadcast_to(np.asarray(where)[:, :, None, None], a.shape)
    num, den = np.linalg.norm((a - b)[m]), np.linalg.norm(b[m])
    return float(num / den) if den > 0 else float(num)


# ----------------------------------------------------------------------------------------------- correctness


def fwd_bwd(impl, q, k, v, seg, w, **kw):
    def loss(q, k, v):
        out = packed_attention(q, k, v, seg, impl=impl, **kw)
        return (out.astype(jnp.float32) * w).sum(), out

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    lowered = f.lower(q, k, v)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    (_, out), grads = compiled(q, k, v)
    jax.block_until_ready((out, grads))
    temp = None
    try:
        temp = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001
        pass
    return out, grads, compile_s, temp


_REFERENCES: dict = {}


def check(name: str, impl: str, B: int, L: int, hq: int, hkv: int, D: int, docs: list[int], smoke: bool,
          tol: float, **kw) -> dict:
    record = dict(name=name, impl=impl, B=B, L=L, q_heads=hq, kv_heads=hkv, head_dim=D, docs_per_row=docs,
                  options={k: v for k, v in kw.items()})
    start = time.perf_counter()
    try:
        dtype = jnp.float32 if smoke else jnp.bfloat16
        rows = rows_of(L, docs, seed=L + D + hq)
        seg = jnp.asarray(segment_ids_for(rows, L))
        rng = np.random.default_rng(hq * 1000 + D)
        shapes = [(B, L, hq, D), (B, L, hkv, D), (B, L, hkv, D)]
        q, k, v = (jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes)
        w = jnp.asarray(rng.standard_normal((B, L, hq, D), np.float32))
        out, grads, compile_s, temp = fwd_bwd(impl, q, k, v, seg, w, **kw)
        key = (B, L, hq, hkv, D, tuple(docs), jnp.dtype(dtype).name)
        if key not in _REFERENCES:  # the float32 reference: jsft's xla path on upcast inputs, once per input set
            with jax.default_matmul_precision("highest"):
                ref_out, ref_grads, _, _ = fwd_bwd("xla", *(x.astype(jnp.float32) for x in (q, k, v)), seg, w)
            _REFERENCES[key] = (np.asarray(ref_out, np.float32), [np.asarray(g, np.float32) for g in ref_grads])
        ref_out, ref_grads = _REFERENCES[key]
        real = np.asarray(seg) > 0
        pad = ~real
        f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
        errs = {"out": rel(out, ref_out, real)}
        for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            errs[n] = rel(g, r, real)
        finite = all(bool(np.all(np.isfinite(f32(x)))) for x in (out, *grads))
        pad_zero = bool(np.all(f32(out)[pad] == 0)) and all(bool(np.all(f32(g)[pad] == 0)) for g in grads)
        ok = finite and pad_zero and max(errs.values()) <= tol
        record.update(status="pass" if ok else "FAIL", rel_err_vs_f32=errs, tol=tol, finite=finite,
                      padding_zero=pad_zero, compile_s=round(compile_s, 2), temp_bytes=temp)
    except Exception as e:  # noqa: BLE001 - a failure is a result
        record.update(status="error", error=f"{type(e).__name__}: {e}"[:3000], trace=traceback.format_exc()[-3000:])
    record["wall_s"] = round(time.perf_counter() - start, 2)
    return record


def plain_cudnn_check(smoke: bool) -> dict:
    """Not jsft: jax.nn.dot_product_attention(implementation="cudnn", is_causal=True), fwd+bwd, vs xla in f32. Tells a
    broken cuDNN-on-CUDA-13 (jax-ml/jax#32430; jax's own tests skip cuDNN attention on CUDA >= 13) from a problem in
    the packed layout."""
    record = dict(name="plain_cudnn_causal", B=1, L=2048, heads=8, head_dim=128)
    if smoke or jax.default_backend() != "gpu":
        return dict(record, status="unsupported", reason="needs a GPU")
    start = time.perf_counter()
    try:
        rng = np.random.default_rng(7)
        q, k, v = (jnp.asarray(rng.standard_normal((1, 2048, 8, 128), np.float32), jnp.bfloat16) for _ in range(3))
        w = jnp.asarray(rng.standard_normal((1, 2048, 8, 128), np.float32))

        def run(impl, q, k, v):
            def loss(q, k, v):
                out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
                return (out.astype(jnp.float32) * w).sum(), out

            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

        (_, out), grads = run("cudnn", q, k, v)
        with jax.default_matmul_precision("highest"):
            (_, ref), ref_grads = run("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
        everywhere = np.ones((1, 2048), bool)
        errs = {"out": rel(out, ref, everywhere)}
        errs.update({n: rel(g, r, everywhere) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
        ok = max(errs.values()) < 2e-2
        record.update(status="pass" if ok else "FAIL", rel_err_vs_f32=errs)
    except Exception as e:  # noqa: BLE001
        record.update(status="error", error=f"{type(e).__name__}: {e}"[:3000])
    record["wall_s"] = round(time.perf_counter() - start, 2)
    return record


def correctness(smoke: bool) -> None:
    tol = 1e-4 if smoke else 2e-2
    RESULT["checks"] = checks = []

    def add(rec):
        checks.append(rec)
        save()
        print({k: rec.get(k) for k in ("name", "status", "rel_err_vs_f32", "temp_bytes", "compile_s", "error")},
              flush=True)

    add(plain_cudnn_check(smoke))
    if smoke:  # the plumbing only (pallas' slow CPU emulation has its own tests)
        add(check("tokamax_interpret_gqa", "tokamax", 2, 64, 4, 2, 16, [5, 3], smoke, tol, interpret=True))
        add(trainer_step_check(smoke))
        return
    # the 8B attention: 32 q heads, 8 kv heads, head dim 128; rows of 5 and 3 documents + tail padding
    shape = dict(B=2, L=2048, hq=32, hkv=8, D=128, docs=[5, 3])
    add(check("cudnn_gqa_d128_tightM", "cudnn", **shape, smoke=smoke, tol=tol, max_segments=5))
    # a loose bound (L // 16 = 128): what jax's B*M layout costs in temp memory
    add(check("cudnn_gqa_d128_looseM", "cudnn", **shape, smoke=smoke, tol=tol, max_segments=128))
    # GQA by repeated k/v heads (the path for jax <= 0.11.0): must agree with the native one
    real_fixed = kernels.jax_packed_gqa_is_fixed
    kernels.jax_packed_gqa_is_fixed = lambda: False
    try:
        add(check("cudnn_gqa_repeated_d128_tightM", "cudnn", **shape, smoke=smoke, tol=tol, max_segments=5))
    finally:
        kernels.jax_packed_gqa_is_fixed = real_fixed
    add(check("tokamax_gqa_d128", "tokamax", **shape, smoke=smoke, tol=tol))
    add(check("pallas_gqa_d128", "pallas", **shape, smoke=smoke, tol=tol))
    # the 1B attention: head dim 64
    d64 = dict(shape, D=64)
    add(check("cudnn_gqa_d64_tightM", "cudnn", **d64, smoke=smoke, tol=tol, max_segments=5))
    add(check("tokamax_gqa_d64", "tokamax", **d64, smoke=smoke, tol=tol))
    add(check("pallas_gqa_d64", "pallas", **d64, smoke=smoke, tol=tol))
    add(check("xla_gqa_d128_bf16", "xla", **shape, smoke=smoke, tol=tol))
    add(trainer_step_check(smoke))  # the trainer's path (mesh, jsft's optimizer, remat, chunked loss), auto attention


def trainer_step_check(smoke: bool, impl: str = "auto") -> dict:
    """The trainer's own path, tiny: jsft.step.train_step + jsft.optim's AdamW under a 1-device mesh
    (jax.set_mesh, as jsft.train always runs), bf16, head dim 128, packed rows, attention `impl` with the data's
    documents-per-row bound. Three steps: finite, the loss falls, one compile."""
    record = dict(name=f"trainer_step_tiny_mesh_{impl}", impl=impl)
    start = time.perf_counter()
    try:
        from flax import nnx

        import gpu as bench
        from jsft import sharding, step
        from jsft.config import TrainingConfig
        from jsft.model.llama import Llama, LlamaConfig
        from jsft.optim import make_optimizer, trainable_filter

        hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=1024, hidden_size=1024,
                  intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=128, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500000.0)
        if smoke:
            hf.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16, vocab_size=384)
        B, L = (2, 64) if smoke else (2, 1024)
        dtype = jnp.float32 if smoke else jnp.bfloat16
        cfg = LlamaConfig.from_hf(hf)
        mesh = sharding.create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
        model = sharding.create_sharded_model(
            lambda: Llama(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, compute_dtype=dtype, attention_impl=impl,
                          remat_policy="full"), mesh)
        rows = bench.packed_batch(B, L, cfg.vocab_size, mean_doc=max(2, L // 8), seed=1)
        bound = int(rows["segment_ids"].max())
        model.set_max_segments(bound)
        tx, schedule = make_optimizer(TrainingConfig(learning_rate=1e-3), total_steps=10)
        optimizer = sharding.create_sharded_optimizer(model, tx, trainable_filter(lora=False), mesh)
        batch = sharding.shard_batch({k: v[None] for k, v in rows.items()}, mesh)
        step.train_step.jitted_fn.clear_cache()
        losses, times = [], []
        with jax.set_mesh(mesh):
            for _ in range(3):
                t0 = time.perf_counter()
                metrics = step.train_step(model, optimizer, batch, loss_type="nll", chunk_size=1024,
                                          schedule=schedule)
                losses.append(float(metrics["loss"]))
                times.append(round(time.perf_counter() - t0, 3))
        compiles = step.train_step.jitted_fn._cache_size()
        ok = all(np.isfinite(losses)) and losses[-1] < losses[0] and compiles == 1
        record.update(status="pass" if ok else "FAIL", losses=losses, step_s=times, jit_cache_size=compiles,
                      attention_used=attention.resolve(impl, dtype, L, cfg.head_dim, q_heads=cfg.num_heads,
                                                       kv_heads=cfg.num_kv_heads, max_segments=bound).describe())
    except Exception as e:  # noqa: BLE001
        record.update(status="error", error=f"{type(e).__name__}: {e}"[:3000], trace=traceback.format_exc()[-3000:])
    record["wall_s"] = round(time.perf_counter() - start, 2)
    return record


# ----------------------------------------------------------------------------------------------- timing


def timing(lengths: list[int], repeats: int, smoke: bool) -> None:
    """gpu_check.time_step (one fwd+bwd, 32/8 heads, head dim 128, 8 documents a row) per implementation and L.
    cuDNN with the tight bound (8) and, at L <= 8192 only, a loose L // 16 (its B*M-sized buffers grow with L^2; at
    16384 they may not fit)."""
    import gpu_check

    RESULT["timing"] = records = []
    impls = ("xla", "tokamax") if smoke else ("cudnn", "tokamax", "xla", "pallas")
    for length in lengths:
        for impl in impls:
            bounds = [(8, "(M=8)")] + ([(length // 16, "(M=L//16)")] if length <= 8192 else [])
            for bound, tag in bounds if impl == "cudnn" else [(None, "")]:
                rec = gpu_check.time_step(impl, length, smoke, repeats, max_segments=bound, tag=tag)
                records.append(rec)
                save()
                print({k: rec.get(k) for k in ("impl", "L", "status", "fwd_bwd_ms", "useful_tflops", "compile_s",
                                              "temp_bytes", "reason", "error")}, flush=True)


def main(argv=None):
    global OUT
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--timing", action="store_true", help="time instead of checking correctness")
    p.add_argument("--lengths", type=int, nargs="*", default=None, help="timed L (default 8192 16384; smoke 32)")
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    OUT = Path(args.out)
    RESULT.clear()
    RESULT.update(command="python scripts/gpu_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    RESULT["env"] = env_report()
    print(json.dumps(RESULT["env"], default=str), flush=True)
    save()
    if args.timing:
        timing(args.lengths or ([32] if args.smoke else [8192, 16384]), args.repeats or (1 if args.smoke else 5),
               args.smoke)
    else:
        RESULT["auto"] = auto_choices(args.smoke)
        save()
        correctness(args.smoke)
    save()
    return RESULT


if __name__ == "__main__":
    main()
