"""Packed causal attention: each document of a packed row attends only to itself, causally.

One public function, `packed_attention(q, k, v, segment_ids, impl=...)`, and the rule for which implementation
(jsft/model/kernels.py) runs:

    xla      the XLA mask path: runs everywhere (CPU tests); O(L^2) memory, so it is the reference.
    cudnn    cuDNN flash attention, packed layout (Hopper+, cuDNN >= 9.6, bf16/fp16, a documents-per-row bound).
    tokamax  tokamax's Mosaic GPU flash attention (sm90/sm100, bf16/fp16; the optional extra `jsft[tokamax]`).
    pallas   jax's Pallas/Triton flash kernel (deprecated upstream; no GQA in the kernel, no block skipping).
    auto     CPU/TPU, or float32: xla, nothing probed. GPU with bf16/fp16: the first of cudnn -> tokamax -> pallas
             (AUTO_ORDER: flash kernels before the O(L^2) mask, cuDNN's ragged layout and tokamax's block skipping
             before Triton) that passes its static checks AND its probe; else xla.

The probe (`probe`) is what makes a GPU run safe to start: a static check (compute capability, cuDNN version)
cannot tell whether a kernel builds on this machine (jax's own cuDNN-attention tests are skipped on CUDA 13), so
before a kernel is used it must compile, run and match the float32 XLA reference on a tiny packed forward+backward
with the model's head dim, GQA ratio and dtype: rows with several documents and tail padding, a row of one document,
a row of padding only. Each probe runs once per process (cached by implementation, dtype, head dim, heads, bound),
in a thread of its own (so it runs eagerly even when first asked inside a jit trace, outside any mesh). Under
"auto" a failed probe falls to the next candidate; an explicit impl whose probe fails raises AttentionUnavailable
with the probe's error and the alternatives. `resolve` returns the `Choice` with why each earlier candidate was not
used: the train plan prints it. A CUDA error that kills the process (an illegal memory access) cannot be caught by
any probe: the known one, cuDNN 9.13/9.14 inside CUDA graphs, is refused up front (kernels.cudnn_unavailable_reason).

Contract (all implementations): q [B, L, Hq, D], k/v [B, L, Hkv, D] with Hq % Hkv == 0; segment_ids [B, L] int32,
1, 2, 3 ... per document, 0 = padding at the tail. Output [B, L, Hq, D] in q's dtype; softmax in float32; rows
of padding (segment 0) are exactly zero, and their gradients are zero and finite, also for a row that is all
padding. Tiny example (one row, two documents and one pad):

    segment_ids = [[1, 1, 2, 2, 0]]
    token 1 attends to token 0 and 1 (document 1); token 3 attends to 2 and 3 (document 2); token 4 -> zeros.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jsft.model import kernels
from jsft.model.kernels import count_segments, cudnn_bound, segment_offsets  # noqa: F401 - part of the public face

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "tokamax", "pallas")
AUTO_ORDER = ("cudnn", "tokamax", "pallas")  # tried in this order on a GPU; xla is the fallback, never probed
PROBE_LENGTH = 256  # a multiple of every kernel's block (pallas 128, tokamax's query tile 128)
PROBE_ROWS = ((70, 41, 93), (PROBE_LENGTH,), ())  # documents per row: 3 + 52 pads; one full row; padding only
PROBE_TOLERANCE = 2e-2  # relative L2 error vs float32, out/dq/dk/dv; bf16 kernels measure ~3e-3..1e-2


class AttentionUnavailable(RuntimeError):
    """The requested attention implementation cannot run on this device; the message says why and what to use."""


# ----------------------------------------------------------------------------------------------- the public face


def packed_attention(
    q,
    k,
    v,
    segment_ids,
    *,
    impl: str = "auto",
    scale: float | None = None,
    max_segments: int | None = None,
    interpret: bool = False,
    block_size: int | None = None,
):
    """Causal attention inside each document of packed rows. Returns [B, L, Hq, D] in q.dtype.

    impl: "auto" | "xla" | "cudnn" | "tokamax" | "pallas" (see the module docstring). Anything but xla is probed
        on first use (unless `interpret`).
    scale: logit scale, default 1/sqrt(D).
    max_segments (cudnn; auto tries cudnn only when it is given): the most documents one row holds (the data side
        counts them). cuDNN runs with `cudnn_bound(max_segments, L)` (rounded up to a power of two); a row with
        more documents than that gives NaN outputs for that row (loud, never silently wrong).
    interpret (pallas, tokamax): run on CPU for tests: pallas in Pallas interpret mode, tokamax with its own XLA
        implementation of the same mask (see kernels.tokamax_attention). Not probed.
    block_size (pallas, xla): pallas: sequence block of the kernel, default min(128, L); L must be a multiple of it.
        xla: query block, default `kernels.xla_query_block(L)`.

    Example (fp32, CPU):
        >>> q = k = v = jnp.ones((1, 4, 2, 8))
        >>> out = packed_attention(q, k, v, jnp.array([[1, 1, 2, 0]]), impl="xla")
        >>> out[0, :, 0, 0].tolist()   # padding token 3 -> 0
        [1.0, 1.0, 1.0, 0.0]
    """
    _check_shapes(q, k, v, segment_ids)
    if impl != "auto" and impl not in kernels.KERNELS:
        raise ValueError(f"attention impl={impl!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    if not (interpret and impl in ("pallas", "tokamax")):
        impl = resolve(impl, q.dtype, q.shape[1], q.shape[-1], q_heads=q.shape[2], kv_heads=k.shape[2],
                       max_segments=max_segments).impl
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return kernels.KERNELS[impl](q, k, v, segment_ids.astype(jnp.int32), scale, max_segments=max_segments,
                                 interpret=interpret, block_size=block_size)


# ----------------------------------------------------------------------------------------------- which one runs


@dataclasses.dataclass(frozen=True)
class Choice:
    """The implementation that runs, why, and why each candidate before it in auto's order did not."""

    impl: str
    why: str
    not_used: tuple[tuple[str, str], ...] = ()  # (candidate, reason), in the order they were tried

    def describe(self) -> str:
        """'tokamax (probe passed: ...; not cudnn: its probe failed: ...)' -- one line for the plan."""
        others = "".join(f"; not {name}: {reason}" for name, reason in self.not_used)
        return f"{self.impl} ({self.why}{others})"


