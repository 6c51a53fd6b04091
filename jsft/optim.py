"""The optimizer: AdamW with transformers' schedules, clipping and weight-decay mask; and the trainable filter.

    tx, schedule = make_optimizer(config.training, total_steps)
    optimizer = nnx.Optimizer(model, tx, wrt=trainable_filter(lora=..., new_token_rows=...))

The chain, in order (what `torch.nn.utils.clip_grad_norm_` + `torch.optim.AdamW` + a transformers LR scheduler do
inside HF's Trainer):

    clip_by_global_norm(max_grad_norm)     skipped when max_grad_norm <= 0 (as in transformers)
    scale_by_adam(b1, b2, eps)             first moment in optimizer_state_dtype, second moment in float32
    add_decayed_weights(weight_decay)      decoupled (AdamW), only on params `decays(path)` accepts
    scale_by_learning_rate(schedule)       schedule(step) = learning_rate * transformers' lr_lambda(step)

Step numbering: the k-th update (k = 0, 1, ...) uses schedule(k), like HF's Trainer, which calls
`optimizer.step()` before `scheduler.step()`; with warmup the first update therefore uses a learning rate of 0.

Gradient accumulation is NOT done here (no optax.MultiSteps): the train step scans over its micro-batches and
sums their gradients (each already divided by the step's trained-token total, see jsft.loss.normalize), then
makes one update. So `tx.update` runs once per optimizer step and the schedule counts optimizer steps.

optimizer_state_dtype="bfloat16" stores Adam's first moment (mu) in bf16 (optax `mu_dtype`). The second moment
stays float32 on purpose: with beta2 = 0.999 the per-step relative change of nu (0.001) is below bf16's
resolution (2^-8), so a bf16 nu would stop decaying.

master_weights_fp32=True (for bf16 params): the optimizer state keeps a float32 copy of every trainable param.
Each update runs AdamW on that copy in float32 and returns `new_master.astype(bf16) - param` as float32
updates, so `optax.apply_updates` writes exactly the rounded master into the bf16 param. Small updates that bf16
would round away accumulate in the master copy instead of being lost.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jsft.config import CHOICES, ConfigError, TrainingConfig
from jsft.model.params import STACKED

SCHEDULES = ("linear", "cosine", "cosine_with_min_lr", "cosine_with_restarts", "polynomial", "constant",
             "constant_with_warmup", "inverse_sqrt", "warmup_stable_decay")

# transformers.Trainer.get_decay_parameter_names: no weight decay on biases and norm weights.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
# Param paths that hold the embedding rows and the output head (jsft.model.llama names them like HF).
NEW_TOKEN_ROW_PATHS = ("embed_tokens", "lm_head")


# ----------------------------------------------------------------------------------------------- schedule


def num_warmup_steps(training: TrainingConfig, total_steps: int) -> int:
    """warmup_steps when > 0, else ceil(warmup_ratio * total_steps) (transformers' get_warmup_steps).

    Example: total_steps=95, warmup_ratio=0.1 -> ceil(9.5) = 10 warmup steps."""
    if training.warmup_steps > 0:
        return int(training.warmup_steps)
    return math.ceil(total_steps * training.warmup_ratio)


def schedule_options(training: TrainingConfig, total_steps: int) -> dict:
    """lr_lambda's options from lr_scheduler_kwargs (checked by jsft.config.validate), with transformers' defaults:
    num_cycles 0.5 (1 for cosine_with_restarts); min_lr_rate, or min_lr turned into min_lr / learning_rate;
    polynomial: lr_end 1e-7 and power 1.0, lr_end as a ratio of learning_rate; inverse_sqrt: timescale
    (default num_warmup_steps or 10_000); warmup_stable_decay: num_decay_steps (required), num_stable_steps
    (default: what is left of total_steps), warmup_type linear, decay_type cosine, min_lr_ratio 0."""
    kwargs, name = training.lr_scheduler_kwargs or {}, training.lr_scheduler_type
    warmup = num_warmup_steps(training, total_steps)
    options = {"num_cycles": float(kwargs.get("num_cycles", 1 if name == "cosine_with_restarts" else 0.5))}
    if name == "cosine_with_min_lr":
        rate = kwargs["min_lr"] / training.learning_rate if "min_lr" in kwargs else kwargs["min_lr_rate"]
        options["min_lr_rate"] = float(rate)
    if name == "polynomial":
        lr_end = float(kwargs.get("lr_end", 1e-7))
        if not training.learning_rate > lr_end:
            raise ConfigError(f"training.lr_scheduler_kwargs: lr_end ({lr_end}) must be smaller than "
                              f"training.learning_rate ({training.learning_rate}) for lr_scheduler_type='polynomial'")
        options.update(min_lr_rate=lr_end / training.learning_rate, power=float(kwargs.get("power", 1.0)))
    if name == "inverse_sqrt":
        options["timescale"] = int(kwargs.get("timescale") or warmup or 10_000)
    if name == "warmup_stable_decay":
        decay = int(kwargs["num_decay_steps"])
        options.update(num_decay_steps=decay,
                       num_stable_steps=int(kwargs.get("num_stable_steps", total_steps - warmup - decay)),
                       warmup_type=kwargs.get("warmup_type", "linear"), decay_type=kwargs.get("decay_type", "cosine"),
                       min_lr_rate=float(kwargs.get("min_lr_ratio", 0.0)))
    return options


def _shape(kind: str, progress):
    """transformers' warmup/decay shapes for warmup_stable_decay: progress in [0, 1] -> factor."""
    if kind == "linear":
        return progress
    if kind == "cosine":
        return 0.5 * (1.0 - jnp.cos(jnp.pi * progress))
    return 1.0 - jnp.sqrt(1.0 - progress)  # 1-sqrt


def lr_lambda(name: str, step, warmup: int, total: int, num_cycles: float = 0.5, min_lr_rate: float = 0.0,
              power: float = 1.0, timescale: int = 10_000, num_decay_steps: int = 0, num_stable_steps: int = 0,
              warmup_type: str = "linear", decay_type: str = "cosine"):
    """transformers' lr_lambda for `name` at optimizer step `step` (a multiplier of learning_rate), in jnp."""
    step = jnp.asarray(step, jnp.float32)
    warm = step / max(1.0, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if name == "constant":
        return jnp.ones_like(step)
    if name == "constant_with_warmup":
        after = jnp.ones_like(step)
    elif name == "linear":
        after = jnp.maximum(0.0, (total - step) / max(1, total - warmup))
    elif name in ("cosine", "cosine_with_min_lr"):  # num_cycles = 0.5: one half cosine from 1 to min_lr_rate
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * num_cycles * 2.0 * progress))
        after = jnp.maximum(0.0, cosine * (1.0 - min_lr_rate) + min_lr_rate)
    elif name == "cosine_with_restarts":  # num_cycles hard restarts, 0 from the last step on
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.mod(num_cycles * progress, 1.0)))
        after = jnp.where(progress >= 1.0, 0.0, jnp.maximum(0.0, cosine))
    elif name == "polynomial":  # from 1 to lr_end / learning_rate (= min_lr_rate) as (1 - progress) ** power
        remaining = jnp.maximum(0.0, 1.0 - progress)
        after = jnp.where(step > total, min_lr_rate, (1.0 - min_lr_rate) * remaining**power + min_lr_rate)
    elif name == "inverse_sqrt":
        after = 1.0 / jnp.sqrt((step + timescale - warmup) / timescale)
    elif name == "warmup_stable_decay":  # warmup from min_lr_rate, stable at 1, decay to min_lr_rate, then flat
        up = _shape(warmup_type, jnp.clip(warm, 0.0, 1.0)) * (1.0 - min_lr_rate) + min_lr_rate
        decay_progress = jnp.clip((step - warmup - num_stable_steps) / max(1, num_decay_steps), 0.0, 1.0)
        down = 1.0 - decay_progress if decay_type == "linear" else (
            0.5 * (1.0 + jnp.cos(jnp.pi * num_cycles * 2.0 * decay_progress)) if decay_type == "cosine"
            else 1.0 - jnp.sqrt(decay_progress))
        down = jnp.maximum(0.0, down * (1.0 - min_lr_rate) + min_lr_rate)
        after = jnp.where(step < warmup + num_stable_steps, 1.0,
                          jnp.where(step < warmup + num_stable_steps + num_decay_steps, down, min_lr_rate))
        return jnp.where(step < warmup, jnp.maximum(0.0, up), after)
    else:
        raise ConfigError(f"training.lr_scheduler_type={name!r}: choose one of {', '.join(SCHEDULES)}")
    return jnp.where(step < warmup, warm, after)


