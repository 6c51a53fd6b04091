"""Packed causal attention: each document of a packed row attends only to itself, causally.

One public function, `packed_attention(q, k, v, segment_ids, impl=...)`, with three implementations:

    xla     jax.nn.dot_product_attention with a block-diagonal causal [B, 1, L, L] mask. Runs everywhere (CPU
            tests); O(L^2) memory, so it is the reference, not the fast path. Rows are cut into up to 4 query
            blocks (`xla_query_block`), each attending to the keys before its end only: the all-masked upper
            triangle (37.5% of the L x L work with 4 blocks) is never computed.
    cudnn   cuDNN flash attention in packed ("ragged") layout: segment starts and lengths instead of a mask,
            through the private jax._src.cudnn.fused_attention_stablehlo.dot_product_attention. Needs an NVIDIA
            Hopper (sm90+) GPU, cuDNN >= 9.6 and bf16/fp16 inputs. GQA native (k/v not repeated) only where jax
            computes packed kv offsets right (after 0.11.0, see `jax_packed_gqa_is_fixed`); else k/v repeated.
    pallas  the Pallas/Triton flash kernel jax.experimental.pallas.ops.gpu.attention.mha, which takes segment ids
            itself. No GQA in that kernel: k/v heads are repeated. `interpret=True` runs it on CPU (slowly).
            Under a mesh (`jax.set_mesh`) it runs per device shard (`per_device_shard`); cuDNN's call carries
            its own partitioning rules and xla is plain XLA, so both shard without help.
    auto    CPU/TPU: xla. GPU, bf16/fp16: cudnn when it is usable (sm90+, cuDNN >= 9.6, head dim a multiple
            of 8 and <= 256) AND the caller gives `max_segments` (the data side knows how many documents a row
            holds; a guessed bound could make rows NaN); else pallas when L is a multiple of 128 (its block)
            (segment ids natively, no bound, always correct); else xla. GPU, float32: xla. This order is the
            expected one (flash kernels beat an O(L^2) mask; cuDNN beats Triton), not yet measured here:
            scripts/gpu_check.py measures all three on a device.

Contract (all implementations): q [B, L, Hq, D], k/v [B, L, Hkv, D] with Hq % Hkv == 0; segment_ids [B, L] int32,
1, 2, 3 ... per document, 0 = padding at the tail. Output [B, L, Hq, D] in q's dtype; softmax in float32; rows
of padding (segment 0) are exactly zero, and their gradients are zero and finite, also for a row that is all
padding. Tiny example (one row, two documents and one pad):

    segment_ids = [[1, 1, 2, 2, 0]]
    token 1 attends to token 0 and 1 (document 1); token 3 attends to 2 and 3 (document 2); token 4 -> zeros.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
CUDNN_MIN_VERSION = 90600  # packed (ragged) layout in cuDNN flash attention
PALLAS_BLOCK = 128  # default Pallas block along the sequence (forward); backward blocks are 32
XLA_QUERY_BLOCKS, XLA_MIN_QUERY_BLOCK = 4, 128  # xla path: up to 4 causal query blocks of >= 128 rows


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

    impl: "auto" | "xla" | "cudnn" | "pallas" (see the module docstring).
    scale: logit scale, default 1/sqrt(D).
    max_segments (cudnn; and auto, which picks cudnn only when it is given): static bound M on the number of
        documents in one row; None means `default_max_segments(L)` = max(2, L // 16) for impl="cudnn". A row
        with more documents than M gives NaN outputs for that row (loud, never silently wrong).
    interpret (pallas only): run the Pallas kernel in interpret mode (CPU tests).
    block_size (pallas, xla): pallas: sequence block of the kernel, default min(128, L); L must be a multiple of it.
        xla: query block, default `xla_query_block(L)`.

    Example (fp32, CPU):
        >>> q = k = v = jnp.ones((1, 4, 2, 8))
        >>> out = packed_attention(q, k, v, jnp.array([[1, 1, 2, 0]]), impl="xla")
        >>> out[0, :, 0, 0].tolist()   # padding token 3 -> 0
        [1.0, 1.0, 1.0, 0.0]
    """
    _check_shapes(q, k, v, segment_ids)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl={impl!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    if impl == "auto":
        impl = choose_impl(q.dtype, q.shape[1], q.shape[-1], max_segments=max_segments)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    segment_ids = segment_ids.astype(jnp.int32)
    if impl == "xla":
        return _xla_attention(q, k, v, segment_ids, scale, block_size or xla_query_block(q.shape[1]))
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, segment_ids, scale, max_segments)
    return _pallas_attention(q, k, v, segment_ids, scale, interpret=interpret, block_size=block_size)


