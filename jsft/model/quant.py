"""A quantized frozen base for QLoRA: bitsandbytes' NF4 / FP4 4-bit, nested (double) quantization, LLM.int8 8-bit.

Hand-written: Qwix 0.1.8 (the JAX quantization library) has NF4 but not bitsandbytes' FP4 code book, no nested
quantization of the scales, and its int8 scale is absmax/127.5 where bitsandbytes' is absmax/127.

The formats are bitsandbytes' (functional.quantize_4bit / quantize_blockwise / int8_vectorwise_quant), applied to
each weight in HF's layout W [out, in] (a leading layer axis, if any, is kept: each layer's matrix on its own):

    4-bit      blocks of 64 along the flattened matrix; absmax per block (float32); each value x/absmax -> the
               nearest of 16 code values (NF4: normal quantiles; FP4: 1 sign, 2 exponent, 1 mantissa bit), two
               4-bit indices per byte (the first in the high nibble):  codes uint8 [..., out, in/2],
               absmax float32 [..., out, in/64]  (blocks of 64 never cross a row: in % 64 == 0 is required)
    nested     the absmax themselves quantized: offset = mean(absmax) per matrix, (absmax - offset) in blocks of
               256 of the flattened [out, in/64] -> bitsandbytes' signed 8-bit dynamic code book, with a float32
               absmax2 per block:  absmax_codes uint8 [..., out, in/64], absmax2 float32 [..., ceil(out*in/64/256)],
               offset float32 [...]  (0.127 bits per weight of scales instead of 0.5)
    int8       LLM.int8's weight format: per output row, codes = round(W * 127 / absmax_row):
               codes int8 [..., out, in], scale float32 [..., out] (bitsandbytes' SCB)

Dequantizing is code[index] * absmax in float32, then the compute dtype, as bitsandbytes does. int8: jsft
multiplies by the whole dequantized weight (no outlier decomposition of the activations: bitsandbytes'
llm_int8_threshold splits outlier columns into a 16-bit matmul; jsft runs every column in 16 bits).

`QuantizedKernel` stands where a Linear's kernel Param stood: `kernel[...]` is the dequantized [in, out] kernel,
`kernel.matmul(x)` is x @ kernel with the dequantization rematerialized in the backward pass (the bf16 weight is
never saved between forward and backward). Its arrays are `Quantized` Variables: not nnx.Param, so no optimizer,
gradient or checkpoint ever holds them; they carry the original's logical axes (HF order), so they shard like it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BLOCKSIZE = 64  # bitsandbytes' default for 4-bit (quantize_4bit blocksize=None -> 64)
NESTED_BLOCKSIZE = 256  # quantize_4bit(compress_statistics=True) quantizes the absmax in blocks of 256
QUANT_TYPES = ("nf4", "fp4", "int8")
STORAGE_DTYPES = (None, "uint8", "int8", "bfloat16", "float16", "float32")

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), index order = value order
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
# get_4bit_type("fp4"): e2m1 with bitsandbytes' bias, in bit-pattern order (bit 3 = sign), normalized by 12
FP4 = (np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
                np.float32) / np.float32(12.0)).astype(np.float32)
CODES = {"nf4": NF4, "fp4": FP4}


class QuantizationError(ValueError):
    """A weight this format cannot quantize; the message names the tensor and the fix."""


def dynamic_code() -> np.ndarray:
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): 256 sorted float32 values
    in [-1, 1], dense near 0 (the code book of quantize_blockwise, used for the nested absmax). numpy's float32
    linspace differs from torch's in the last bit for some entries: values within 1 ulp of bitsandbytes'."""
    data = []
    exponent_bits, non_sign_bits = 7, 7
    for i in range(exponent_bits):
        boundaries = np.linspace(0.1, 1, 2 ** (i + non_sign_bits - exponent_bits) + 1, dtype=np.float32)
        means = ((boundaries[:-1] + boundaries[1:]) / np.float32(2.0)).astype(np.float64)
        scale = 10.0 ** (-(exponent_bits - 1) + i)
        data += list(scale * means) + list(-scale * means)
    data += [0.0, 1.0]
    return np.sort(np.asarray(data, np.float32))


