"""The implementations of packed causal attention (jsft.model.attention picks one and calls it).

Every kernel has the signature kernel(q, k, v, segment_ids, scale, **options) and the contract of
`jsft.model.attention.packed_attention`: q [B, L, Hq, D], k/v [B, L, Hkv, D], segment_ids [B, L] int32 (1, 2, 3 ...
per document, 0 = tail padding); output [B, L, Hq, D] in q's dtype, padding rows exactly zero (and their gradients).

    xla      jax.nn.dot_product_attention with a block-diagonal causal mask, cut into causal query blocks. Runs
             everywhere; O(L^2) memory: the reference.
    cudnn    cuDNN flash attention in packed ("ragged") layout through jax's private
             jax._src.cudnn.fused_attention_stablehlo.dot_product_attention. Hopper+, cuDNN >= 9.6, bf16/fp16, and a
             static bound M on documents per row (`cudnn_bound`): jax lowers it as B*M sequences of length L.
    tokamax  tokamax's Mosaic GPU flash attention (sm90/sm100, forward and backward kernels) with its per-query
             mask: k_start = the start of the query's document, plus causal = packed causal attention; kv blocks
             before a query block's first document are skipped. The optional extra `jsft[tokamax]`.
    pallas   jax's Pallas/Triton flash kernel (jax.experimental.pallas.ops.gpu.attention.mha, deprecated upstream
             in favour of tokamax) with segment ids; no GQA in the kernel (k/v repeated), visits every causal block.

`unavailable_reason` says, without running anything, why a kernel cannot run here (None: worth a try); whether it
really compiles, runs and is right on this device is the probe's job (jsft.model.attention.probe).
"""

from __future__ import annotations

import functools
import math
import os
import re

import jax
import jax.numpy as jnp

PALLAS_BLOCK = 128  # default Pallas block along the sequence (forward); backward blocks are 32
TOKAMAX_QUERY_TILE = 128  # tokamax's sm90 kernel reduces its per-query mask over tiles of 2 x 64 queries
XLA_QUERY_BLOCKS, XLA_MIN_QUERY_BLOCK = 4, 128  # xla path: up to 4 causal query blocks of >= 128 rows
CUDNN_MIN_VERSION = 90600  # packed (ragged) layout in cuDNN flash attention
CUDNN_GRAPH_BUG = (91300, 91500)  # cuDNN 9.13.x-9.14.x: see command_buffers_exclude_cudnn
HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# ----------------------------------------------------------------------------------------------- what can run here


def unavailable_reason(impl: str, dtype, length: int, head_dim: int, max_segments: int | None = None) -> str | None:
    """Why `impl` cannot run on this device for these shapes, from facts known without running it; None: try it.

    unavailable_reason("tokamax", jnp.bfloat16, 4096, 128) on a CPU -> "it needs an NVIDIA GPU, and the default
    backend is 'cpu'". Unknown names (tests' stand-ins) -> None.
    """
    if impl == "cudnn":
        reason = cudnn_unavailable_reason(dtype, head_dim)
        if reason is None and max_segments is None:
            reason = ("it needs max_segments, the most documents one row holds (jsft.train sets it from the data; "
                      "elsewhere call model.set_max_segments(n))")
        return reason
    if impl not in ("tokamax", "pallas"):
        return None
    if jax.default_backend() != "gpu":
        hint = "; interpret=True emulates it on CPU, slowly" if impl == "pallas" else ""
        return f"it needs an NVIDIA GPU, and the default backend is {jax.default_backend()!r}{hint}"
    if impl == "pallas":
        block = min(PALLAS_BLOCK, length)
        return None if length % block == 0 else f"L={length} is not a multiple of its block of {block} tokens"
    if jnp.dtype(dtype) not in HALF:
        return f"it takes bfloat16/float16, got {jnp.dtype(dtype).name}"
    capability = str(getattr(jax.devices()[0], "compute_capability", "0"))
    if capability.split(".")[0] not in ("9", "10"):
        return f"its kernels are for sm90/sm100 (Hopper/Blackwell); {jax.devices()[0].device_kind!r} is sm{capability}"
    if length % TOKAMAX_QUERY_TILE:
        return f"L={length} is not a multiple of {TOKAMAX_QUERY_TILE} (its per-query mask is read per query tile)"
    try:
        from tokamax._src.ops.attention import api  # noqa: F401
    except Exception as e:  # noqa: BLE001 - not installed, or a tokamax that moved its private modules
        return f"tokamax does not import ({type(e).__name__}: {e}); install it with pip install 'jsft[tokamax]'"
    return None


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


def xla_attention(q, k, v, segment_ids, scale, *, block_size=None, **unused):
    """Causal, so the queries of rows [start, stop) only see keys [0, stop): one dot_product_attention per query
    block over that prefix. Every query sees at least itself (padding sees earlier padding), so no row is empty."""
    mask = segment_mask(segment_ids)
    length = q.shape[1]
    block = block_size or xla_query_block(length)
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


