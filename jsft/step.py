"""The jitted train and eval steps: one optimizer step over A micro-batches of [B, L] rows.

The loss of a step is TRL's: sum of token losses over every trained token of the step / the number of those
tokens (all micro-batches, all devices). Each micro-batch contributes the gradient of

    loss_sum(micro-batch) / num_trained(whole step)

and the step adds them up, so the result is the gradient of the step loss however the tokens are split into
micro-batches (DESIGN.md invariant 4). Under a mesh the batch arrays are global, so `num_trained` is global too.

Only the trainable parameters (the optimizer's `wrt` filter: all params, or LoRA params + new token rows) are
differentiated; frozen weights are closed over and get no gradient buffers. Gradients are summed in float32.

Shapes are static ([A, B, L] whatever the documents inside the rows), so the step compiles once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jsft import sharding
from jsft.loss import SUM_KEYS, check_trained_tokens, chunked_loss, normalize

NEFTUNE_SEED = 0x4E4546  # NEFTune noise keys: fold_in(key(NEFTUNE_SEED), optimizer step, micro-batch)
BATCH_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")


# ----------------------------------------------------------------------------------------------- host-side checks


def host_token_counts(batch: dict) -> tuple[int, int]:
    """(trained tokens, non-padding input tokens) of a numpy batch, computed on the host before the step."""
    return int(np.sum(np.asarray(batch["loss_mask"]))), int(np.sum(np.asarray(batch["segment_ids"]) > 0))


def check_batch(batch: dict, step: int) -> None:
    """Refuse a batch whose tokens train nothing (clear error, no device work). Cheap: numpy on the host.

    A batch of padding only passes: with several processes it is one process's share of a partial last step, whose
    real rows (and trained tokens) went to the other processes."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"step {step}: the batch lacks {missing}; the batch contract needs {BATCH_KEYS}")
    if np.any(np.asarray(batch["segment_ids"]) > 0):
        check_trained_tokens(np.sum(np.asarray(batch["loss_mask"])), step)


# ----------------------------------------------------------------------------------------------- the loss


def _micro_sums(model, micro: dict, loss_type: str, chunk_size: int, smoothing: float = 0.0,
                embed_noise=None) -> dict:
    """The four loss sums of one [B, L] micro-batch (embed_noise: embeddings [B, L, H] -> noise to add to them)."""
    hidden = model.hidden_states(micro["input_ids"], micro["positions"], micro["segment_ids"], embed_noise=embed_noise)
    return chunked_loss(hidden, model.lm_head_weight(), micro["targets"], micro["loss_mask"], loss_type, chunk_size,
                        smoothing)


def train_options(training) -> dict:
    """train_step's static options from a jsft.config.TrainingConfig."""
    return dict(loss_type=training.loss_type, chunk_size=training.loss_chunk_size,
                label_smoothing=float(training.label_smoothing_factor),
                neftune_noise_alpha=training.neftune_noise_alpha or None)


def neftune_noise(key, shape, alpha: float):
    """NEFTune (https://huggingface.co/papers/2310.05914) as transformers' Trainer adds it to the input embeddings
    while training: uniform in [-m, m], m = alpha / sqrt(L * H) for rows of length L and hidden size H."""
    _, length, hidden = shape
    magnitude = alpha / math.sqrt(length * hidden)
    return jax.random.uniform(key, shape, jnp.float32, -magnitude, magnitude)


def _zero_sums():
    return {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}


# ----------------------------------------------------------------------------------------------- train step


@nnx.jit(static_argnames=("loss_type", "chunk_size", "schedule", "label_smoothing", "neftune_noise_alpha"),
         donate_argnums=(0, 1))
def train_step(model, optimizer, batch: dict, *, loss_type: str = "nll", chunk_size: int = 1024, schedule=None,
               label_smoothing: float = 0.0, neftune_noise_alpha: float | None = None):
    """One optimizer step. batch: arrays [A, B, L] (A micro-batches). Updates model and optimizer in place.

    label_smoothing: transformers' LabelSmoother factor (nll). neftune_noise_alpha: NEFTune noise on the input
    embeddings, drawn from a key of the optimizer step and the micro-batch (a resumed run draws the same noise).

    Returns float32 scalars: loss, grad_norm (before clipping), learning_rate (the one this update used; 0 when no
    `schedule` is given), num_tokens (non-padding input tokens), num_trained, mean_token_accuracy, entropy.
    """
    graphdef, params, rngs, rest = nnx.split(model, optimizer.wrt, nnx.RngState, ...)
    num_trained = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    denom = jnp.maximum(num_trained, 1.0)

    step_key = jax.random.fold_in(jax.random.key(NEFTUNE_SEED), optimizer.step[...])

    def micro_loss(params, rngs, micro, index):
        # copy=True: fresh Variables in this trace, so dropout may advance its RNG count here
        m = nnx.merge(graphdef, params, rngs, rest, copy=True)
        noise = None
        if neftune_noise_alpha:
            key = jax.random.fold_in(step_key, index)
            noise = lambda x: neftune_noise(key, x.shape, neftune_noise_alpha)  # noqa: E731
        sums = _micro_sums(m, micro, loss_type, chunk_size, label_smoothing, noise)
        return sums["loss_sum"] / denom, (sums, nnx.state(m, nnx.RngState))

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, indexed_micro):
        grads_acc, sums_acc, rngs = carry
        micro, index = indexed_micro
        (_, (sums, rngs)), grads = grad_fn(params, rngs, micro, index)
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        sums_acc = {k: sums_acc[k] + sums[k] for k in SUM_KEYS}
        return (grads_acc, sums_acc, rngs), None

    grads0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    num_micro = batch["input_ids"].shape[0]
    (grads, sums, rngs), _ = jax.lax.scan(accumulate, (grads0, _zero_sums(), rngs), (batch, jnp.arange(num_micro)))
    nnx.update(model, rngs)

    learning_rate = schedule(optimizer.step[...]) if schedule is not None else jnp.zeros(())
    grad_norm = optax.tree.norm(grads)
    # grads stay float32 (summed in float32): the optimizer upcasts anyway, and bf16 would round them first
    optimizer.update(model, grads)
    sharding.constrain(model)  # outputs keep the inputs' shardings, so the next call does not recompile
    sharding.constrain(optimizer)

    metrics = normalize(sums, num_trained)
    metrics.update(
        grad_norm=grad_norm,
        learning_rate=jnp.asarray(learning_rate, jnp.float32),
        num_tokens=jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32)),
        num_trained=num_trained,
    )
    return metrics


# ----------------------------------------------------------------------------------------------- eval step


@nnx.jit(static_argnames=("loss_type", "chunk_size", "label_smoothing"))
def eval_step(model, batch: dict, *, loss_type: str = "nll", chunk_size: int = 1024,
              label_smoothing: float = 0.0) -> dict:
    """Loss sums over a batch of [A, B, L] (or [B, L]) rows, no update. Add them over the eval set, then
    `loss.normalize(sums, sums["num_trained"])`."""
    if batch["input_ids"].ndim == 2:
        batch = {k: v[None] for k, v in batch.items()}
    graphdef, state = nnx.split(model)

    def one(acc, micro):
        # copy=True: fresh Variables in this trace (nnx.remat inside the model may not touch the outer ones)
        sums = _micro_sums(nnx.merge(graphdef, state, copy=True), micro, loss_type, chunk_size, label_smoothing)
        return {k: acc[k] + sums[k] for k in SUM_KEYS}, None

    sums, _ = jax.lax.scan(one, _zero_sums(), batch)
    return sums
