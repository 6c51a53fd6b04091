"""LoRA with PEFT's meaning: y = W x + b + (alpha / r) * B(A(dropout(x))), A random, B zeros.

`apply_lora` swaps each targeted `Linear` for a `LoRALinear` that shares its kernel and bias Variables and adds
`lora_a` [in, r] and `lora_b` [r, out] as `nnx.LoRAParam` (so `nnx.LoRAParam` is the trainable filter). Paths of
the base params do not change (layers.self_attn.q_proj.kernel stays), so jsft.hf reads and writes them as before.
On the stacked decoder layers (kernel [N, in, out]) the LoRA params are stacked too: lora_a [N, in, r], lora_b
[N, r, out], one slice per layer; each layer's call sees its slices (Llama.run_layers).

    PEFT (torch layout)                                  jsft
    ...q_proj.lora_A.weight  [r, in]                     ...q_proj.lora_a  [in, r]   (transposed)
    ...q_proj.lora_B.weight  [out, r]                    ...q_proj.lora_b  [r, out]  (transposed)
    ...q_proj.lora_magnitude_vector  [out]  (DoRA)        ...q_proj.lora_magnitude  [out]

DoRA (use_dora, PEFT's formulas): W' = m * (W + s B A) / ||W + s B A|| per output column, the norm detached from
the gradient as PEFT detaches it; m (an nnx.LoRAParam, so trained, checkpointed and counted) starts at ||W||. On a
QLoRA base the norm reads the dequantized kernel.

Dropout is an nnx.Dropout: active by default (training); call `model.eval()` for evaluation / generation and
`model.train()` to switch it back on.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jsft.model.llama import Linear
from jsft.model.params import layer_slices, layer_values
from jsft.model.quant import QuantizedKernel, quantized_kernels
from jsft.peft_names import LINEAR_NAMES, resolve_targets


class LoRALinear(Linear):
    def __init__(self, base: Linear, r: int, alpha: float, dropout: float, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 use_rslora: bool = False, use_dora: bool = False):
        self.kernel, self.bias, self.compute_dtype = base.kernel, base.bias, base.compute_dtype
        *stack, in_features, out_features = base.kernel.shape  # stack: [N] for the stacked decoder layers
        *stack_axes, in_axis, out_axis = base.kernel.get_metadata()["out_sharding"]
        bound = 1.0 / math.sqrt(in_features)  # PEFT: kaiming_uniform_(a=sqrt(5)) on [r, in]
        a = jax.random.uniform(rngs.params(), (*stack, in_features, r), dtype, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, out_sharding=(*stack_axes, in_axis, "lora_rank"), eager_sharding=False)
        self.lora_b = nnx.LoRAParam(jnp.zeros((*stack, r, out_features), dtype),
                                    out_sharding=(*stack_axes, "lora_rank", out_axis), eager_sharding=False)
        # PEFT's scaling: alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA (use_rslora)
        self.r, self.alpha, self.scale = r, alpha, alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        # DoRA: the magnitude m [out] (stacked [N, out]) starts at the column norms ||W|| (B is zero), trained
        self.lora_magnitude = nnx.LoRAParam(
            column_norms(self.kernel, stack[0] if stack else None).astype(dtype),
            out_sharding=(*stack_axes, out_axis), eager_sharding=False) if use_dora else None

    def __call__(self, x):
        if self.lora_magnitude is not None:
            return self._dora(x)
        y = super().__call__(x)
        cd = self.compute_dtype
        h = jnp.dot(self.dropout(x).astype(cd), self.lora_a[...].astype(cd))
        return y + jnp.dot(h, self.lora_b[...].astype(cd)) * jnp.asarray(self.scale, cd)

    def _dora(self, x):
        """PEFT's DoRA forward (peft.tuners.lora.variants.DoraLinearVariant.forward, dora.DoraLinearLayer.forward):

            y = W x + b + (m / n - 1) * W x' + (m / n) * scale * B A x'      n = ||W + scale * B A|| per output

        x' = dropout(x) when dropout is active, else x (then y = (m / n) * (W x + scale * B A x) + b). n gets no
        gradient (PEFT detaches it, DoRA paper section 4.3); m and A, B do. The norm is taken in float32.
        """
        cd = self.compute_dtype
        dropped = self.dropout.rate > 0 and not self.dropout.deterministic
        x_lora = self.dropout(x) if dropped else x
        base = self.project(x)
        base_lora = self.project(x_lora) if dropped else base
        h = jnp.dot(x_lora.astype(cd), self.lora_a[...].astype(cd))
        lora = jnp.dot(h, self.lora_b[...].astype(cd)) * jnp.asarray(self.scale, cd)
        norm = jax.lax.stop_gradient(jnp.linalg.norm(self.merged_weight(dora=False), axis=-2))
        factor = (self.lora_magnitude[...].astype(jnp.float32) / norm).astype(cd)
        y = base + (factor - 1) * base_lora + factor * lora
        return y if self.bias is None else y + self.bias[...].astype(cd)

    def merged_weight(self, layer: int | None = None, dora: bool = True):
        """The kernel with the adapter folded in, float32 [in, out] (stacked and layer None: [N, in, out]):
        W + scale * A @ B, and for DoRA times m / ||W + scale * A @ B|| per output column (PEFT's merge)."""
        pick = (lambda a: a) if layer is None else (lambda a: a[layer])
        a, b = pick(self.lora_a[...]).astype(jnp.float32), pick(self.lora_b[...]).astype(jnp.float32)
        w = kernel_f32(self.kernel, layer) + self.scale * jnp.matmul(a, b)
        if not dora or self.lora_magnitude is None:
            return w
        m = pick(self.lora_magnitude[...]).astype(jnp.float32)
        return w * (m / jnp.linalg.norm(w, axis=-2))[..., None, :]


def kernel_f32(kernel, layer: int | None = None):
    """A plain or quantized (QLoRA) kernel in float32; layer=i: that layer's slice only (dequantized alone)."""
    if isinstance(kernel, QuantizedKernel):
        return kernel.dequantize(jnp.float32, layer=layer)
    value = kernel[...]
    return (value if layer is None else value[layer]).astype(jnp.float32)


def column_norms(kernel, num_layers: int | None):
    """||W|| over the input axis, float32 [out] (stacked: [N, out], one layer dequantized at a time)."""
    if num_layers is None:
        return jnp.linalg.norm(kernel_f32(kernel), axis=-2)
    return jnp.stack([jnp.linalg.norm(kernel_f32(kernel, i), axis=-2) for i in range(num_layers)])


def _linears(model, cls=Linear):
    """(parent, attribute name, path) of every `cls` module under a *_proj attribute (lm_head excluded)."""
    found = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, cls) and path and path[-1] in LINEAR_NAMES:
            parent = model
            for part in path[:-1]:
                parent = parent[part] if isinstance(part, int) else getattr(parent, part)
            found.append((parent, path[-1], ".".join(map(str, path))))
    return found