def choose_impl(dtype, seq_len: int, head_dim: int, max_segments: int | None = None) -> str:
    """The rule behind impl="auto" (see the module docstring). choose_impl(jnp.bfloat16, 4096, 128) on CPU -> "xla"."""
    if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "xla"
    if max_segments is not None and cudnn_unavailable_reason(dtype, head_dim) is None:
        return "cudnn"
    if seq_len % PALLAS_BLOCK == 0:
        return "pallas"
    return "xla"


# ----------------------------------------------------------------------------------------------- xla: the reference


def segment_mask(segment_ids):
    """[B, L] -> [B, 1, L, L] bool: query i sees key j when both are in the same segment and j <= i.

    Padding (segment 0) sees earlier padding, so no row is empty (no NaN); its output is zeroed afterwards.
        segment_ids [[1, 1, 2]] -> [[[[1, 0, 0], [1, 1, 0], [0, 0, 1]]]]
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return (same & causal)[:, None]


def xla_query_block(length: int) -> int:
    """Query rows per block of the xla path: L / 4 rounded up, at least 128 (so L <= 128 is one block).

    4 blocks skip 37.5% of the L x L work; more would skip more but compile slower. Measured on a 2-core CPU (L=512,
    4-layer 3.3M-param Llama, float32, [8, 512] rows): train step 2.37 -> 2.07 CPU s, compile 2.5 -> 4.4 s.
    """
    return max(XLA_MIN_QUERY_BLOCK, -(-length // XLA_QUERY_BLOCKS))


def _xla_attention(q, k, v, segment_ids, scale, block: int):
    """Causal, so the queries of rows [start, stop) only see keys [0, stop): one dot_product_attention per query
    block over that prefix. Every query sees at least itself (padding sees earlier padding), so no row is empty."""
    mask = segment_mask(segment_ids)
    length = q.shape[1]
    blocks = []
    for start in range(0, length, block):
        stop = min(start + block, length)
        blocks.append(jax.nn.dot_product_attention(
            q[:, start:stop], k[:, :stop], v[:, :stop], mask=mask[:, :, start:stop, :stop], scale=scale,
            implementation="xla",
        ))  # GQA native (grouped einsum, no repeat); logits and softmax in float32
    out = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)
    return _zero_padding(out, segment_ids).astype(q.dtype)


def _zero_padding(x, segment_ids):
    """Rows of padding -> 0. jnp.where (a select) also keeps any NaN/garbage there out of the gradient."""
    return jnp.where((segment_ids > 0)[:, :, None, None], x, jnp.zeros((), x.dtype))


# ----------------------------------------------------------------------------------------------- cudnn


def default_max_segments(seq_len: int) -> int:
    """The default bound on documents per row for cuDNN: max(2, L // 16) (mean document >= 16 tokens)."""
    return max(2, seq_len // 16)


def segment_offsets(segment_ids, max_segments: int):
    """Segment starts and lengths per row, in the layout cuDNN's packed attention takes. Pure JAX, jit-safe.

    Returns (offsets [B, M+1] int32, seqlens [B, M] int32), M = max_segments: offsets[b, i] is where the i-th
    document of row b starts and seqlens[b, i] its length; unused entries are -1, and the last column of offsets
    is always -1 (jax's _fix_seqlen_offsets appends the end itself). Documents are the runs of equal non-zero ids;
    padding (0) belongs to none. Documents past the M-th are not listed (see `count_segments`).

        segment_ids = [[1, 1, 1, 2, 2, 0, 0, 0],
                       [1, 2, 3, 3, 3, 3, 3, 3]]
        segment_offsets(segment_ids, 3) -> offsets [[0, 3, -1, -1], [0, 1, 2, -1]]
                                           seqlens [[3, 2, -1],     [1, 1, 6]]
    """
    if max_segments < 1:
        raise ValueError(f"max_segments={max_segments}: must be >= 1")
    batch, length = segment_ids.shape
    starts = _run_starts(segment_ids)
    run = jnp.cumsum(starts, axis=1) - 1  # index of the document each token belongs to
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, length))
    position = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, :], (batch, length))
    drop = max_segments + 1  # out of range for both arrays: scatter mode="drop" ignores it
    start_slot = jnp.where(starts & (run < max_segments), run, drop)
    offsets = jnp.full((batch, max_segments + 1), -1, jnp.int32).at[rows, start_slot].set(position, mode="drop")
    token_slot = jnp.where((segment_ids > 0) & (run < max_segments), run, drop)
    counts = jnp.zeros((batch, max_segments), jnp.int32).at[rows, token_slot].add(1, mode="drop")
    seqlens = jnp.where(counts > 0, counts, -1)
    return offsets, seqlens


