"""jsft.model.quant against a numpy reference of bitsandbytes' formats (written here from bitsandbytes' definitions:
the whole weight flattened, blocks of 64, nearest code value of x / absmax; nested: blocks of 256 of the flattened
absmax minus their mean, the signed dynamic 8-bit code; int8: per row round(x * 127 / absmax))."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsft.model import quant


def ref_blockwise(x, code, blocksize):
    """Flattened x -> (code indices, absmax per block): the nearest code value by brute force."""
    flat = np.asarray(x, np.float32).reshape(-1)
    n = flat.size
    blocks = [flat[i:i + blocksize] for i in range(0, n, blocksize)]
    absmax = np.array([np.abs(b).max() for b in blocks], np.float32)
    scaled = np.concatenate([b / max(a, 1e-38) for b, a in zip(blocks, absmax)])
    indices = np.argmin(np.abs(scaled[:, None] - code[None, :]), axis=1)
    return indices, absmax


def ref_dequant(indices, absmax, code, blocksize):
    values = code[indices]
    return values * np.repeat(absmax, blocksize)[:values.size]


def weight(shape, seed=0):
    return np.random.default_rng(seed).normal(0, 0.02, size=shape).astype(np.float32)


def test_nf4_code_book_is_the_normal_quantiles():
    """bitsandbytes' create_normal_map(0.9677083): 8 positive and 7 negative N(0,1) quantiles, 0, normalized."""
    from scipy.stats import norm

    positive = norm.ppf(np.linspace(0.9677083, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(0.9677083, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(quant.NF4, values / np.abs(values).max(), atol=1e-6)


def test_dynamic_code_book_matches_bitsandbytes_construction():
    """create_dynamic_map(signed=True) built as bitsandbytes builds it (torch float32 linspace)."""
    import torch

    data = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    ref = np.sort(np.asarray(data + [0.0, 1.0], np.float32))
    assert quant.DYNAMIC.shape == (256,) and quant.DYNAMIC[-1] == 1 and 0.0 in quant.DYNAMIC
    np.testing.assert_allclose(quant.DYNAMIC, ref, rtol=2e-7, atol=0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_round_trip_matches_reference(quant_type):
    w = weight((48, 192))
    arrays = quant.quantize(w, quant_type)
    code = quant.CODES[quant_type]
    ref_idx, ref_absmax = ref_blockwise(w, code, 64)
    np.testing.assert_array_equal(arrays["absmax"].reshape(-1), ref_absmax)
    packed = arrays["codes"].reshape(-1)
    unpacked = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)
    # FP4 holds +0 and -0: either index decodes to the same value
    np.testing.assert_array_equal(code[unpacked], code[ref_idx])
    got = np.asarray(quant.dequantize({k: jnp.asarray(v) for k, v in arrays.items()}, quant_type))
    np.testing.assert_array_equal(got.reshape(-1), ref_dequant(ref_idx, ref_absmax, code, 64).astype(np.float32))
    # the error stays inside half the widest code gap of each block
    gap = np.max(np.diff(np.sort(code))) / 2
    assert np.all(np.abs(got - w) <= gap * np.repeat(ref_absmax, 64).reshape(w.shape) + 1e-7)
    assert arrays["codes"].dtype == np.uint8 and arrays["codes"].shape == (48, 96)


def test_nested_quantization_matches_reference():
    """Double quantization: absmax - mean in blocks of 256 of the flattened absmax, dynamic 8-bit code."""
    w = weight((96, 320), seed=1)  # 96 * 5 = 480 absmax: one full block of 256 and a shorter one
    plain = quant.quantize(w, "nf4")
    nested = quant.quantize(w, "nf4", nested=True)
    np.testing.assert_array_equal(plain["codes"], nested["codes"])
    absmax = plain["absmax"].reshape(-1)
    offset = absmax.mean(dtype=np.float32)
    ref_idx, ref_absmax2 = ref_blockwise(absmax - offset, quant.DYNAMIC, 256)
    np.testing.assert_allclose(nested["offset"], offset, rtol=1e-6)
    np.testing.assert_array_equal(nested["absmax2"], ref_absmax2)
    np.testing.assert_array_equal(quant.DYNAMIC[nested["absmax_codes"].reshape(-1)], quant.DYNAMIC[ref_idx])
    recovered = np.asarray(quant._nested_absmax({k: jnp.asarray(v) for k, v in nested.items()})).reshape(-1)
    np.testing.assert_allclose(recovered, ref_dequant(ref_idx, ref_absmax2, quant.DYNAMIC, 256) + offset, rtol=1e-6)
    assert np.max(np.abs(recovered - absmax) / absmax) < 0.02  # 8-bit scales: ~1 % of each absmax
    dq_plain = np.asarray(quant.dequantize({k: jnp.asarray(v) for k, v in plain.items()}, "nf4"))
    dq_nested = np.asarray(quant.dequantize({k: jnp.asarray(v) for k, v in nested.items()}, "nf4"))
    assert np.sqrt(np.mean((dq_nested - w) ** 2)) < 1.01 * np.sqrt(np.mean((dq_plain - w) ** 2))
    bits = lambda arrays: 8 * sum(v.nbytes for k, v in arrays.items() if k != "codes") / w.size  # noqa: E731
    assert bits(plain) == 0.5 and bits(nested) < 0.15  # bytes of the scales per weight


def test_int8_rowwise_matches_reference():
    w = weight((40, 72), seed=2)
    w[3] = 0.0  # an all-zero row stays zero (no NaN)
    arrays = quant.quantize(w, "int8")
    row_absmax = np.abs(w).max(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.nan_to_num(np.round(w * (127.0 / row_absmax[:, None]))).astype(np.int8)
    np.testing.assert_array_equal(arrays["codes"], ref)
    np.testing.assert_array_equal(arrays["scale"], row_absmax)
    got = np.asarray(quant.dequantize({k: jnp.asarray(v) for k, v in arrays.items()}, "int8"))
    assert np.all(np.abs(got - w) <= row_absmax[:, None] / 254 + 1e-8)
    assert np.all(got[3] == 0)


def test_leading_layer_axis_quantizes_each_matrix_alone():
    stacked = np.stack([weight((64, 128), seed=s) for s in range(3)])
    for quant_type, nested in (("nf4", True), ("fp4", False), ("int8", False)):
        together = quant.quantize(stacked, quant_type, nested)
        alone = [quant.quantize(stacked[i], quant_type, nested) for i in range(3)]
        for key, value in together.items():
            np.testing.assert_array_equal(value, np.stack([a[key] for a in alone]), err_msg=f"{quant_type} {key}")
        shapes = quant.shapes(stacked.shape, quant_type, nested)
        assert {k: v[0] for k, v in shapes.items()} == {k: v.shape for k, v in together.items()}


def test_input_features_not_a_multiple_of_64_is_refused():
    with pytest.raises(quant.QuantizationError, match="layers.0.mlp.down_proj.*multiple of 64"):
        quant.quantize(weight((64, 96)), "nf4", name="layers.0.mlp.down_proj")


def test_matmul_and_its_gradient_use_the_dequantized_kernel():
    kernel = weight((128, 64), seed=3)  # [in, out]
    qk = quant.quantize_kernel(kernel, ("embed", "mlp"), "nf4", True, jnp.float32)
    assert qk.shape == (128, 64) and qk.codes.get_metadata()["out_sharding"] == ("mlp", "embed")
    dense = np.asarray(qk[...])
    assert dense.shape == (128, 64) and np.abs(dense - kernel).max() < 0.02
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 128)), jnp.float32)
    np.testing.assert_allclose(qk.matmul(x, jnp.float32), x @ dense, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(qk.matmul(x, jnp.float32) ** 2))(x)
    g_ref = jax.grad(lambda x: jnp.sum((x @ dense) ** 2))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


def test_quantize_model_swaps_every_projection_and_keeps_the_rest():
    from flax import nnx

    from jsft.model.llama import Llama, LlamaConfig

    cfg = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model = Llama(cfg, rngs=nnx.Rngs(0))
    ids = jnp.arange(8, dtype=jnp.int32)[None]
    want = np.asarray(model(ids, ids, jnp.ones_like(ids)))
    quant.quantize_model(model, "int8")
    kernels = quant.quantized_kernels(model)  # one stacked kernel per projection, every array with the layer axis
    assert sorted(kernels) == sorted(
        f"layers.{m}.{p}.kernel" for m, ps in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
        for p in (f"{x}_proj" for x in ps))
    up = kernels["layers.mlp.up_proj.kernel"]
    assert up.shape == (2, 64, 128) and up.arrays()["codes"].shape == (2, 128, 64)
    assert up.arrays()["scale"].shape == (2, 128)
    assert isinstance(model.lm_head.kernel, nnx.Param)
    got = np.asarray(model(ids, ids, jnp.ones_like(ids)))
    assert 0 < np.abs(got - want).max() < 0.02 * np.abs(want).max()