def resolve(impl: str, dtype, length: int, head_dim: int, *, q_heads: int, kv_heads: int,
            max_segments: int | None = None) -> Choice:
    """The Choice for `impl` at these shapes on this device. "auto": the first candidate of `auto_candidates` that
    passes its static checks and its probe, else xla. An explicit impl: itself once its probe passed, else
    AttentionUnavailable (the probe's error, and the alternatives)."""
    shapes = dict(dtype=dtype, length=length, head_dim=head_dim, q_heads=q_heads, kv_heads=kv_heads,
                  max_segments=max_segments)
    if impl == "xla":
        return Choice("xla", "the XLA mask path, runs everywhere")
    if impl != "auto":
        reason, why = _try(impl, **shapes)
        if reason is not None:
            raise AttentionUnavailable(
                f"attention impl={impl!r} cannot run: {reason}. Alternatives: model.attention_impl='auto' (probes "
                f"{', '.join(AUTO_ORDER)} on this device and falls back to 'xla'), or 'xla' (runs everywhere)."
            )
        return Choice(impl, why)
    candidates = auto_candidates(dtype)
    if not candidates:
        return Choice("xla", f"no flash kernel is tried on {jax.default_backend()} with {jnp.dtype(dtype).name}")
    not_used = []
    for candidate in candidates:
        reason, why = _try(candidate, **shapes)
        if reason is None:
            return Choice(candidate, why, tuple(not_used))
        not_used.append((candidate, reason))
    return Choice("xla", "the XLA mask path, the fallback", tuple(not_used))


def choose_impl(dtype, length: int, head_dim: int, *, q_heads: int, kv_heads: int,
                max_segments: int | None = None) -> str:
    """What impl="auto" runs: resolve("auto", ...).impl. choose_impl(jnp.bfloat16, 4096, 128, q_heads=32,
    kv_heads=8) on CPU -> "xla"."""
    return resolve("auto", dtype, length, head_dim, q_heads=q_heads, kv_heads=kv_heads,
                   max_segments=max_segments).impl


def auto_candidates(dtype) -> tuple[str, ...]:
    """The implementations "auto" tries, best first: AUTO_ORDER on a GPU with bf16/fp16 inputs, else none."""
    if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in kernels.HALF:
        return ()
    return AUTO_ORDER


