"""Packed attention: each document of a packed row gets exactly what it gets alone; padding is zero and finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsft.model import attention, kernels
from jsft.model.attention import AttentionUnavailable, count_segments, packed_attention, segment_offsets

D = 16


def qkv(batch, length, hq=4, hkv=2, dtype=jnp.float32, seed=0):
    """Random q [B, L, hq, D], k/v [B, L, hkv, D] (numpy RNG: no compile per shape)."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, length, hq, D), (batch, length, hkv, D), (batch, length, hkv, D)]
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes)


def segments_from_lengths(rows, length):
    """[[5, 9], [3]] -> [B, L] segment ids 1, 2, ... per document, 0 for the tail padding."""
    out = np.zeros((len(rows), length), np.int32)
    for r, lengths in enumerate(rows):
        start = 0
        for i, n in enumerate(lengths):
            out[r, start : start + n] = i + 1
            start += n
    return jnp.asarray(out)


# Row 0: three documents and 3 pads; row 1: one document filling the row; row 2: two documents, 8 pads.
LAYOUT = [[5, 9, 7], [24], [10, 6]]
L = 24


def naive_causal(q, k, v):
    """numpy float64 causal attention for one document, GQA by repetition: [T, Hq, D] -> [T, Hq, D]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    logits = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
    t = q.shape[0]
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v)


attend = jax.jit(packed_attention, static_argnames=("impl", "scale", "interpret", "block_size", "max_segments"))


def documents(seg):
    """[(row, slice)] of every document in a [B, L] segment-id array."""
    seg = np.asarray(seg)
    found = []
    for b in range(seg.shape[0]):
        for s in sorted(set(seg[b].tolist()) - {0}):
            idx = np.nonzero(seg[b] == s)[0]
            found.append((b, slice(int(idx[0]), int(idx[-1]) + 1)))
    return found


def alone_rows(x, docs):
    """Each document moved to the start of its own row (the rest zeros): [n_docs, L, ...]."""
    rows = np.zeros((len(docs),) + x.shape[1:], np.asarray(x).dtype)
    for i, (b, sl) in enumerate(docs):
        rows[i, : sl.stop - sl.start] = np.asarray(x[b, sl])
    return jnp.asarray(rows)


def alone_segments(docs, length):
    return segments_from_lengths([[sl.stop - sl.start] for _, sl in docs], length)


# ----------------------------------------------------------------------------------------------- xla


def test_xla_single_document_equals_naive_causal_attention():
    q, k, v = qkv(1, 12)
    out = attend(q, k, v, jnp.ones((1, 12), jnp.int32), impl="xla")
    np.testing.assert_allclose(out[0], naive_causal(q[0], k[0], v[0]), atol=1e-5, rtol=1e-5)


def test_xla_packed_row_equals_documents_alone():
    q, k, v = qkv(3, L)
    seg = segments_from_lengths(LAYOUT, L)
    out = attend(q, k, v, seg, impl="xla")
    docs = documents(seg)
    alone = attend(*(alone_rows(x, docs) for x in (q, k, v)), alone_segments(docs, L), impl="xla")
    for i, (b, sl) in enumerate(docs):
        np.testing.assert_allclose(out[b, sl], alone[i, : sl.stop - sl.start], atol=1e-5, rtol=1e-5)
    # and against the float64 reference, document by document
    np.testing.assert_allclose(out[0, 5:14], naive_causal(q[0, 5:14], k[0, 5:14], v[0, 5:14]), atol=1e-5)


def test_xla_packed_gradients_equal_documents_alone():
    q, k, v = qkv(3, L, seed=1)
    seg = segments_from_lengths(LAYOUT, L)
    w = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape, np.float32))  # weights every output differently

    def packed_loss(q, k, v):
        return (packed_attention(q, k, v, seg, impl="xla") * w).sum()

    grads = jax.jit(jax.grad(packed_loss, argnums=(0, 1, 2)))(q, k, v)
    docs = documents(seg)
    alone_seg, alone_w = alone_segments(docs, L), alone_rows(w, docs)

    def alone_loss(q1, k1, v1):
        return (packed_attention(q1, k1, v1, alone_seg, impl="xla") * alone_w).sum()

    alone = jax.jit(jax.grad(alone_loss, argnums=(0, 1, 2)))(*(alone_rows(x, docs) for x in (q, k, v)))
    assert len(docs) == 6
    for i, (b, sl) in enumerate(docs):
        for g_packed, g_alone in zip(grads, alone):
            np.testing.assert_allclose(g_packed[b, sl], g_alone[i, : sl.stop - sl.start], atol=1e-5, rtol=1e-5)


def test_xla_gqa_equals_mha_with_repeated_kv():
    q, k, v = qkv(3, L, hq=8, hkv=2, seed=2)
    seg = segments_from_lengths(LAYOUT, L)
    gqa = attend(q, k, v, seg, impl="xla")
    mha = attend(q, jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2), seg, impl="xla")
    np.testing.assert_allclose(gqa, mha, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("block", [5, 8])
def test_xla_causal_query_blocks_equal_one_block_forward_and_gradients(block):
    """The xla path cuts rows into query blocks that attend to the keys before their end only: the same outputs and
    gradients as one block, with documents and padding across block edges (5: a shorter last block)."""
    q, k, v = qkv(3, L, seed=6)
    seg = segments_from_lengths(LAYOUT, L)
    w = jnp.asarray(np.random.default_rng(10).standard_normal(q.shape, np.float32))

    def loss(q, k, v, block_size):
        return (packed_attention(q, k, v, seg, impl="xla", block_size=block_size) * w).sum()

    out = attend(q, k, v, seg, impl="xla", block_size=block)
    np.testing.assert_allclose(out, attend(q, k, v, seg, impl="xla", block_size=L), atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(out[0, 21:], 0.0)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    for g, g_one in zip(grad(q, k, v, block), grad(q, k, v, L)):
        np.testing.assert_allclose(g, g_one, atol=1e-6, rtol=1e-6)
        np.testing.assert_array_equal(g[0, 21:], 0.0)


def test_xla_query_block_default():
    assert kernels.xla_query_block(24) == 128  # L <= 128: one block, the plain masked attention
    assert kernels.xla_query_block(512) == 128  # 4 blocks
    assert kernels.xla_query_block(8192) == 2048
    assert kernels.xla_query_block(200) == 128  # 128 + 72


def test_padding_rows_are_zero_and_gradients_finite_even_for_an_all_padding_row():
    q, k, v = qkv(2, 16, seed=3)
    seg = jnp.asarray([[1] * 6 + [2] * 5 + [0] * 5, [0] * 16], jnp.int32)
    out = attend(q, k, v, seg, impl="xla")
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, 11:], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)
    assert np.all(np.abs(np.asarray(out[0, :11])) > 0)

    grads = jax.jit(jax.grad(lambda q, k, v: (attend(q, k, v, seg, impl="xla") ** 2).sum(), argnums=(0, 1, 2)))(
        q, k, v
    )
    for g in grads:
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[0, 11:], 0.0)  # padding tokens receive no gradient
        np.testing.assert_array_equal(g[1], 0.0)
        assert np.abs(np.asarray(g[0, :11])).sum() > 0


def test_bfloat16_in_bfloat16_out_close_to_float32():
    q, k, v = qkv(3, L, seed=4)
    seg = segments_from_lengths(LAYOUT, L)
    ref = attend(q, k, v, seg, impl="xla")
    out = attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg, impl="xla")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_scale_argument_is_used():
    q, k, v = qkv(1, 8, seed=5)
    seg = jnp.ones((1, 8), jnp.int32)
    out = attend(q, k, v, seg, impl="xla", scale=0.5)
    expected = naive_causal(q[0] * (0.5 * np.sqrt(D)), k[0], v[0])  # naive scales by 1/sqrt(D)
    np.testing.assert_allclose(out[0], expected, atol=1e-5, rtol=1e-5)


def test_bad_shapes_raise_clear_errors():
    q, k, v = qkv(1, 8, hq=3, hkv=2)
    with pytest.raises(ValueError, match="not a multiple"):
        packed_attention(q, k, v, jnp.ones((1, 8), jnp.int32), impl="xla")
    q, k, v = qkv(1, 8)
    with pytest.raises(ValueError, match="segment_ids"):
        packed_attention(q, k, v, jnp.ones((1, 7), jnp.int32), impl="xla")
    with pytest.raises(ValueError, match="choose one of"):
        packed_attention(q, k, v, jnp.ones((1, 8), jnp.int32), impl="flash")


# ----------------------------------------------------------------------------------------------- segment offsets


def test_segment_offsets_worked_example():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0, 0], [1, 2, 3, 3, 3, 3, 3, 3]], jnp.int32)
    offsets, seqlens = segment_offsets(seg, 3)
    np.testing.assert_array_equal(offsets, [[0, 3, -1, -1], [0, 1, 2, -1]])
    np.testing.assert_array_equal(seqlens, [[3, 2, -1], [1, 1, 6]])
    np.testing.assert_array_equal(count_segments(seg), [2, 3])


def test_segment_offsets_all_padding_overflow_and_jit():
    seg = jnp.asarray([[0, 0, 0, 0, 0], [1, 2, 3, 4, 0], [7, 7, 9, 9, 9]], jnp.int32)
    offsets, seqlens = jax.jit(segment_offsets, static_argnums=1)(seg, 2)
    # all padding: nothing listed; 4 documents with a bound of 2: the first two; ids need not start at 1
    np.testing.assert_array_equal(offsets, [[-1, -1, -1], [0, 1, -1], [0, 2, -1]])
    np.testing.assert_array_equal(seqlens, [[-1, -1], [1, 1], [2, 3]])
    np.testing.assert_array_equal(count_segments(seg), [0, 4, 2])
    with pytest.raises(ValueError, match="max_segments"):
        segment_offsets(seg, 0)


def test_cudnn_bound_is_the_data_bound_rounded_up_to_a_power_of_two_never_a_default():
    assert [attention.cudnn_bound(n, 8192) for n in (1, 2, 3, 5, 8, 9, 17, 32, 33)] == [2, 2, 4, 8, 8, 16, 32, 32, 64]
    assert attention.cudnn_bound(300, 256) == 256  # never more segments than tokens
    for missing in (None, 0):
        with pytest.raises(ValueError, match="needs max_segments"):
            attention.cudnn_bound(missing, 8192)
    # what the plan warns about: rows x M x heads x L x head dim x 4 bytes (the 8B model, 32 documents, L=8192)
    assert kernels.cudnn_backward_bytes(1, 20, 32, 8192, 128) == 32 * 32 * 8192 * 128 * 4 == 4 * 2**30


# ----------------------------------------------------------------------------------------------- cudnn / auto


def test_cudnn_on_cpu_raises_clear_error():
    q, k, v = qkv(1, 16, dtype=jnp.bfloat16)
    with pytest.raises(AttentionUnavailable, match="impl='cudnn' cannot run: it needs an NVIDIA GPU"):
        packed_attention(q, k, v, jnp.ones((1, 16), jnp.int32), impl="cudnn")


def test_pallas_on_cpu_without_interpret_raises_clear_error():
    q, k, v = qkv(1, 16)
    with pytest.raises(AttentionUnavailable, match="interpret=True"):
        packed_attention(q, k, v, jnp.ones((1, 16), jnp.int32), impl="pallas")


def test_auto_on_cpu_picks_xla():
    assert attention.choose_impl(jnp.bfloat16, 4096, 128, q_heads=32, kv_heads=8, max_segments=8) == "xla"
    q, k, v = qkv(3, L, seed=6)
    seg = segments_from_lengths(LAYOUT, L)
    np.testing.assert_array_equal(attend(q, k, v, seg), attend(q, k, v, seg, impl="xla"))


# ----------------------------------------------------------------------------------------------- pallas (interpret)


def test_pallas_interpret_equals_xla_on_packed_rows_forward_and_gradients():
    """Tiny shapes: interpret mode runs the Triton kernel's program on CPU, block by block (slow)."""
    length = 32
    q, k, v = qkv(2, length, hq=4, hkv=2, seed=7)
    seg = jnp.asarray([[1] * 7 + [2] * 13 + [3] * 5 + [0] * 7, [1] * 20 + [0] * 12], jnp.int32)
    w = jnp.asarray(np.random.default_rng(8).standard_normal(q.shape, np.float32))

    def loss(impl, **kw):
        return lambda q, k, v: (packed_attention(q, k, v, seg, impl=impl, **kw) * w).sum()

    out = attend(q, k, v, seg, impl="pallas", interpret=True, block_size=16)
    ref = attend(q, k, v, seg, impl="xla")
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(out[0, 25:], 0.0)  # padding attends to padding in the kernel; zeroed here
    grads = jax.jit(jax.grad(loss("pallas", interpret=True, block_size=16), argnums=(0, 1, 2)))(q, k, v)
    grads_ref = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    for g, g_ref in zip(grads, grads_ref):
        assert g.shape == g_ref.shape  # dk/dv fold the repeated heads back to Hkv
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)


