"""The model's parameters by name: dotted paths, the base (non-LoRA) params, and the per-layer slices of the stacked
decoder layers ('layers.mlp.up_proj.kernel' [N, ...] <-> 'layers.{i}.mlp.up_proj.kernel', the names jsft.hf.RULES
maps to HF). Used by the HF loader/exporter and by LoRA merging alike.
"""

from __future__ import annotations

import re

from flax import nnx


STACKED = "layers."  # parameters under this prefix carry a leading layer axis


def layer_slices(path: str, num_layers: int) -> list[tuple[str, int | None]]:
    """A model parameter path -> the RULES paths of its slices: 'layers.mlp.up_proj.kernel' ->
    [('layers.0.mlp.up_proj.kernel', 0), ..., ('layers.{N-1}...', N-1)]; 'norm.scale' -> [('norm.scale', None)]."""
    if not path.startswith(STACKED):
        return [(path, None)]
    rest = path.removeprefix(STACKED)
    return [(f"{STACKED}{i}.{rest}", i) for i in range(num_layers)]


def stacked_path(path: str) -> tuple[str, int | None]:
    """The inverse of layer_slices: 'layers.3.mlp.up_proj.kernel' -> ('layers.mlp.up_proj.kernel', 3)."""
    if m := re.match(re.escape(STACKED) + r"(\d+)\.(.+)$", path):
        return STACKED + m.group(2), int(m.group(1))
    return path, None


def layer_values(model: nnx.Module) -> dict:
    """{RULES path: zero-argument function -> that tensor}: every base parameter, stacked ones slice by slice
    (lazy: an export takes one layer's slice at a time)."""
    values = {}
    for p, var in base_params(model).items():
        for name, i in layer_slices(p, model.cfg.num_layers):
            values[name] = var.get_value if i is None else (lambda v=var, i=i: v.get_value()[i])
    return values


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def base_params(model: nnx.Module) -> dict[str, nnx.Variable]:
    """{'layers.0.mlp.up_proj.kernel': Variable, ...}: every nnx.Param that is not a LoRA param."""
    params = nnx.state(model, nnx.Param)
    return {path_str(p): v for p, v in nnx.to_flat_state(params) if not isinstance(v, nnx.LoRAParam)}
