"""FLOPs per token and FLOPs utilization for throughput reports: `flops_per_token` (MFU) /
`hardware_flops_per_token` (HFU) / `mfu`, and `peak_tflops`, the device's peak."""

from __future__ import annotations

import jax
import numpy as np

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