def test_pallas_rejects_a_length_that_is_not_a_multiple_of_the_block():
    q, k, v = qkv(1, 24)
    with pytest.raises(ValueError, match="multiple of block_size"):
        packed_attention(q, k, v, jnp.ones((1, 24), jnp.int32), impl="pallas", interpret=True, block_size=16)


def test_cudnn_rows_with_more_documents_than_max_segments_are_nan_not_silently_wrong():
    """cuDNN only sees the first max_segments documents of a row; such a row must be loud (NaN), padding still 0."""
    out = jnp.ones((2, 4, 1, 2), jnp.bfloat16)
    seg = jnp.asarray([[1, 2, 3, 0], [1, 1, 2, 0]], jnp.int32)
    poisoned = np.asarray(kernels._poison_overflow(out, seg, 2), np.float32)
    assert np.all(np.isnan(poisoned[0, :3])) and np.all(poisoned[0, 3] == 0)
    np.testing.assert_array_equal(poisoned[1], [[[1, 1]], [[1, 1]], [[1, 1]], [[0, 0]]])


def fake_cudnn_packed(query, key, value, bias=None, mask=None, q_seqlen=None, kv_seqlen=None, q_offsets=None,
                      kv_offsets=None, *, scale, mask_type, qkv_layout, **unused):
    """A CPU stand-in for cuDNN's packed flash attention, at the level cuDNN sees it: jax's own
    _fix_seqlen_offsets turns [B, M] lengths / [B, M+1] offsets into one list of ragged segments with offsets in
    ELEMENTS of the flattened q [B*T*Hq*D] and k/v [B*S*Hkv*D] buffers; each segment gets causal attention;
    tokens in no segment get NaN (cuDNN leaves them uninitialized)."""
    from jax._src.cudnn import fused_attention_stablehlo as fas

    assert bias is None and mask is None and qkv_layout == "BTNH" and mask_type == fas.MaskType.PADDING_CAUSAL
    B, T, N, H = query.shape
    K = key.shape[2]
    qs, ks, qo, ko = (x.reshape(-1) for x in fas._fix_seqlen_offsets(q_seqlen, kv_seqlen, q_offsets, kv_offsets,
                                                                     query, key))
    qo, ko = qo // (N * H), ko // (K * H)  # element offsets -> token offsets, each with its own buffer's stride
    token = jnp.arange(B * T)

    def segment_and_position(seqlens, offsets):
        inside = (token[None, :] >= offsets[: seqlens.size, None]) & (
            token[None, :] < offsets[: seqlens.size, None] + seqlens[:, None])
        segment = jnp.where(inside.any(0), jnp.argmax(inside, axis=0), -1)
        return segment, token - offsets[jnp.maximum(segment, 0)]

    q_segment, q_position = segment_and_position(qs, qo)
    kv_segment, kv_position = segment_and_position(ks, ko)
    q = query.reshape(B * T, N, H).astype(jnp.float32)
    k = jnp.repeat(key.reshape(B * T, K, H), N // K, axis=1).astype(jnp.float32)
    v = jnp.repeat(value.reshape(B * T, K, H), N // K, axis=1).astype(jnp.float32)
    allowed = (q_segment[:, None] == kv_segment[None, :]) & (q_segment[:, None] >= 0)
    allowed &= kv_position[None, :] <= q_position[:, None]
    logits = jnp.where(allowed[None], jnp.einsum("tnh,snh->nts", q, k) * scale, -1e30)
    out = jnp.einsum("nts,snh->tnh", jax.nn.softmax(logits, axis=-1), v)
    out = jnp.where((q_segment >= 0)[:, None, None], out, jnp.nan)
    return out.reshape(B, T, N, H).astype(query.dtype)


def kv_offsets_as_in(fixed: bool):
    """jax's _fix_seqlen_offsets made to behave as in a jax with (fixed=True) or without jax-ml/jax PR #39521,
    whichever jax is installed: packed kv offsets counted in elements of the k/v buffer (N_kv heads: right) or of
    the q buffer (N heads: jax <= 0.11.0's bug)."""
    from jax._src.cudnn import fused_attention_stablehlo as fas

    original = fas._fix_seqlen_offsets
    kernels.jax_packed_gqa_is_fixed.cache_clear()
    installed = kernels.jax_packed_gqa_is_fixed()  # what this jax does (the detection has its own test below)
    kernels.jax_packed_gqa_is_fixed.cache_clear()

    def patched(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key):
        qs, ks, qo, ko = original(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key)
        n, n_kv = query.shape[2], key.shape[2]
        if fixed and not installed:
            ko = ko // n * n_kv
        elif installed and not fixed:
            ko = ko // n_kv * n
        return qs, ks, qo, ko

    return patched


@pytest.fixture
def fake_cudnn(monkeypatch, small_probe):
    """cuDNN's packed attention replaced by the CPU stand-in, and every static check passed; small fresh probes."""
    from jax._src.cudnn import fused_attention_stablehlo as fas

    monkeypatch.setattr(kernels, "cudnn_unavailable_reason", lambda dtype, head_dim: None)
    monkeypatch.setattr(fas, "dot_product_attention", fake_cudnn_packed)
    detection = kernels.jax_packed_gqa_is_fixed  # a test may replace it
    detection.cache_clear()
    yield fas
    detection.cache_clear()


@pytest.mark.parametrize("jax_has_the_gqa_fix", [False, True])
def test_cudnn_call_plumbing_with_a_cpu_stand_in_equals_xla(fake_cudnn, monkeypatch, jax_has_the_gqa_fix):
    """Not cuDNN itself (that needs a Hopper GPU: scripts/gpu_probe.py), but everything around the call: offsets and
    lengths in the layout jax's private API expects, GQA with and without jax's kv-offset fix (each simulated from
    whichever jax is installed), NaN garbage outside segments kept out of the output and the gradients, rows with
    more documents than the bound made NaN. The explicit impl is probed first (on the stand-in) and passes."""
    monkeypatch.setattr(fake_cudnn, "_fix_seqlen_offsets", kv_offsets_as_in(jax_has_the_gqa_fix))
    assert kernels.jax_packed_gqa_is_fixed() == jax_has_the_gqa_fix
    q, k, v = qkv(3, 16, seed=11)
    seg = jnp.asarray([[1] * 5 + [2] * 6 + [3] * 2 + [0] * 3, [0] * 16, [1] * 16], jnp.int32)
    w = jnp.asarray(np.random.default_rng(12).standard_normal(q.shape, np.float32))

    def loss(q, k, v, impl, max_segments=None):
        return (packed_attention(q, k, v, seg, impl=impl, max_segments=max_segments) * w).sum()

    # fresh jit wrappers: a cached trace from another parametrization would hide the monkeypatches
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4))
    run = jax.jit(lambda q, k, v, impl, m: packed_attention(q, k, v, seg, impl=impl, max_segments=m),
                  static_argnums=(3, 4))
    (_, grads), (_, grads_ref) = grad(q, k, v, "cudnn", 4), grad(q, k, v, "xla")
    out = run(q, k, v, "cudnn", 4)
    np.testing.assert_allclose(out, run(q, k, v, "xla", None), atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)
    too_few = np.asarray(run(q, k, v, "cudnn", 2))
    assert np.all(np.isnan(too_few[0, :13])) and np.all(too_few[0, 13:] == 0)  # 3 documents > 2: loud
    np.testing.assert_allclose(too_few[2], out[2], atol=1e-6)  # rows within the bound are unaffected
    assert attention.probe.cache_info().currsize == 2  # one probe per bound (4 and 2), not one per call