def count_segments(segment_ids):
    """[B, L] -> [B] number of documents (runs of equal non-zero ids) per row. [[1, 1, 2, 0]] -> [2]."""
    return _run_starts(segment_ids).sum(axis=1).astype(jnp.int32)


def _run_starts(segment_ids):
    previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
    return (segment_ids > 0) & (segment_ids != previous)


def cudnn_unavailable_reason(dtype, head_dim: int) -> str | None:
    """None when cuDNN packed flash attention can run here for this dtype/head dim, else the reason (a sentence)."""
    if jax.default_backend() != "gpu":
        return f"it needs an NVIDIA GPU, and the default backend is {jax.default_backend()!r}"
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if capability is None:
        return f"the GPU {device.device_kind!r} is not an NVIDIA (CUDA) device"
    if tuple(int(x) for x in str(capability).split(".")) < (9, 0):
        return f"packed layout needs Hopper (sm90) or newer; {device.device_kind!r} is sm{capability}"
    try:
        from jax._src.lib import cuda_versions

        version = cuda_versions.cudnn_get_version() if cuda_versions is not None else 0
    except Exception as e:  # noqa: BLE001 - any failure here means "no usable cuDNN"
        return f"cuDNN was not found ({e})"
    if version < CUDNN_MIN_VERSION:
        return f"packed layout needs cuDNN >= 9.6, found {version}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention takes bfloat16/float16, got {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > 256:
        return f"cuDNN flash attention needs a head dim <= 256 and a multiple of 8, got {head_dim}"
    return None