def make_schedule(training: TrainingConfig, total_steps: int):
    """step -> learning rate (float32), equal to transformers.get_scheduler(...) for the same settings."""
    warmup = num_warmup_steps(training, total_steps)
    name, lr = training.lr_scheduler_type, training.learning_rate
    lr_lambda(name, 0, warmup, total_steps)  # unknown names fail here, not inside jit
    options = schedule_options(training, total_steps)

    def schedule(step):
        return (lr * lr_lambda(name, step, warmup, total_steps, **options)).astype(jnp.float32)

    return schedule


# ----------------------------------------------------------------------------------------------- weight decay


def path_name(path) -> str:
    """A jax key path -> 'layers.0.input_layernorm.scale' (Variable '.value' suffixes dropped)."""
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        parts.append(str(name))
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def decays(name: str) -> bool:
    """Whether the param at dotted path `name` gets weight decay: everything except biases and norm weights,
    by transformers' own name patterns. Examples: 'layers.0.mlp.up_proj.kernel' -> True,
    'layers.0.input_layernorm.scale' -> False, 'norm.scale' -> False, 'layers.0.self_attn.q_proj.bias' -> False."""
    return not any(re.search(p, name.lower()) for p in NO_DECAY_PATTERNS)


def decay_mask(params):
    """The params tree -> the same tree of bools, True where `decays`."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path_name(path)), params)


# ----------------------------------------------------------------------------------------------- master weights


class MasterWeightsState(NamedTuple):
    master: optax.Params  # float32 copy of the trainable params
    inner: optax.OptState


def with_fp32_master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run `inner` on a float32 copy of the params kept in the optimizer state (see the module docstring)."""

    def init(params):
        master = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
        return MasterWeightsState(master, inner.init(master))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("with_fp32_master_weights needs params in tx.update (nnx.Optimizer passes them)")
        grads32 = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
        updates, inner_state = inner.update(grads32, state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        out = jax.tree.map(lambda m, p: m.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32), master, params)
        return out, MasterWeightsState(master, inner_state)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------------------------- the optimizer