def test_the_probe_refuses_cudnn_where_jax_s_gqa_kv_offset_bug_would_give_wrong_keys(fake_cudnn, monkeypatch):
    """The stand-in is faithful enough to fail without the workaround: GQA k/v passed as they are to a jax whose
    _fix_seqlen_offsets scales kv offsets by the query heads gives wrong outputs (jax <= 0.11.0 on a real GPU).
    The probe sees it: an explicit impl='cudnn' stops with the probe's error instead of training on wrong keys."""
    monkeypatch.setattr(fake_cudnn, "_fix_seqlen_offsets", kv_offsets_as_in(False))
    monkeypatch.setattr(kernels, "jax_packed_gqa_is_fixed", lambda: True)  # pretend: no workaround
    q, k, v = qkv(3, 16, seed=11)
    seg = jnp.asarray([[1] * 5 + [2] * 6 + [3] * 2 + [0] * 3, [0] * 16, [1] * 16], jnp.int32)
    direct = np.asarray(kernels.cudnn_attention(q, k, v, seg, D**-0.5, max_segments=4))
    assert not np.allclose(np.nan_to_num(direct, nan=1e9), attend(q, k, v, seg, impl="xla"), atol=1e-3)
    with pytest.raises(AttentionUnavailable, match=r"impl='cudnn' cannot run: its probe failed: d?[kqvout]+ rel err .* vs "
                                                   r"float32 .*Alternatives: model.attention_impl='auto'"):
        packed_attention(q, k, v, seg, impl="cudnn", max_segments=4)


