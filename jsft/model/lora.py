"""LoRA with PEFT's meaning: y = W x + b + (alpha / r) * B(A(dropout(x))), A random, B zeros.

`apply_lora` swaps each targeted `Linear` for a `LoRALinear` that shares its kernel and bias Variables and adds
`lora_a` [in, r] and `lora_b` [r, out] as `nnx.LoRAParam` (so `nnx.LoRAParam` is the trainable filter). Paths of
the base params do not change (layers.self_attn.q_proj.kernel stays), so jsft.hf reads and writes them as before.
On the stacked decoder layers (kernel [N, in, out]) the LoRA params are stacked too: lora_a [N, in, r], lora_b
[N, r, out], one slice per layer; each layer's call sees its slices (Llama.run_layers).

    PEFT (torch layout)                                  jsft
    ...q_proj.lora_A.weight  [r, in]                     ...q_proj.lora_a  [in, r]   (transposed)
    ...q_proj.lora_B.weight  [out, r]                    ...q_proj.lora_b  [r, out]  (transposed)

Dropout is an nnx.Dropout: active by default (training); call `model.eval()` for evaluation / generation and
`model.train()` to switch it back on.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jsft.model.llama import Linear
from jsft.model.quant import QuantizedKernel

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(Linear):
    def __init__(self, base: Linear, r: int, alpha: float, dropout: float, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 use_rslora: bool = False):
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

    def __call__(self, x):
        y = super().__call__(x)
        cd = self.compute_dtype
        h = jnp.dot(self.dropout(x).astype(cd), self.lora_a[...].astype(cd))
        return y + jnp.dot(h, self.lora_b[...].astype(cd)) * jnp.asarray(self.scale, cd)

    def delta(self):
        """scale * A @ B in float32: what merging adds to the kernel [in, out] (stacked: [N, in, out])."""
        return self.scale * jnp.matmul(self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32))


def resolve_targets(target_modules) -> tuple[str, ...]:
    """"all-linear" (PEFT: every linear layer but the output head) or a list of HF module names."""
    if target_modules == "all-linear" or target_modules == ["all-linear"]:
        return LINEAR_NAMES
    names = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    unknown = [n for n in names if n not in LINEAR_NAMES]
    if unknown:
        raise ValueError(f"lora target_modules {unknown} are not linear layers of the model; use names from "
                         f"{', '.join(LINEAR_NAMES)} or 'all-linear'")
    return names


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
               dtype=jnp.float32, use_rslora: bool = False):
    """Add LoRA to the targeted projections in place; returns the model. LoRA params are float32 by default
    (PEFT keeps adapters in float32 too)."""
    if r < 1:
        raise ValueError(f"lora r={r}: must be >= 1")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    targets = resolve_targets(target_modules)
    for parent, name, _ in _linears(model):
        base = getattr(parent, name)
        if name in targets and not isinstance(base, LoRALinear):
            setattr(parent, name, LoRALinear(base, r, alpha, dropout, rngs=rngs, dtype=dtype, use_rslora=use_rslora))
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
    from jsft.model.params import layer_slices, layer_values
    from jsft.model.quant import quantized_kernels

    values = layer_values(model)
    for path, kernel in quantized_kernels(model).items():  # QLoRA: dequantized, one layer at a time
        for name, i in layer_slices(path, model.cfg.num_layers):
            values[name] = lambda k=kernel, i=i: k.dequantize(layer=i)
    for path, module in lora_modules(model).items():
        for kernel, i in layer_slices(f"{path}.kernel", model.cfg.num_layers):
            values[kernel] = lambda m=module, i=i: _merged(m, i)
    return values


def _merged(module: LoRALinear, i: int | None):
    """Layer i's kernel (i None: an unstacked one) + scale * A @ B, in the kernel's dtype."""
    pick = (lambda a: a) if i is None else (lambda a: a[i])
    if isinstance(module.kernel, QuantizedKernel):  # QLoRA: only layer i dequantized
        kernel = module.kernel.dequantize(layer=i)
    else:
        kernel = pick(module.kernel[...])
    a, b = pick(module.lora_a[...]), pick(module.lora_b[...])
    delta = module.scale * jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32))
    return (kernel + delta).astype(kernel.dtype)


def merge_lora(model):
    """Fold every LoRA delta into its kernel (W + scale * A @ B) and drop the LoRA params; returns the model."""
    for parent, name, _ in _linears(model, LoRALinear):
        module = getattr(parent, name)
        kernel = module.kernel
        merged = (kernel[...].astype(jnp.float32) + module.delta()).astype(kernel.dtype)
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