def make_optimizer(training: TrainingConfig, total_steps: int):
    """(optax.GradientTransformation, schedule) for `total_steps` optimizer steps; see the module docstring."""
    if total_steps < 1:
        raise ConfigError(f"total_steps={total_steps}: need at least one optimizer step (check training.max_steps, "
                          "training.num_train_epochs and the dataset size)")
    schedule = make_schedule(training, total_steps)
    parts = []
    if training.max_grad_norm and training.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(training.max_grad_norm))
    parts.extend(_update_rule(training, schedule))
    tx = optax.chain(*parts)
    if training.master_weights_fp32:
        tx = with_fp32_master_weights(tx)
    return tx, schedule


def _update_rule(training: TrainingConfig, schedule) -> list:
    """The optimizer after clipping, as optax parts (weight decay only where `decays`).

    adamw_torch(_fused): torch.optim.AdamW, decoupled decay.
    adafactor:  transformers' Adafactor as its Trainer makes it (scale_parameter=False, relative_step=False,
                no first moment, eps 1e-30, update clipped to RMS 1, decay rate step**-0.8, every matrix factored);
                decay p -= lr * weight_decay * p.
    sgd:        torch.optim.SGD: weight decay added to the gradient (L2, coupled) before momentum
                (optim_args momentum, default 0; nesterov, default False), dampening 0.
    lion_32bit: bitsandbytes' Lion with betas (adam_beta1, adam_beta2), decoupled decay.
    muon:       optax.contrib.muon (Newton-Schulz orthogonalized momentum on every matrix, its Adam on the rest,
                batch axes in front, reduction axis -2, output axis -1); decoupled decay.
    """
    name, wd, args = training.optim, training.weight_decay, training.optim_args or {}
    decay = [optax.add_decayed_weights(wd, mask=decay_mask)] if wd else []
    lr = [optax.scale_by_learning_rate(schedule)]
    if name in ("adamw_torch", "adamw_torch_fused"):
        mu_dtype = jnp.bfloat16 if training.optimizer_state_dtype == "bfloat16" else jnp.float32
        return [_scale_by_adam_fp32_nu(training.adam_beta1, training.adam_beta2, training.adam_epsilon, mu_dtype),
                *decay, *lr]
    if name == "adafactor":
        factored = optax.chain(
            optax.scale_by_factored_rms(factored=True, decay_rate=0.8, min_dim_size_to_factor=1, epsilon=1e-30),
            optax.clip_by_block_rms(1.0))
        return [each_layer(factored), *decay, *lr]
    if name == "sgd":
        momentum = float(args.get("momentum", 0.0))
        nesterov = str(args.get("nesterov", "false")).lower() in ("true", "1", "yes")
        return [*decay, *([optax.trace(momentum, nesterov=nesterov)] if momentum else []), *lr]
    if name == "lion_32bit":
        return [optax.scale_by_lion(b1=training.adam_beta1, b2=training.adam_beta2), *decay, *lr]
    if name == "muon":
        from optax.contrib import muon  # a whole optimizer (its own lr and decay): used as the update rule

        return [muon(schedule, beta=float(args.get("beta", 0.95)), ns_steps=int(args.get("ns_steps", 5)),
                     nesterov=str(args.get("nesterov", "true")).lower() in ("true", "1", "yes"),
                     weight_decay=wd, weight_decay_mask=decay_mask, adam_b1=training.adam_beta1,
                     adam_b2=training.adam_beta2, eps=training.adam_epsilon, adam_weight_decay=wd,
                     muon_weight_dimension_numbers=_muon_dimensions)]
    raise ConfigError(f"training.optim={name!r}: choose one of {', '.join(CHOICES['training', 'optim'])}")


