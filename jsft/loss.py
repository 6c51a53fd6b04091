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

Also here: `flops_per_token` (MFU) / `hardware_flops_per_token` (HFU) / `mfu` for throughput reports, and
`check_trained_tokens` for the step-level guard.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

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


# ----------------------------------------------------------------------------------------------- FLOPs and MFU

# Dense bf16 tensor-core peak, TFLOP/s per device (no sparsity). Matched in order as substrings of
# jax.devices()[0].device_kind, lower-cased; the first match wins, so more specific names come first.
PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200", 989.0),
    ("gh200", 989.0),
    ("h800", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("a10g", 70.0),
    ("a10", 125.0),
    ("l4", 121.0),
    ("rtx 4090", 165.0),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5", 459.0),  # v5p
    ("tpu v6", 918.0),
)


def peak_tflops(device_kind: str | None = None, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of one device: `override` (training.peak_tflops) if set, else the table; None on
    CPU or an unknown device (then MFU is not reported)."""
    if override is not None:
        return float(override)
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    kind = device_kind.lower()
    if "cpu" in kind:
        return None
    for name, tflops in PEAK_BF16_TFLOPS:
        if name in kind:
            return tflops
    return None


def _get(cfg, name, default=None):
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def matmul_params(cfg) -> int:
    """Parameters that take part in a matmul per token: attention + MLP projections of every layer, plus the
    lm_head. The input embedding is a lookup (no FLOPs) and is left out; norms and biases are negligible."""
    hidden = _get(cfg, "hidden_size")
    heads = _get(cfg, "num_attention_heads")
    kv_heads = _get(cfg, "num_key_value_heads") or heads
    head_dim = _get(cfg, "head_dim") or hidden // heads
    inter = _get(cfg, "intermediate_size")
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter
    return _get(cfg, "num_hidden_layers") * per_layer + hidden * _get(cfg, "vocab_size")


def effective_seq_len(segment_ids) -> float:
    """The attention length per token for packed rows: sum over documents of len^2 / sum of len.

    A token attends within its own document only, so a row [3 tokens of doc 1, 1 token of doc 2, 2 pads]
    (segment_ids [1, 1, 1, 2, 0, 0]) has effective length (3*3 + 1*1) / 4 = 2.5, not L = 6. Padding (0) is
    ignored. Numpy on the host; cheap.
    """
    seg = np.atleast_2d(np.asarray(segment_ids))
    total_sq, total = 0, 0
    for row in seg:
        counts = np.bincount(row[row > 0])
        total_sq += int(np.sum(counts.astype(np.int64) ** 2))
        total += int(np.sum(counts))
    return total_sq / total if total else 0.0


def attention_flops_per_token(cfg, seq_len: float) -> float:
    """Attention's QK^T and AV per token, forward + backward: 12 * layers * heads * head_dim * seq_len (2 matmuls x
    2 FLOPs x heads x head_dim x seq_len, x3). `seq_len` is the attention length per token: max_length for unpacked
    rows, `effective_seq_len(segment_ids)` for packed ones; full squares per document, not causally halved (PaLM)."""
    heads = _get(cfg, "num_attention_heads")
    head_dim = _get(cfg, "head_dim") or _get(cfg, "hidden_size") // heads
    return 12.0 * _get(cfg, "num_hidden_layers") * heads * head_dim * float(seq_len)


def flops_per_token(cfg, seq_len: float, *, lora_params: int = 0, frozen_params: int = 0) -> float:
    """MODEL FLOPs per token of a training step, MFU's numerator: what the math needs, nothing recomputed.

        forward 2 (N + A)  +  input gradients 2 (N + A)  +  weight gradients 2 (N + A - F)  +  attention

    N = matmul_params(cfg), A = lora_params (LoRA's adapter matrices, matmuls too), F = frozen_params (matmul weights
    that get no gradient; `lora_frozen_params`), attention = `attention_flops_per_token`. Full fine-tuning (A = F = 0):
    6N + attention, the usual convention. LoRA: 4N + 6A + attention (+ 2 H V when the lm_head trains): a frozen
    weight's gradient is never computed, so counting 6N would overstate a LoRA run's MFU by about half.
    `cfg` is an HF config (object or dict) with hidden_size, num_attention_heads, num_key_value_heads, head_dim,
    intermediate_size, num_hidden_layers, vocab_size.
    """
    n = matmul_params(cfg) + int(lora_params)
    return 4.0 * n + 2.0 * (n - int(frozen_params)) + attention_flops_per_token(cfg, seq_len)


def lora_frozen_params(cfg, head_trains: bool = False) -> int:
    """F for a LoRA run: every base matmul weight, less the lm_head's H x V when it trains (new token rows)."""
    head = _get(cfg, "hidden_size") * _get(cfg, "vocab_size")
    return matmul_params(cfg) - (head if head_trains else 0)


def hardware_flops_per_token(cfg, seq_len: float, *, remat: str = "none", lora_params: int = 0,
                             frozen_params: int = 0) -> float:
    """HARDWARE FLOPs per token, HFU's numerator: `flops_per_token` plus the matmuls jsft's step computes twice.

        always              2 H V: chunked_loss's backward recomputes each chunk's logits
        remat "full"        each decoder layer's forward again in its backward, less the MLP's down projection (its
                            output is not needed there): 2 (N_layers - layers H F + A) + attention's forward (1/3)
        "save_dots", "offload"  matmul outputs are kept, attention's are not (its matmuls have batch dims): 1/3 of
                            attention again
    Matches XLA's own count of a compiled step (cost_analysis) within a few percent (elementwise ops are left out;
    tests/test_loss.py checks it). Attention is counted as in MFU; what a kernel really computes depends on how
    many masked blocks it skips.
    """
    hidden, layers = _get(cfg, "hidden_size"), _get(cfg, "num_hidden_layers")
    extra = 2.0 * hidden * _get(cfg, "vocab_size")
    attention_forward = attention_flops_per_token(cfg, seq_len) / 3
    if remat == "full":
        layer_params = matmul_params(cfg) - hidden * _get(cfg, "vocab_size")
        down = layers * hidden * _get(cfg, "intermediate_size")
        extra += 2.0 * (layer_params - down + int(lora_params)) + attention_forward
    elif remat in ("save_dots", "offload"):
        extra += attention_forward
    elif remat != "none":
        raise ValueError(f"remat={remat!r}: choose none, full, save_dots or offload")
    return flops_per_token(cfg, seq_len, lora_params=lora_params, frozen_params=frozen_params) + extra


def mfu(tokens_per_second: float, flops_per_token_: float, num_devices: int = 1, peak: float | None = None):
    """FLOPs utilization in [0, 1]: achieved FLOP/s over num_devices * peak TFLOP/s; MFU with `flops_per_token`, HFU
    with `hardware_flops_per_token`. None when peak is None (CPU or an unknown device without training.peak_tflops)."""
    if peak is None:
        return None
    return tokens_per_second * flops_per_token_ / (num_devices * peak * 1e12)