def _cudnn_attention(q, k, v, segment_ids, scale, max_segments):
    reason = cudnn_unavailable_reason(q.dtype, q.shape[-1])
    if reason is not None:
        raise AttentionUnavailable(f"attention impl='cudnn' cannot run: {reason}. Use impl='xla' (or 'auto').")
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    length = q.shape[1]
    bound = default_max_segments(length) if max_segments is None else int(max_segments)
    bound = max(2, min(bound, length))  # M == 1 would not select the packed layout
    offsets, seqlens = segment_offsets(segment_ids, bound)
    # Zero padding tokens on the way in and out: cuDNN leaves rows outside every segment undefined, and a
    # select keeps whatever it writes there out of the forward result and out of dq/dk/dv.
    q, k, v = (_zero_padding(x, segment_ids) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    if groups > 1 and not jax_packed_gqa_is_fixed():  # see jax_packed_gqa_is_fixed: repeat k/v heads instead
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    out = cudnn.dot_product_attention(
        q,
        k,
        v,
        q_seqlen=seqlens,
        kv_seqlen=seqlens,
        q_offsets=offsets,
        kv_offsets=offsets,
        scale=scale,
        mask_type=cudnn.MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH",
    )
    return _poison_overflow(out, segment_ids, bound)


@functools.cache
def jax_packed_gqa_is_fixed() -> bool:
    """Whether this jax passes correct key offsets to cuDNN for packed GQA (fewer kv heads than q heads).

    jax <= 0.11.0 multiplies the packed kv offsets by the QUERY head count (jax._src.cudnn.
    fused_attention_stablehlo._fix_seqlen_offsets; fixed by jax-ml/jax PR #39521, July 2026): with GQA cuDNN then
    reads the wrong keys, silently. We ask the function itself (pure JAX; evaluated eagerly even inside a jit
    trace) what it does with 2 rows of two 1-token segments, 4 q heads, 1 kv head, head dim 1: the third segment
    (row 1's first) starts at token 2, which is element 2 with 1 kv head (element 8 with the bug).
    When it is not fixed, the cuDNN path repeats k/v to the query heads (same FLOPs, more k/v memory).
    """
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    with jax.ensure_compile_time_eval():
        seqlens = jnp.asarray([[1, 1], [1, 1]], jnp.int32)
        offsets = jnp.asarray([[0, 1, -1], [0, 1, -1]], jnp.int32)
        q, k = jnp.zeros((2, 2, 4, 1)), jnp.zeros((2, 2, 1, 1))
        try:
            _, _, _, kv_offsets = cudnn._fix_seqlen_offsets(seqlens, seqlens, offsets, offsets, q, k)
            return int(kv_offsets.reshape(-1)[2]) == 2
        except Exception:  # noqa: BLE001 - a jax that changed this private helper: repeating k/v is always right
            return False


def _poison_overflow(out, segment_ids, max_segments: int):
    """Rows with more documents than max_segments -> NaN (cuDNN computed only the first M), then padding -> 0.

        segment_ids [[1, 2, 3, 0], [1, 1, 2, 0]], max_segments 2 -> row 0: [nan, nan, nan, 0]; row 1 unchanged
    """
    overflow = count_segments(segment_ids) > max_segments
    out = jnp.where(overflow[:, None, None, None], jnp.asarray(jnp.nan, out.dtype), out)
    return _zero_padding(out, segment_ids)


# ----------------------------------------------------------------------------------------------- pallas


def _pallas_attention(q, k, v, segment_ids, scale, *, interpret, block_size):
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    if not interpret and jax.default_backend() != "gpu":
        raise AttentionUnavailable(
            f"attention impl='pallas' needs a GPU (backend is {jax.default_backend()!r}); use impl='xla', or "
            "interpret=True for a slow CPU emulation."
        )
    length = q.shape[1]
    block = min(PALLAS_BLOCK, length) if block_size is None else block_size
    backward_block = min(32, block)
    if length % block or length % backward_block:
        raise ValueError(f"attention impl='pallas': L={length} must be a multiple of block_size={block}")
    blocks = pallas_attention.BlockSizes(
        block_q=block,
        block_k=block,
        block_q_dkv=backward_block,
        block_kv_dkv=backward_block,
        block_q_dq=backward_block,
        block_kv_dq=backward_block,
    )
    groups = q.shape[2] // k.shape[2]
    if groups > 1:  # the kernel has no GQA: query head h reads kv head h // groups, as jnp.repeat lays it out
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    # The kernel masks by segment equality (and causally), so padding attends to earlier padding: finite, zeroed.
    kernel = functools.partial(
        pallas_attention.mha, sm_scale=scale, causal=True, block_sizes=blocks, interpret=interpret
    )
    out = per_device_shard(kernel, q, k, v, segment_ids)
    return _zero_padding(out, segment_ids).astype(q.dtype)


def per_device_shard(kernel, q, k, v, segment_ids):
    """kernel(q, k, v, segment_ids) on each device's own rows and heads when a mesh is set (`jax.set_mesh`).

    XLA cannot split a Pallas/Triton custom call across devices: given batch-sharded inputs it would gather the
    whole batch onto every device. So under a mesh the kernel runs inside `jax.shard_map`, rows split along the
    mesh axes jsft.sharding.RULES gives "batch", heads along those of "heads" (an axis that does not divide the
    batch or head count is left out: replicated, still correct). No mesh: a plain call.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, segment_ids)
    from jsft.sharding import RULES

    def usable(logical, size):
        names = RULES[logical] if isinstance(RULES[logical], tuple) else (RULES[logical],)
        axes = tuple(a for a in names if a in mesh.axis_names and a not in mesh.manual_axes and mesh.shape[a] > 1)
        return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else ()

    batch_axes, head_axes = usable("batch", q.shape[0]), usable("heads", min(q.shape[2], k.shape[2]))
    if not batch_axes and not head_axes:
        return kernel(q, k, v, segment_ids)
    P = jax.sharding.PartitionSpec
    rows_heads, rows = P(batch_axes or None, None, head_axes or None, None), P(batch_axes or None, None)
    specs = (rows_heads, rows_heads, rows_heads, rows)
    args = (q, k, v, segment_ids)
    if mesh.explicit_axes:  # sharding in types: move the inputs to these specs, and the output back to q's
        args = tuple(jax.sharding.reshard(x, spec) for x, spec in zip(args, specs))
    out = jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=rows_heads, check_vma=False)(*args)
    return jax.sharding.reshard(out, jax.typeof(q).sharding.spec) if mesh.explicit_axes else out


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
