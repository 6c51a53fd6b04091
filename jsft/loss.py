"""The SFT loss and its metrics, computed in chunks so the [B, L, vocab] logits never exist at once.

Everything here returns float32 SUMS over trained tokens; the train step adds the sums of all micro-batches and
divides once by the number of trained tokens in the whole optimizer step (`normalize`). That is TRL's rule
(`num_items_in_batch`), and it makes the loss independent of how the tokens are split into micro-batches.

Token loss (`loss_type`), with p = softmax(h @ W)[target]:
    nll: -log p
    dft: -stop_gradient(p) * log p        (TRL's DFT, https://huggingface.co/papers/2508.05629)
    label smoothing eps (nll only, transformers' LabelSmoother, which TRL uses for nll):
         (1 - eps) * -log p  +  eps * mean over the vocabulary of -log softmax(h @ W)
Metrics, over trained tokens only (TRL's definitions):
    entropy:  H(softmax(logits)) = logsumexp(z) - sum_v p_v z_v   (no gradient: it is only logged)
    correct:  argmax(logits) == target, where argmax picks the FIRST maximum (a tie with an earlier id is wrong)

Also here: `check_trained_tokens` for the step-level guard. FLOPs per token and MFU are in jsft.flops.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

LOSS_TYPES = ("nll", "dft")
SUM_KEYS = ("loss_sum", "num_trained", "num_correct", "entropy_sum")


# ----------------------------------------------------------------------------------------------- per-token math


def _check(loss_type: str, smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    if smoothing and loss_type != "nll":
        raise ValueError(f"label smoothing {smoothing} with loss_type={loss_type!r}: smoothing applies to nll only")


def _token_stats(logits, targets, mask, loss_type: str, smoothing: float = 0.0):
    """logits [N, V] float32, targets [N] int, mask [N] bool -> the four float32 sums over masked tokens."""
    _check(loss_type, smoothing)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    logp = target_logit - log_z
    token_loss = -logp if loss_type == "nll" else -jax.lax.stop_gradient(jnp.exp(logp)) * logp
    if smoothing:
        token_loss = (1.0 - smoothing) * token_loss + smoothing * (log_z - jnp.mean(logits, axis=-1))
    probs = jax.lax.stop_gradient(jnp.exp(logits - log_z[:, None]))
    entropy = jax.lax.stop_gradient(log_z) - jnp.sum(probs * jax.lax.stop_gradient(logits), axis=-1)
    correct = jnp.argmax(logits, axis=-1) == targets
    zero = jnp.zeros((), jnp.float32)
    return {
        "loss_sum": jnp.sum(jnp.where(mask, token_loss, zero)),
        "num_trained": jnp.sum(mask.astype(jnp.float32)),
        "num_correct": jnp.sum((correct & mask).astype(jnp.float32)),
        "entropy_sum": jnp.sum(jnp.where(mask, entropy, zero)),
    }


def _logits(hidden, lm_head_weight):
    """[N, H] @ [H, V] -> [N, V] float32; bf16 inputs are multiplied with float32 accumulation."""
    return jnp.dot(hidden, lm_head_weight, preferred_element_type=jnp.float32).astype(jnp.float32)


def _flatten(hidden, targets, loss_mask):
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return hidden, targets.reshape(-1), loss_mask.reshape(-1).astype(bool)


# ----------------------------------------------------------------------------------------------- the losses


def unchunked_loss(hidden, lm_head_weight, targets, loss_mask, loss_type: str = "nll", chunk_size: int = 1024,
                   smoothing: float = 0.0):
    """Reference: the same sums as `chunked_loss`, with the full [B*L, V] logits in memory. For tests only."""
    del chunk_size
    h, t, m = _flatten(hidden, targets, loss_mask)
    return _token_stats(_logits(h, lm_head_weight), t, m, loss_type, smoothing)


def chunked_loss(hidden, lm_head_weight, targets, loss_mask, loss_type: str = "nll", chunk_size: int = 1024,
                 smoothing: float = 0.0):
    """Sums of token loss, trained tokens, correct argmaxes and entropy, never holding [B, L, V] logits.

    hidden [B, L, H] (final-normed), lm_head_weight [H, V], targets [B, L] int, loss_mask [B, L] bool/float.
    The B*L tokens are cut into chunks of `chunk_size` (the tail chunk is padded with masked tokens); a
    `lax.scan` computes each chunk's logits in float32, its sums, and drops the logits. The backward pass (a
    custom VJP) scans the chunks again, recomputes each chunk's logits, and turns them into the chunk's gradients
    at once: peak memory holds one [chunk_size, V] block, not [B*L, V]. The lm_head gradient is summed over the
    chunks in float32 (like TRL's kernel) and cast to the weight's dtype once; autodiff through a scan would sum
    it in the weight's dtype, which in bf16 loses about 1 % over a few hundred chunks.

    Returns float32 scalars {"loss_sum", "num_trained", "num_correct", "entropy_sum"}; divide with `normalize`.
    Only loss_sum carries a gradient (entropy and the counts are metrics). `smoothing`: label smoothing (nll).
    """
    _check(loss_type, smoothing)
    h, t, m = _flatten(hidden, targets, loss_mask)
    n = h.shape[0]
    chunk = max(1, min(int(chunk_size), n))
    num_chunks = math.ceil(n / chunk)
    pad = num_chunks * chunk - n
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t = jnp.pad(t, (0, pad))
        m = jnp.pad(m, (0, pad))  # padded tokens are masked out
    return _chunked_sums(
        h.reshape(num_chunks, chunk, -1), lm_head_weight, t.reshape(num_chunks, chunk),
        m.reshape(num_chunks, chunk), loss_type, float(smoothing),
    )


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_sums(h_chunks, w, t_chunks, m_chunks, loss_type, smoothing):
    def step(carry, x):
        h_c, t_c, m_c = x
        sums = _token_stats(_logits(h_c, w), t_c, m_c, loss_type, smoothing)
        return {k: carry[k] + sums[k] for k in SUM_KEYS}, None

    init = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}
    sums, _ = jax.lax.scan(step, init, (h_chunks, t_chunks, m_chunks))
    return sums


def _chunked_sums_fwd(h_chunks, w, t_chunks, m_chunks, loss_type, smoothing):
    return _chunked_sums(h_chunks, w, t_chunks, m_chunks, loss_type, smoothing), (h_chunks, w, t_chunks, m_chunks)


def _chunked_sums_bwd(loss_type, smoothing, residuals, cotangents):
    """d loss_sum / d logits = g * mask * c * (softmax - onehot(target)), c = 1 (nll) or p(target) (dft, whose
    weight is a constant); with label smoothing eps the target is (1 - eps) * onehot + eps / V instead of onehot.
    Then d hidden = dlogits @ W^T per chunk, d W = sum over chunks of h^T @ dlogits."""
    h_chunks, w, t_chunks, m_chunks = residuals
    g = cotangents["loss_sum"]
    dtype = jnp.result_type(h_chunks.dtype, w.dtype)  # the matmul dtype (bf16 when both are bf16)

    def step(dw, x):
        h_c, t_c, m_c = x
        logits = _logits(h_c, w)
        log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        probs = jnp.exp(logits - log_z)
        onehot = jax.nn.one_hot(t_c, logits.shape[-1], dtype=jnp.float32)
        if smoothing:
            onehot = (1.0 - smoothing) * onehot + smoothing / logits.shape[-1]
        coef = g * m_c.astype(jnp.float32)
        if loss_type == "dft":
            coef = coef * jnp.sum(probs * onehot, axis=-1)
        dlogits = (coef[:, None] * (probs - onehot)).astype(dtype)
        dh = jnp.dot(dlogits, w.astype(dtype).T, preferred_element_type=jnp.float32).astype(h_c.dtype)
        dw = dw + jnp.dot(h_c.astype(dtype).T, dlogits, preferred_element_type=jnp.float32)
        return dw, dh

    dw, dh = jax.lax.scan(step, jnp.zeros(w.shape, jnp.float32), (h_chunks, t_chunks, m_chunks))
    return dh, dw.astype(w.dtype), None, None


_chunked_sums.defvjp(_chunked_sums_fwd, _chunked_sums_bwd)


# ----------------------------------------------------------------------------------------------- normalization


def normalize(sums: dict, num_trained_total) -> dict:
    """Turn summed statistics into the logged/optimized means, dividing by the trained tokens of the WHOLE step.

    `num_trained_total` counts trained tokens over every micro-batch and device of one optimizer step (TRL's
    `num_items_in_batch`), not the tokens of one micro-batch. Worked example, one step of two micro-batches:

        micro-batch 1: token losses [2.0, 1.0, 3.0]  -> loss_sum 6.0, num_trained 3
        micro-batch 2: token losses [4.0]            -> loss_sum 4.0, num_trained 1
        step loss = (6.0 + 4.0) / (3 + 1) = 2.5      (the mean over the step's 4 tokens)
        NOT the mean of micro-batch means (2.0 + 4.0) / 2 = 3.0, which would weigh the lone token 3x.

    In the train step each micro-batch's gradient is that of loss_sum / num_trained_total; summing them gives the
    gradient of the step loss, whatever the split. Like TRL the divisor is clamped to >= 1, so a step with no
    trained tokens gives 0 (but `check_trained_tokens` refuses such a step before that).

    Returns {"loss", "entropy", "mean_token_accuracy"} (float32).
    """
    denom = jnp.maximum(jnp.asarray(num_trained_total, jnp.float32), 1.0)
    return {
        "loss": sums["loss_sum"] / denom,
        "entropy": sums["entropy_sum"] / denom,
        "mean_token_accuracy": sums["num_correct"] / denom,
    }


def check_trained_tokens(num_trained, step: int) -> None:
    """Raise ValueError when an optimizer step has no trained token (its loss and gradient would be empty)."""
    if float(num_trained) <= 0:
        raise ValueError(
            f"step {step}: the batch has no trained tokens (every loss_mask entry is false), so there is nothing to "
            "learn. Check data.completion_only_loss / data.assistant_only_loss (does the data have completions or "
            "assistant turns, and does the chat template mark them?), and data.max_length / data.truncation_mode "
            "(truncation may cut off every completion)."
        )