DYNAMIC = dynamic_code()


def _sorted_bounds(code: np.ndarray):
    """Midpoints between consecutive sorted code values, and the code index of each sorted position."""
    order = np.argsort(code, kind="stable")
    return (code[order[:-1]] + code[order[1:]]) / np.float32(2.0), order


def _blockwise(x: np.ndarray, code: np.ndarray, blocksize: int):
    """x [..., n] float32 -> (indices uint8 [..., n], absmax float32 [..., ceil(n / blocksize)]): blocks of
    `blocksize` along the last axis (a shorter last block has its own absmax), each x / absmax to the nearest code
    value (a value on a midpoint goes to the lower one, as torch.bucketize and the CUDA kernels do)."""
    n = x.shape[-1]
    pad = (-n) % blocksize
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], -1, blocksize)
    absmax = np.max(np.abs(padded), axis=-1)
    scaled = np.clip(padded * (np.float32(1.0) / np.maximum(absmax, np.float32(1e-38)))[..., None], -1, 1)
    bounds, order = _sorted_bounds(code)
    indices = order[np.searchsorted(bounds, scaled, side="left")].astype(np.uint8)
    return indices.reshape(*x.shape[:-1], -1)[..., :n], absmax.astype(np.float32)


def quantize(w, quant_type: str, nested: bool = False, name: str = "weight") -> dict[str, np.ndarray]:
    """A weight in HF layout [..., out, in] (numpy, any float dtype) -> its quantized arrays (see the module doc)."""
    w = np.asarray(w, np.float32)
    if quant_type == "int8":
        scale = np.max(np.abs(w), axis=-1).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero row: 0 * inf = nan -> code 0
            codes = np.nan_to_num(np.round(w * (np.float32(127.0) / scale[..., None])), nan=0.0)
        return {"codes": codes.astype(np.int8), "scale": scale}
    if quant_type not in CODES:
        raise QuantizationError(f"bnb_4bit_quant_type={quant_type!r}: choose nf4 or fp4")
    if w.shape[-1] % BLOCKSIZE:
        raise QuantizationError(f"{name} has {w.shape[-1]} input features, not a multiple of {BLOCKSIZE} (the 4-bit "
                                "block size): jsft keeps blocks inside a row so the codes shard like the weight. Fix: "
                                "load this model without load_in_4bit (load_in_8bit has no such limit)")
    indices, absmax = _blockwise(w, CODES[quant_type], BLOCKSIZE)
    arrays = {"codes": (indices[..., 0::2] << 4) | indices[..., 1::2]}
    if not nested:
        return {**arrays, "absmax": absmax}
    offset = np.mean(absmax.reshape(*absmax.shape[:-2], -1), axis=-1, dtype=np.float32)
    flat = (absmax - offset[..., None, None]).reshape(*absmax.shape[:-2], -1)
    absmax_codes, absmax2 = _blockwise(flat, DYNAMIC, NESTED_BLOCKSIZE)
    return {**arrays, "absmax_codes": absmax_codes.reshape(absmax.shape), "absmax2": absmax2,
            "offset": offset.astype(np.float32)}


def dequantize(arrays: dict, quant_type: str, dtype=jnp.float32):
    """The quantized arrays -> the weight [..., out, in] in `dtype` (jnp; traceable, also inside jit)."""
    if quant_type == "int8":
        scale = arrays["scale"].astype(jnp.float32) / jnp.float32(127.0)
        return (arrays["codes"].astype(jnp.float32) * scale[..., None]).astype(dtype)
    codes = arrays["codes"]
    indices = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)
    values = jnp.asarray(CODES[quant_type])[indices.astype(jnp.int32)]
    absmax = arrays["absmax"] if "absmax" in arrays else _nested_absmax(arrays)
    blocks = values.reshape(*values.shape[:-1], -1, BLOCKSIZE) * absmax[..., None]
    return blocks.reshape(values.shape).astype(dtype)