def _try(impl, *, dtype, length, head_dim, q_heads, kv_heads, max_segments) -> tuple[str | None, str]:
    """(None, why it is used) when `impl` passes its static checks and its probe, else (the reason, "")."""
    reason = kernels.unavailable_reason(impl, dtype, length, head_dim, max_segments)
    if reason is not None:
        return reason, ""
    bound = cudnn_bound(max_segments, PROBE_LENGTH) if impl == "cudnn" else None
    result = probe(impl, jnp.dtype(dtype).name, head_dim, q_heads, kv_heads, bound)
    if not result.passed:
        return f"its probe failed: {result.detail}", ""
    return None, f"probe passed: {result.detail}"


# ----------------------------------------------------------------------------------------------- the probe


@dataclasses.dataclass(frozen=True)
class Probe:
    impl: str
    passed: bool
    detail: str  # "max rel err 4.1e-03 vs float32 (tolerance 2e-02) in 1.9 s", or what went wrong
    errors: tuple[tuple[str, float], ...] = ()  # (out|dq|dk|dv, relative L2 error vs float32)


@functools.cache
def probe(impl: str, dtype_name: str, head_dim: int, q_heads: int, kv_heads: int,
          max_segments: int | None = None) -> Probe:
    """Compile and run `impl` on a tiny packed forward+backward here and compare it with the float32 reference.

    Inputs: PROBE_ROWS (a row of 3 documents and tail padding, one full row, one padding-only row; at most
    max_segments documents a row) of PROBE_LENGTH tokens, q_heads/kv_heads heads of head_dim, in dtype_name.
    Passed: everything finite, padding outputs and gradients exactly 0, and the relative L2 error of out, dq, dk,
    dv over real tokens <= PROBE_TOLERANCE against kernels.xla_attention on float32 copies (precision highest).
    Any exception (no kernel image, an unsupported shape, a compile failure) is a failed probe, never raised.
    Cached per process; runs in a fresh thread (no caller's trace or mesh). Clear with probe.cache_clear().
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_probe, impl, dtype_name, head_dim, q_heads, kv_heads, max_segments).result()


def _probe(impl, dtype_name, head_dim, q_heads, kv_heads, max_segments) -> Probe:
    start = time.perf_counter()
    try:
        inputs = probe_inputs(dtype_name, head_dim, q_heads, kv_heads, max_segments)
        got = _fwd_bwd(impl, max_segments)(*inputs)
        reference = _probe_reference(dtype_name, head_dim, q_heads, kv_heads, max_segments)
        got = [np.asarray(x, np.float32) for x in got]
    except Exception as e:  # noqa: BLE001 - whatever stops a kernel here is the probe's answer
        message = " ".join(f"{type(e).__name__}: {e}".split())
        return Probe(impl, False, message[:600] + (" ..." if len(message) > 600 else ""))
    seconds = time.perf_counter() - start
    real = np.asarray(inputs[3]) > 0
    if not all(np.all(np.isfinite(x)) for x in got):
        return Probe(impl, False, f"non-finite outputs or gradients (in {seconds:.1f} s)")
    if not all(np.all(x[~real] == 0) for x in got):
        return Probe(impl, False, f"padding outputs or gradients are not zero (in {seconds:.1f} s)")
    errors = tuple((name, _relative_error(x, ref, real)) for name, x, ref in zip(("out", "dq", "dk", "dv"), got,
                                                                                 reference))
    worst_name, worst = max(errors, key=lambda item: item[1])
    verdict = "max" if worst <= PROBE_TOLERANCE else f"{worst_name}"
    detail = f"{verdict} rel err {worst:.1e} vs float32 (tolerance {PROBE_TOLERANCE:.0e}) in {seconds:.1f} s"
    return Probe(impl, worst <= PROBE_TOLERANCE, detail, errors)


def probe_inputs(dtype_name, head_dim, q_heads, kv_heads, max_segments=None):
    """(q, k, v, segment_ids, w) as numpy arrays: the probe's rows, random normal q/k/v in dtype_name, and the
    float32 weights w of the loss sum(out * w) whose gradients the probe compares."""
    rng = np.random.default_rng(head_dim * 1000 + q_heads * 10 + kv_heads)
    segment_ids = np.zeros((len(PROBE_ROWS), PROBE_LENGTH), np.int32)
    for row, lengths in enumerate(PROBE_ROWS):
        at = 0
        for doc, n in enumerate(lengths[:max_segments]):
            segment_ids[row, at : at + n] = doc + 1
            at += n
    dtype = jnp.dtype(dtype_name)
    shapes = [(len(PROBE_ROWS), PROBE_LENGTH, heads, head_dim) for heads in (q_heads, kv_heads, kv_heads)]
    q, k, v = (rng.standard_normal(shape, np.float32).astype(dtype) for shape in shapes)
    return q, k, v, segment_ids, rng.standard_normal(shapes[0], np.float32)


def _fwd_bwd(impl, max_segments):
    """jit: (q, k, v, segment_ids, w) -> (out, dq, dk, dv) of sum(kernel(q, k, v) * w)."""

    def loss(q, k, v, segment_ids, w):
        out = kernels.KERNELS[impl](q, k, v, segment_ids, q.shape[-1] ** -0.5, max_segments=max_segments)
        return (out.astype(jnp.float32) * w).sum(), out

    def run(q, k, v, segment_ids, w):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, segment_ids, w)
        return (out, *grads)

    return jax.jit(run)


@functools.cache
def _probe_reference(dtype_name, head_dim, q_heads, kv_heads, max_segments):
    q, k, v, segment_ids, w = probe_inputs(dtype_name, head_dim, q_heads, kv_heads, max_segments)
    with jax.default_matmul_precision("highest"):
        got = _fwd_bwd("xla", None)(*(x.astype(np.float32) for x in (q, k, v)), segment_ids, w)
    return [np.asarray(x, np.float32) for x in got]


def _relative_error(got, reference, real) -> float:
    """||got - reference|| / ||reference|| over the real tokens (float64 on the host)."""
    diff = (got.astype(np.float64) - reference)[real]
    norm = np.linalg.norm(reference.astype(np.float64)[real])
    return float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff))


# ----------------------------------------------------------------------------------------------- the plan


CUDNN_MEMORY_SHARE = 0.10  # warn when cuDNN's worst-case backward buffer exceeds this share of device memory


def plan_report(impl: str, dtype, length: int, head_dim: int, *, q_heads: int, kv_heads: int,
                max_segments: int | None, rows_per_device: int, heads_per_device: int,
                device_bytes: int | None) -> tuple[dict, list[str]]:
    """What the train plan says about attention: (entries for the plan dict, lines to print).

    Resolves `impl` here (probing; an explicit impl that cannot run raises AttentionUnavailable before any compile),
    and for cuDNN warns when rows * M * heads * L * head_dim * 4 bytes (kernels.cudnn_backward_bytes, per device)
    exceed CUDNN_MEMORY_SHARE of the device's memory (device_bytes; None on CPU: no warning).
    """
    choice = resolve(impl, dtype, length, head_dim, q_heads=q_heads, kv_heads=kv_heads, max_segments=max_segments)
    entries = {"attention_impl": choice.impl, "attention_choice": choice.describe()}
    lines = [f"attention {choice.describe()}; model.attention_impl={impl!r}, at most {max_segments} documents a row"]
    if choice.impl == "cudnn":
        bound = cudnn_bound(max_segments, length)
        need = kernels.cudnn_backward_bytes(rows_per_device, max_segments, heads_per_device, length, head_dim)
        entries.update(cudnn_bound=bound, cudnn_backward_bytes=need)
        if device_bytes and need > CUDNN_MEMORY_SHARE * device_bytes:
            lines.append(
                f"WARNING: cuDNN's packed backward may need {need:,} bytes ({need / 2**30:.1f} GiB, rows "
                f"{rows_per_device} x bound {bound} x heads {heads_per_device} x L {length} x head dim {head_dim} x 4) per call, more "
                f"than {CUDNN_MEMORY_SHARE:.0%} of the device's {device_bytes / 2**30:.1f} GiB. To need less: fewer "
                "documents a row (the bound is the data's most, rounded up to a power of two), shorter rows, fewer "
                "rows per device, or model.attention_impl='tokamax' (no such buffer)")
    return entries, lines


# ----------------------------------------------------------------------------------------------- checks


def _check_shapes(q, k, v, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention wants q/k/v [B, L, H, D]; got q{q.shape} k{k.shape} v{v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k{k.shape} and v{v.shape} must have the same shape")
    b, length, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != length or k.shape[3] != d:
        raise ValueError(f"attention: q{q.shape} and k{k.shape} differ in batch, length or head dim")
    if hq % k.shape[2]:
        raise ValueError(f"attention: {hq} query heads is not a multiple of {k.shape[2]} kv heads")
    if segment_ids.shape != (b, length):
        raise ValueError(f"attention: segment_ids{segment_ids.shape} must be [B, L] = {(b, length)}")


__all__ = ["packed_attention"]