# ----------------------------------------------------------------------------------------------- tokamax


def require_tokamax():
    """tokamax is part of the test extra (CI installs it): missing is a failure, never a skip."""
    try:
        import tokamax  # noqa: F401
    except ImportError as e:
        pytest.fail(f"tokamax is not installed ({e}); the test extra installs it: bash scripts/setup.sh, or "
                    "pip install -c constraints.txt 'jsft[tokamax]'")


def test_document_starts_worked_example():
    seg = jnp.asarray([[1, 1, 2, 2, 0], [1, 2, 2, 3, 3], [0, 0, 0, 0, 0]], jnp.int32)
    np.testing.assert_array_equal(kernels.document_starts(seg), [[0, 0, 2, 2, 4], [0, 1, 1, 3, 3], [0, 0, 0, 0, 0]])


def test_tokamax_mask_and_call_equal_xla_on_packed_rows_forward_and_gradients():
    """jsft's tokamax path on CPU: the Mask it hands the Mosaic GPU kernel (k_start = the start of each query's
    document, causal), GQA heads as they are, padding zeroed, run by tokamax's own XLA implementation of that mask
    (interpret=True; the Mosaic kernel itself needs sm90, where the probe checks it). Equals the xla path, outputs
    and gradients, for rows of several documents, one document, tail padding and padding only."""
    require_tokamax()
    q, k, v = qkv(4, L, hq=4, hkv=2, seed=16)
    seg = segments_from_lengths(LAYOUT + [[]], L)
    w = jnp.asarray(np.random.default_rng(17).standard_normal(q.shape, np.float32))

    def loss(q, k, v, impl):
        return (packed_attention(q, k, v, seg, impl=impl, interpret=impl == "tokamax") * w).sum()

    out = attend(q, k, v, seg, impl="tokamax", interpret=True)
    np.testing.assert_allclose(out, attend(q, k, v, seg, impl="xla"), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(out[0, 21:], 0.0)
    np.testing.assert_array_equal(out[3], 0.0)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    for g, g_ref in zip(grad(q, k, v, "tokamax"), grad(q, k, v, "xla")):
        assert g.shape == g_ref.shape and np.all(np.isfinite(g))
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)
    # and packed == each document alone, through tokamax's path itself
    docs = documents(seg)
    alone = attend(*(alone_rows(x, docs) for x in (q, k, v)), alone_segments(docs, L), impl="tokamax",
                   interpret=True)
    for i, (b, sl) in enumerate(docs):
        np.testing.assert_allclose(out[b, sl], alone[i, : sl.stop - sl.start], atol=1e-5, rtol=1e-5)