def cudnn_bound(max_segments: int, length: int) -> int:
    """The static documents-per-row bound M of the cuDNN call: the data's bound rounded up to a power of two (runs
    whose data differ a little compile the same program; the persistent compilation cache hits), at least 2 (M = 1
    would not select the packed layout), at most L. There is no default: a guessed bound too small makes rows NaN,
    one too large costs memory (jax lowers the call as B*M sequences of length L; see `cudnn_backward_bytes`).

        cudnn_bound(1, 8192) -> 2;  cudnn_bound(5, 8192) -> 8;  cudnn_bound(17, 8192) -> 32
        cudnn_bound(300, 256) -> 256
    """
    if max_segments is None or int(max_segments) < 1:
        raise ValueError(f"cudnn attention needs max_segments >= 1 (the most documents one row holds), got "
                         f"{max_segments!r}")
    return min(int(length), max(2, 1 << (int(max_segments) - 1).bit_length()))


def cudnn_backward_bytes(rows: int, max_segments: int, heads: int, length: int, head_dim: int) -> int:
    """Bytes of the float32 dQ accumulator cudnn-frontend sizes for one packed backward call if it counts all B*M
    sequences at full length (rows * M * heads * L * head_dim * 4; TransformerEngine avoids it with
    max_total_seq_len_q, which XLA may not set): the worst case the plan warns about. Per device: rows and heads
    of one device. cudnn_backward_bytes(1, 32, 32, 8192, 128) -> 4 GiB."""
    return int(rows) * cudnn_bound(max_segments, length) * int(heads) * int(length) * int(head_dim) * 4


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
    if CUDNN_GRAPH_BUG[0] <= version < CUDNN_GRAPH_BUG[1] and not command_buffers_exclude_cudnn():
        return (f"cuDNN {version // 10000}.{version // 100 % 100} crashes the process inside CUDA graphs with a "
                "padding-causal mask and kv length > 1024 (an illegal memory access, which no fallback can catch); "
                "start the process with XLA_FLAGS=--xla_gpu_enable_command_buffer= to use it")
    return None


def command_buffers_exclude_cudnn(xla_flags: str | None = None) -> bool:
    """Whether XLA_FLAGS keeps cuDNN calls out of CUDA graphs (command buffers): --xla_gpu_enable_command_buffer=
    set to a list without CUDNN and CUSTOM_CALL (empty: no command buffers at all). XLA reads the flag when the
    backend starts, so jsft requires it rather than setting it (a flag set later would silently do nothing).

        "--xla_gpu_enable_command_buffer=" -> True;  "" -> False (XLA's default includes cuDNN)
    """
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    found = re.findall(r"--xla_gpu_enable_command_buffer=(\S*)", flags)
    if not found:
        return False
    kinds = {kind.strip().upper() for kind in found[-1].split(",") if kind.strip()}
    return not kinds & {"CUDNN", "CUSTOM_CALL"}


def cudnn_attention(q, k, v, segment_ids, scale, *, max_segments, **unused):
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    bound = cudnn_bound(max_segments, q.shape[1])
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


# ----------------------------------------------------------------------------------------------- tokamax


def tokamax_attention(q, k, v, segment_ids, scale, *, interpret=False, **unused):
    """tokamax's Mosaic GPU flash attention with mask k_start = document start, causal (GQA native).

    interpret=True runs tokamax's own XLA implementation of the same mask object instead of the Mosaic kernel: what
    a CPU can check of this path (the mask, the call, GQA layout, padding), not the kernel itself (the probe
    checks that on the GPU). Uses tokamax's private Mask (its public function takes a dense boolean mask, O(L^2)
    in memory and without block skipping); tokamax is pinned to 0.0.12 for that reason.
    """
    from absl import flags
    from tokamax._src.ops.attention import api, base

    if not flags.FLAGS.is_parsed():  # tokamax reads its options from absl flags, parsing sys.argv on first use: a
        flags.FLAGS.mark_as_parsed()  # host program's own arguments (jsft.train --config) would make it raise
    implementation = api.IMPLEMENTATIONS["xla" if interpret else "mosaic_gpu"]

    def kernel(q, k, v, segment_ids):
        mask = base.Mask(k_start=document_starts(segment_ids)[:, None, :], is_causal=True)
        return implementation(q, k, v, mask=mask, logits_scale=scale)

    out = per_device_shard(kernel, q, k, v, segment_ids)  # a Mosaic call cannot be split by XLA either
    return _zero_padding(out, segment_ids).astype(q.dtype)


def document_starts(segment_ids):
    """[B, L] -> [B, L] int32: where the run of equal ids that each token is in begins (padding is one more run, so
    it attends to earlier padding only: finite, then zeroed). [[1, 1, 2, 2, 0]] -> [[0, 0, 2, 2, 4]]."""
    length = segment_ids.shape[1]
    position = jnp.arange(length, dtype=jnp.int32)[None, :]
    previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    return jax.lax.cummax(jnp.where(segment_ids != previous, position, 0), axis=1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------- pallas


def pallas_attention(q, k, v, segment_ids, scale, *, interpret=False, block_size=None, **unused):
    """interpret=True runs the kernel's program on CPU (tests)."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

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


KERNELS = {"xla": xla_attention, "cudnn": cudnn_attention, "tokamax": tokamax_attention, "pallas": pallas_attention}