def apply_lora(model, r: int, alpha: float, dropout: float, target_modules="all-linear", rngs: nnx.Rngs = None,
               dtype=jnp.float32, use_rslora: bool = False, use_dora: bool = False):
    """Add LoRA (use_dora: DoRA) to the targeted projections in place; returns the model. target_modules follow
    PEFT's rules (jsft.peft_names). LoRA params are float32 by default (PEFT keeps adapters in float32 too)."""
    if r < 1:
        raise ValueError(f"lora r={r}: must be >= 1")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    targets = resolve_targets(target_modules, model.cfg.num_layers, model.cfg.qk_norm)
    for parent, name, _ in _linears(model):
        base = getattr(parent, name)
        if name in targets and not isinstance(base, LoRALinear):
            setattr(parent, name, LoRALinear(base, r, alpha, dropout, rngs=rngs, dtype=dtype, use_rslora=use_rslora,
                                             use_dora=use_dora))
    return model


def lora_modules(model) -> dict[str, LoRALinear]:
    """{'layers.self_attn.q_proj': LoRALinear, ...} (one module holding every layer's stacked LoRA params)"""
    return {path: getattr(parent, name) for parent, name, path in _linears(model, LoRALinear)}


def merged_params(model) -> dict:
    """{RULES path: zero-argument function -> array} of every base parameter (stacked ones one layer at a time:
    'layers.3.mlp.up_proj.kernel'), LoRA deltas added to their kernels.

    Lazy, so an export merges one layer's tensor at a time (never a second copy of the model); the model is
    unchanged.
    """
    values = layer_values(model)
    for path, kernel in quantized_kernels(model).items():  # QLoRA: dequantized, one layer at a time
        for name, i in layer_slices(path, model.cfg.num_layers):
            values[name] = lambda k=kernel, i=i: k.dequantize(layer=i)
    for path, module in lora_modules(model).items():
        for kernel, i in layer_slices(f"{path}.kernel", model.cfg.num_layers):
            values[kernel] = lambda m=module, i=i: m.merged_weight(layer=i).astype(m.kernel.dtype)
    return values


def merge_lora(model):
    """Fold every adapter into its kernel (LoRALinear.merged_weight) and drop the LoRA params; returns the model."""
    for parent, name, _ in _linears(model, LoRALinear):
        module = getattr(parent, name)
        kernel = module.kernel
        merged = module.merged_weight().astype(kernel.dtype)
        if isinstance(kernel, QuantizedKernel):  # QLoRA: dequantize, then merge, into a plain kernel Param
            module.kernel = nnx.Param(merged, out_sharding=kernel.names, eager_sharding=False)
        else:
            kernel[...] = merged
        setattr(parent, name, _plain_linear(module))
    return model


def _plain_linear(module: LoRALinear) -> Linear:
    """A Linear holding the same kernel and bias Variables (built abstractly, then given the real ones)."""
    *stack, in_features, out_features = module.kernel.shape
    names = module.kernel.get_metadata()["out_sharding"][-2:]
    plain = nnx.eval_shape(lambda: Linear(in_features, out_features, names, bias=module.bias is not None,
                                          param_dtype=module.kernel.dtype, compute_dtype=module.compute_dtype,
                                          rngs=nnx.Rngs(0), stack=stack[0] if stack else None))
    plain.kernel, plain.bias = module.kernel, module.bias
    return plain