class EachLayerState(NamedTuple):
    leaves: tuple  # the inner state of each param leaf, in tree-flatten order (a stacked leaf's vmapped)


def each_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner`, a per-array rule (Adafactor's factored moments and RMS clipping), applied to each param on its own
    and, for params of the stacked decoder layers (leading layer axis), to each layer's slice (jax.vmap): what the
    rule does on the unstacked model. optax's own rules would factor and clip [N, in, out] as one block.

    The state is a flat tuple (one inner state per leaf); its arrays are row/column statistics, not param-shaped,
    so jsft.sharding replicates them."""

    def leaves_with_stacking(tree):
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        return [(leaf, path_name(path).startswith(STACKED)) for path, leaf in flat], treedef

    def rule(method, stacked):
        return jax.vmap(method) if stacked else method

    def init(params):
        leaves, _ = leaves_with_stacking(params)
        return EachLayerState(tuple(rule(inner.init, stacked)(p) for p, stacked in leaves))

    def update(updates, state, params=None):
        leaves, treedef = leaves_with_stacking(updates)
        param_leaves = jax.tree.leaves(params) if params is not None else [None] * len(leaves)
        pairs = [rule(inner.update, stacked)(u, s, p)  # p None: vmap maps over an empty tree
                 for (u, stacked), s, p in zip(leaves, state.leaves, param_leaves)]
        return (jax.tree_util.tree_unflatten(treedef, [u for u, _ in pairs]),
                EachLayerState(tuple(s for _, s in pairs)))

    return optax.GradientTransformation(init, update)


def _muon_dimensions(params):
    """Muon's axes for each param: matrices (ndim >= 2 per layer, stacked layers in front) orthogonalized over their
    last two axes; vectors (norms, biases, DoRA magnitudes; [N, size] when stacked) None, so Muon's Adam updates
    them. Embedding and lm_head rows are matrices too, as in optax's default; users who want them on Adam can say so
    in a future knob."""
    from optax.contrib import MuonDimensionNumbers

    def dims(path, p):
        per_layer_ndim = p.ndim - 1 if path_name(path).startswith(STACKED) else p.ndim
        return MuonDimensionNumbers(reduction_axis=p.ndim - 2, output_axis=p.ndim - 1) if per_layer_ndim >= 2 else None

    return jax.tree_util.tree_map_with_path(dims, params)


def _scale_by_adam_fp32_nu(b1, b2, eps, mu_dtype) -> optax.GradientTransformation:
    """optax.scale_by_adam with mu in `mu_dtype` and nu always float32 (bf16 params included).

    Gradients are upcast to float32 before the moments, so the update direction is float32 too."""
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)

    def init(params):
        return adam.init(jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params))

    def update(grads, state, params=None):
        grads32 = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
        return adam.update(grads32, state, params)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------------------------- trainable filter


def trainable_filter(lora: bool, new_token_rows: bool = False, modules_to_save=()):
    """The nnx filter of trained params, for `nnx.Optimizer(..., wrt=...)` and the gradient split.

    full fine-tuning: nnx.Param (every param, LoRA params included if any).
    LoRA:             nnx.LoRAParam (DoRA's magnitudes too); plus, when the tokenizer gained new tokens (chat
                      template cloning), the whole embedding and lm_head (paths containing 'embed_tokens' /
                      'lm_head'), like TRL, which makes those modules trainable and saves them with the adapter;
                      plus the modules of `modules_to_save` (jsft module names: peft_names.resolve_modules_to_save).
    """
    if not lora:
        return nnx.Param
    whole = tuple(dict.fromkeys((NEW_TOKEN_ROW_PATHS if new_token_rows else ()) + tuple(modules_to_save)))
    if not whole:
        return nnx.LoRAParam
    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(p) for p in whole))))