def _nested_absmax(arrays: dict):
    """absmax float32 [..., out, in/64] from its 8-bit codes: dynamic code * absmax2 of its block of 256 (block =
    flat index // 256, computed elementwise so a sharded [out, in/64] stays sharded), + offset."""
    q, absmax2, offset = arrays["absmax_codes"], arrays["absmax2"], arrays["offset"]
    rows, cols = q.shape[-2:]
    block = (jnp.arange(rows)[:, None] * cols + jnp.arange(cols)[None, :]) // NESTED_BLOCKSIZE
    scale2 = jnp.take(absmax2, block, axis=-1)  # [..., rows, cols]
    return jnp.asarray(DYNAMIC)[q.astype(jnp.int32)] * scale2 + offset[..., None, None]


def shapes(hf_shape: tuple, quant_type: str, nested: bool) -> dict[str, tuple]:
    """{array name: (shape, dtype, which original axes it keeps: a tuple of indices into (..., out, in))}."""
    *lead, out, inp = hf_shape
    lead, keep = tuple(lead), tuple(range(len(lead)))
    o, i = len(lead), len(lead) + 1
    if quant_type == "int8":
        return {"codes": (lead + (out, inp), jnp.int8, keep + (o, i)),
                "scale": (lead + (out,), jnp.float32, keep + (o,))}
    blocks = inp // BLOCKSIZE
    result = {"codes": (lead + (out, inp // 2), jnp.uint8, keep + (o, i))}
    if not nested:
        return {**result, "absmax": (lead + (out, blocks), jnp.float32, keep + (o, i))}
    n2 = -(-(out * blocks) // NESTED_BLOCKSIZE)
    return {**result, "absmax_codes": (lead + (out, blocks), jnp.uint8, keep + (o, i)),
            "absmax2": (lead + (n2,), jnp.float32, keep + (None,)), "offset": (lead, jnp.float32, keep)}


class Quantized(nnx.Variable):
    """Codes or scales of a quantized frozen weight: never trained (not an nnx.Param)."""


class QuantizedKernel(nnx.Module):
    """The kernel [..., in, out] of a Linear, held quantized in HF's [..., out, in] layout.

    shape / dtype / get_metadata() answer as the kernel Param did (dtype: what `kernel[...]` dequantizes to);
    `matmul(x, compute_dtype)` is x @ kernel. Build abstract (values None: jax.ShapeDtypeStruct) and `set_arrays`.
    On the stacked decoder layers every array has the leading layer axis; `shape` is static (the stacked shape),
    while Llama.run_layers hands each layer's call the arrays' slices, so matmul / dequantize go by the arrays'
    own shapes.
    """

    def __init__(self, shape: tuple, names: tuple, quant_type: str, nested: bool, dtype, values: dict | None = None):
        self.shape, self.names, self.quant_type, self.nested = tuple(shape), tuple(names), quant_type, nested
        self.dtype = dtype
        hf_shape = self.shape[:-2] + self.shape[-2:][::-1]
        hf_names = self.names[:-2] + self.names[-2:][::-1]
        for key, (shp, dt, axes) in shapes(hf_shape, quant_type, nested).items():
            value = jax.ShapeDtypeStruct(shp, dt) if values is None else values[key]
            axis_names = tuple(None if a is None else hf_names[a] for a in axes)
            setattr(self, key, Quantized(value, out_sharding=axis_names, eager_sharding=False))

    def get_metadata(self) -> dict:
        return {"out_sharding": self.names}

    def array_names(self) -> tuple[str, ...]:
        return tuple(shapes((2, BLOCKSIZE), self.quant_type, self.nested))

    def arrays(self, layer: int | None = None) -> dict:
        """The quantized arrays; layer=i: their slices of layer i (each array's leading axis)."""
        pick = (lambda a: a) if layer is None else (lambda a: a[layer])
        return {key: pick(getattr(self, key)[...]) for key in self.array_names()}

    def dequantize(self, dtype=None, layer: int | None = None):
        """The kernel [..., in, out] in `dtype` (default: self.dtype); layer=i: layer i's [in, out] only (a stacked
        kernel's export dequantizes one layer at a time)."""
        w = dequantize(self.arrays(layer), self.quant_type, dtype or self.dtype)
        return jnp.swapaxes(w, -1, -2)

    def __getitem__(self, index):
        return self.dequantize()[index]

    def matmul(self, x, compute_dtype):
        """x [..., in] @ kernel -> [..., out] in compute_dtype; the dequantized weight is recomputed for the
        backward pass (jax.checkpoint), so only the codes stay alive between forward and backward."""
        quant_type = self.quant_type

        @jax.checkpoint
        def run(x, arrays):
            w = dequantize(arrays, quant_type, compute_dtype)  # [..., out, in]
            return jnp.einsum("...i,oi->...o", x, w)

        return run(x.astype(compute_dtype), self.arrays())


def quantize_kernel(kernel_in_out, names: tuple, quant_type: str, nested: bool, dtype, name: str = "kernel"):
    """A kernel [..., in, out] (numpy) -> a QuantizedKernel holding its quantized arrays (device arrays)."""
    hf = np.swapaxes(np.asarray(kernel_in_out), -1, -2)
    values = {k: jnp.asarray(v) for k, v in quantize(hf, quant_type, nested, name).items()}
    return QuantizedKernel(np.shape(kernel_in_out), names, quant_type, nested, dtype, values)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # not lm_head


def abstract_quantized(model, quant_type: str, nested: bool) -> dict[str, QuantizedKernel]:
    """In an abstract model (nnx.eval_shape): swap each projection's kernel Param for an abstract QuantizedKernel
    of the same shape, axes and dtype. Returns {'layers.mlp.up_proj.kernel': QuantizedKernel, ...} to fill
    (stacked: one per projection, every array with the leading layer axis)."""
    swapped = {}
    for path, node in list(nnx.iter_graph(model)):
        kernel = getattr(node, "kernel", None)
        if path and path[-1] in PROJECTIONS and isinstance(kernel, nnx.Param):
            names = kernel.get_metadata()["out_sharding"]
            node.kernel = QuantizedKernel(tuple(kernel.shape), names, quant_type, nested, kernel.dtype)
            swapped[".".join(map(str, path)) + ".kernel"] = node.kernel
    return swapped


def quantize_model(model, quant_type: str, nested: bool = False):
    """Quantize the projection kernels of an in-memory model in place (e.g. a random-init one); returns it."""
    for path, node in list(nnx.iter_graph(model)):
        kernel = getattr(node, "kernel", None)
        if path and path[-1] in PROJECTIONS and isinstance(kernel, nnx.Param):
            name = ".".join(map(str, path))
            node.kernel = quantize_kernel(np.asarray(jax.device_get(kernel[...]), np.float32),
                                          kernel.get_metadata()["out_sharding"], quant_type, nested, kernel.dtype, name)
    return model


def quantized_kernels(model) -> dict[str, QuantizedKernel]:
    """{'layers.mlp.up_proj.kernel': QuantizedKernel, ...} of a model (stacked: one per projection)."""
    return {".".join(map(str, path)): node for path, node in nnx.iter_graph(model) if isinstance(node, QuantizedKernel)}


def bytes_by_dtype(model) -> dict[str, int]:
    """The frozen base's bytes by dtype (params that are not LoRA params, and quantized arrays)."""
    totals: dict[str, int] = {}
    state = nnx.state(model, nnx.Any(nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)), Quantized))
    for leaf in jax.tree.leaves(state):
        name = jnp.dtype(leaf.dtype).name
        totals[name] = totals.get(name, 0) + int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return dict(sorted(totals.items()))