def test_tokamax_without_interpret_on_cpu_is_unavailable_with_the_reason():
    q, k, v = qkv(1, 16, dtype=jnp.bfloat16)
    with pytest.raises(AttentionUnavailable, match="impl='tokamax' cannot run: it needs an NVIDIA GPU"):
        packed_attention(q, k, v, jnp.ones((1, 16), jnp.int32), impl="tokamax")


def test_raw_pallas_kernel_treats_padding_as_one_more_document():
    """What the wrapper corrects: jax's Pallas mha masks by segment-id equality (so never across documents), and
    segment 0 (padding) is just another segment: padding rows attend causally to earlier padding, finite and
    non-zero. The wrapper zeros them."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    q, k, v = qkv(1, 32, hq=2, hkv=2, seed=13)
    seg = jnp.asarray([[1] * 10 + [2] * 12 + [0] * 10], jnp.int32)
    blocks = pallas_attention.BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_kv_dkv=16, block_q_dq=16,
                                         block_kv_dq=16)
    raw = pallas_attention.mha(q, k, v, seg, sm_scale=D**-0.5, causal=True, block_sizes=blocks, interpret=True)
    padding_as_document = jnp.where(seg == 0, 3, seg)
    np.testing.assert_allclose(raw, attend(q, k, v, padding_as_document, impl="xla"), atol=1e-5, rtol=1e-5)
    assert np.all(np.abs(np.asarray(raw[0, 22:])) > 0)


def test_gqa_fix_detection_works_when_first_asked_inside_jit():
    """The model asks from inside its jitted step: the check must evaluate eagerly, not become a tracer."""
    from jax._src.cudnn import fused_attention_stablehlo as fas

    kernels.jax_packed_gqa_is_fixed.cache_clear()
    try:
        detect = jax.jit(lambda x: x * kernels.jax_packed_gqa_is_fixed())
        expected = "N_kv" in __import__("inspect").getsource(fas._fix_seqlen_offsets)  # the fix names N_kv
        assert float(detect(jnp.ones(()))) == float(expected)
    finally:
        kernels.jax_packed_gqa_is_fixed.cache_clear()


@pytest.mark.parametrize("impl,axis_type", [("pallas", "Auto"), ("pallas", "Explicit"), ("tokamax", "Auto")])
def test_kernels_under_a_mesh_run_per_device_shard_and_equal_xla(impl, axis_type):
    """With `jax.set_mesh`, the Pallas and tokamax kernels run inside shard_map on each device's rows and heads
    (XLA cannot split a Triton or Mosaic call; it would gather the batch). 4 CPU devices: data=2 x tensor=2;
    gradients too. jsft's mesh uses Auto axes; Explicit ones work as well."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    if impl == "tokamax":
        require_tokamax()
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                         axis_types=(getattr(AxisType, axis_type),) * 3)
    q, k, v = qkv(2, 32, hq=4, hkv=2, seed=14)
    seg = jnp.asarray([[1] * 7 + [2] * 13 + [3] * 5 + [0] * 7, [1] * 20 + [0] * 12], jnp.int32)
    w = jnp.asarray(np.random.default_rng(15).standard_normal(q.shape, np.float32))
    seen = []

    def loss(q, k, v, seg, w, impl):
        return (packed_attention(q, k, v, seg, impl=impl, interpret=True, block_size=16) * w).sum()

    with jax.set_mesh(mesh):
        put = lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))  # noqa: E731
        q, k, v, seg, w = (put(x) for x in (q, k, v, seg, w))
        real_shard_map = jax.shard_map

        def spy(f, **kw):
            seen.append(kw["in_specs"])
            return real_shard_map(f, **kw)

        jax.shard_map = spy
        try:
            grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=5)(q, k, v, seg, w, impl)
        finally:
            jax.shard_map = real_shard_map
        grads_ref = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=5)(q, k, v, seg, w, "xla")
    assert seen and seen[0][0] == P(("data",), None, ("tensor",), None)  # rows on data, heads on tensor
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5, rtol=1e-5)
