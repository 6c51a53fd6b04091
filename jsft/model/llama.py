"""The Llama family (Llama 2/3/3.1/3.2, Qwen2, Qwen3, Mistral) as one Flax NNX model built from an HF config.json.

The architectures differ only by flags of the same code:

    model_type  qkv bias            o_proj bias      q/k RMSNorm per head   sliding window
    llama       attention_bias      attention_bias   no                     no
    qwen2       always              no               no                     refused (use_sliding_window)
    qwen3       attention_bias      attention_bias   yes                    refused (use_sliding_window)
    mistral     no                  no               no                     sliding_window (L must fit in it)

Inputs follow the batch contract: `input_ids`, `positions` (restarting at 0 per document) and `segment_ids`
(1, 2, 3 ... per document, 0 = padding), all int32 [B, L]. RoPE reads `positions`, attention never crosses
documents, so a packed row gives each document exactly the logits it gets alone.

Decoding (jsft/generate.py) uses `init_cache` and `decode`: the same layers, run on the new tokens only, against a
preallocated KV cache (KVCache: per layer [B, max_len, kv_heads, head_dim]) with a per-slot valid mask.

Every parameter carries logical axis names in its metadata (`var.get_metadata()["out_sharding"]`, which
`nnx.get_partition_spec` reads); jsft/sharding.py maps them to mesh axes. Kernels are [in, out] (HF's transposed).

    parameter (path in the model)                         shape           logical axes
    embed_tokens.embedding                                [V, H]          ("vocab", "embed")
    layers.self_attn.q_proj.kernel / .bias                [N, H, Hq*D] /  ("layers", "embed", "q_heads") / ...
    layers.self_attn.{k,v}_proj.kernel / .bias            [N, H, Hkv*D]   ("layers", "embed", "kv_heads")
    layers.self_attn.o_proj.kernel / .bias                [N, Hq*D, H]    ("layers", "q_heads", "embed")
    layers.self_attn.{q,k}_norm.scale                     [N, D]          ("layers", "head_dim")
    layers.mlp.{gate,up}_proj.kernel / .bias              [N, H, F]       ("layers", "embed", "mlp")
    layers.mlp.down_proj.kernel / .bias                   [N, F, H]       ("layers", "mlp", "embed")
    layers.{input,post_attention}_layernorm.scale         [N, H]          ("layers", "norm")
    norm.scale                                            [H]             ("norm",)
    lm_head.kernel (absent when tied)                     [H, V]          ("embed", "vocab")
    <proj>.lora_a / <proj>.lora_b (LoRA, lora.py)        [N, in, r] / [N, r, out]
                                                          ("layers", in, "lora_rank") / ("layers", "lora_rank", out)

The N decoder layers are ONE DecoderLayer whose parameters carry a leading layer axis ("layers", never sharded):
the forward pass scans over it (Llama.run_layers), so a step lowers one layer whatever N is. Llama.layer(i) is a
view of layer i (its slices); jsft/hf.py maps layers.<param> [N, ...] to HF's model.layers.<i>.<param>.

"q_heads"/"kv_heads" name the flattened heads*head_dim axis: splitting it in n equal blocks splits whole heads
when the head count divides by n. Params are created with `eager_sharding=False`: names are metadata only, so the
model builds with no mesh (and under `nnx.eval_shape` for abstract init); placement is the sharding code's job.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsft.model.attention import packed_attention
from jsft.model.quant import QuantizedKernel

ARCHITECTURES = {  # HF "architectures" entry -> model_type
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}
REMAT_POLICIES = ("none", "full", "save_dots", "offload")
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class ModelConfigError(ValueError):
    """An HF config.json this model cannot represent; the message names the field."""


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope: tuple  # sorted (key, value) items: rope_type, rope_theta and the scaling fields
    sliding_window: int | None = None
    # config.json as transformers reads it, and generation_config.json: compared (two models whose ids or lengths
    # differ must not share a jit cache entry, which would hand one the other's config) but not hashed (dicts)
    hf_config: dict = field(default_factory=dict, hash=False, repr=False)
    generation_config: dict | None = field(default=None, hash=False, repr=False)

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Read an HF config.json dict; unknown architectures and missing fields raise ModelConfigError."""
        missing = [name for name in REQUIRED_FIELDS if hf.get(name) is None]  # no class default stands in for these
        hf = as_transformers_reads_it(hf)
        model_type = hf.get("model_type")
        for arch in hf.get("architectures") or []:
            if arch not in ARCHITECTURES:
                raise ModelConfigError(
                    f"config.json architectures={hf['architectures']}: {arch!r} is not supported; "
                    f"jsft supports {', '.join(ARCHITECTURES)}"
                )
            model_type = model_type or ARCHITECTURES[arch]
        if model_type not in ARCHITECTURES.values():
            raise ModelConfigError(
                f"config.json model_type={model_type!r} is not supported; use one of "
                f"{', '.join(sorted(set(ARCHITECTURES.values())))}"
            )
        if missing:
            raise ModelConfigError(f"config.json is missing the required field {missing[0]!r}")
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # the same function in transformers
            raise ModelConfigError(f"config.json hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
        if hf.get("attention_dropout"):
            warnings.warn(f"config.json attention_dropout={hf['attention_dropout']}: jsft has no attention dropout, so "
                          "training differs from transformers' (inference does not); set it to 0.0 to silence this",
                          UserWarning, stacklevel=2)
        if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            raise ModelConfigError(f"config.json use_sliding_window=true ({model_type}): sliding-window attention "
                                   "is not implemented; set it to false")
        if "sliding_attention" in (hf.get("layer_types") or []):
            raise ModelConfigError("config.json layer_types has 'sliding_attention' layers: sliding-window attention "
                                   "is not implemented; use 'full_attention'")
        heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ModelConfigError(f"config.json num_attention_heads={heads} is not a multiple of "
                                   f"num_key_value_heads={kv_heads}")
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or (model_type != "mistral" and attention_bias),
            o_bias=model_type in ("llama", "qwen3") and attention_bias,
            mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            rope=_rope_settings(hf),
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            hf_config=dict(hf),
        )

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim/2] (float32), with linear or llama3 (Llama 3.1) scaling."""
        rope = dict(self.rope)
        dim = self.head_dim
        exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
        inv = (1.0 / (np.float32(rope["rope_theta"]) ** exponents)).astype(np.float32)
        kind = rope["rope_type"]
        if kind == "default":
            return inv
        if kind == "linear":
            return (inv / rope["factor"]).astype(np.float32)
        # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, blended, scaled).astype(np.float32)


def as_transformers_reads_it(hf: dict) -> dict:
    """config.json as transformers reads it: its config class fills the keys the file lacks with that class's
    defaults (Mistral's sliding_window 4096, Qwen3's head_dim 128, ...) and normalizes RoPE into rope_parameters (a
    legacy rope_scaling wins over rope_parameters, as in transformers). A family jsft does not support: as is."""
    model_type = hf.get("model_type") or next((ARCHITECTURES.get(a) for a in hf.get("architectures") or []), None)
    if model_type not in ARCHITECTURES.values():
        return dict(hf)  # from_hf refuses it in the file's own words
    from transformers import CONFIG_MAPPING

    try:
        read = CONFIG_MAPPING[model_type].from_dict(dict(hf)).to_dict()
    except (TypeError, ValueError, KeyError) as e:
        raise ModelConfigError(f"config.json: transformers cannot read it as a {model_type} config ({e})") from e
    read.update(model_type=model_type)
    return read


def _rope_settings(hf: dict) -> tuple:
    """rope_parameters (transformers 5) or legacy rope_theta + rope_scaling -> sorted items."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        raise ModelConfigError(f"config.json rope type {rope['rope_type']!r} is not supported; "
                               "use default, linear or llama3")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelConfigError("config.json rope partial_rotary_factor != 1 is not supported")
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}.get(rope["rope_type"], ())
    for name in needed:
        if name not in rope:
            raise ModelConfigError(f"config.json rope_parameters is missing the required field {name!r} "
                                   f"for rope_type {rope['rope_type']!r}")
    return tuple(sorted((k, v) for k, v in rope.items() if not isinstance(v, (dict, list))))


def param(value, names: tuple) -> nnx.Param:
    """An nnx.Param carrying logical axis names (metadata only; no mesh needed)."""
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def stacked(shape: tuple, names: tuple, stack: int | None) -> tuple[tuple, tuple]:
    """(shape, names) with a leading layer axis of `stack` entries ("layers") when stack is not None."""
    return (shape, names) if stack is None else ((stack, *shape), ("layers", *names))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] in param dtype, matmul in compute dtype.

    stack=N: kernel [N, in, out] (and bias [N, out]), one slice per decoder layer; called on one slice (the
    Llama.run_layers body), where kernel[...] is [in, out]."""

    def __init__(self, in_features, out_features, names, *, bias, param_dtype, compute_dtype, rngs, stack=None):
        init = nnx.initializers.normal(0.02)
        shape, kernel_names = stacked((in_features, out_features), names, stack)
        self.kernel = param(init(rngs.params(), shape, param_dtype), kernel_names)
        shape, bias_names = stacked((out_features,), names[1:], stack)
        self.bias = param(jnp.zeros(shape, param_dtype), bias_names) if bias else None
        self.compute_dtype = compute_dtype

    def __call__(self, x):
        y = self.project(x)
        return y if self.bias is None else y + self.bias[...].astype(self.compute_dtype)

    def project(self, x):
        """x @ kernel in the compute dtype, without the bias."""
        if isinstance(self.kernel, QuantizedKernel):  # a QLoRA base: dequantized inside the matmul
            return self.kernel.matmul(x, self.compute_dtype)
        return jnp.dot(x.astype(self.compute_dtype), self.kernel[...].astype(self.compute_dtype))


class Embed(nnx.Module):
    def __init__(self, vocab_size, hidden_size, *, param_dtype, rngs):
        init = nnx.initializers.normal(0.02)
        self.embedding = param(init(rngs.params(), (vocab_size, hidden_size), param_dtype), ("vocab", "embed"))


class RMSNorm(nnx.Module):
    """x / rms(x) in float32, cast back to the compute dtype, times scale (as transformers does)."""

    def __init__(self, size, names, *, eps, param_dtype, compute_dtype, stack=None):
        shape, names = stacked((size,), names, stack)
        self.scale = param(jnp.ones(shape, param_dtype), names)
        self.eps, self.compute_dtype = eps, compute_dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.compute_dtype) * normed.astype(self.compute_dtype)


def rope_table(positions, inv_freq):
    """(cos, sin), each [B, L, 1, D/2] float32, of the angles positions * inv_freq; computed once per forward."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x, rope):
    """Rotate x [B, L, heads, D] by the (cos, sin) table, HF's rotate_half layout, in float32."""
    cos, sin = rope
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, param_dtype, compute_dtype, attention_impl, rngs, stack=None):
        H, D = cfg.hidden_size, cfg.head_dim
        q_out, kv_out = cfg.num_heads * D, cfg.num_kv_heads * D
        dt = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, stack=stack)
        self.q_proj = Linear(H, q_out, ("embed", "q_heads"), bias=cfg.qkv_bias, rngs=rngs, **dt)
        self.k_proj = Linear(H, kv_out, ("embed", "kv_heads"), bias=cfg.qkv_bias, rngs=rngs, **dt)
        self.v_proj = Linear(H, kv_out, ("embed", "kv_heads"), bias=cfg.qkv_bias, rngs=rngs, **dt)
        self.o_proj = Linear(q_out, H, ("q_heads", "embed"), bias=cfg.o_bias, rngs=rngs, **dt)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, ("head_dim",), eps=cfg.rms_norm_eps, **dt)
            self.k_norm = RMSNorm(D, ("head_dim",), eps=cfg.rms_norm_eps, **dt)
        self.qk_norm, self.head_dim, self.impl = cfg.qk_norm, D, attention_impl
        self.max_segments = None  # documents per row at most (set from the data: Llama.set_max_segments)

    def qkv(self, x, rope):
        """x [B, L, H] -> q [B, L, Hq, D], k and v [B, L, Hkv, D]: projected, q/k normed (Qwen3), q/k rotated."""
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, -1, self.head_dim)
        k = self.k_proj(x).reshape(B, L, -1, self.head_dim)
        v = self.v_proj(x).reshape(B, L, -1, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def __call__(self, x, rope, segment_ids):
        B, L, _ = x.shape
        q, k, v = self.qkv(x, rope)
        out = packed_attention(q, k, v, segment_ids, impl=self.impl, max_segments=self.max_segments)
        return self.o_proj(out.reshape(B, L, -1))

    def cached(self, x, rope, k_cache, v_cache, index, mask):
        """Attention of T new tokens over a KV cache (see Llama.decode); returns (output, k_cache, v_cache).

        The new keys/values are written at cache slots [index, index + T); mask [B, 1, T, S] says which slots each
        new token sees. XLA attention (GQA native) over all S slots: [B, Hq, T, S] scores, small for one token per
        step; a prefill of long prompts would want a flash kernel instead (not done).
        """
        B, T, _ = x.shape
        q, k, v = self.qkv(x, rope)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
        out = jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask, implementation="xla")
        return self.o_proj(out.reshape(B, T, -1)), k_cache, v_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, *, param_dtype, compute_dtype, rngs, stack=None):
        H, F = cfg.hidden_size, cfg.intermediate_size
        dt = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, stack=stack)
        self.gate_proj = Linear(H, F, ("embed", "mlp"), bias=cfg.mlp_bias, rngs=rngs, **dt)
        self.up_proj = Linear(H, F, ("embed", "mlp"), bias=cfg.mlp_bias, rngs=rngs, **dt)
        self.down_proj = Linear(F, H, ("mlp", "embed"), bias=cfg.mlp_bias, rngs=rngs, **dt)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """One decoder layer; stack=N: all N layers' parameters, each with a leading layer axis (Llama.layers)."""

    def __init__(self, cfg: LlamaConfig, *, param_dtype, compute_dtype, attention_impl, rngs, stack=None):
        dt = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, ("norm",), eps=cfg.rms_norm_eps, stack=stack, **dt)
        self.self_attn = Attention(cfg, attention_impl=attention_impl, rngs=rngs, stack=stack, **dt)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, ("norm",), eps=cfg.rms_norm_eps, stack=stack, **dt)
        self.mlp = MLP(cfg, rngs=rngs, stack=stack, **dt)

    def __call__(self, x, rope, segment_ids):
        x = x + self.self_attn(self.input_layernorm(x), rope, segment_ids)
        return x + self.mlp(self.post_attention_layernorm(x))

    def cached(self, x, rope, k_cache, v_cache, index, mask):
        """The layer over a KV cache (Attention.cached); returns (x, k_cache, v_cache)."""
        attn, k_cache, v_cache = self.self_attn.cached(self.input_layernorm(x), rope, k_cache, v_cache, index, mask)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache


def checkpoint_policy(name: str):
    """The jax.checkpoint policy for a remat setting (None: no remat).

    full: save nothing inside a layer; save_dots: keep matmul outputs; offload: move matmul outputs to pinned host
    memory and bring them back for the backward pass. Where the device has no pinned_host memory, offload falls
    back to save_dots (same gradients, device memory instead of host memory).
    """
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={name!r}: choose one of {', '.join(REMAT_POLICIES)}")
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "offload":
        kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
        if "pinned_host" in kinds:
            return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable


class KVCache(NamedTuple):
    """Keys and values of every token run so far, for decoding (Llama.init_cache, Llama.decode).

    k, v: [N, B, S, Hkv, D], layer n's at [n] (S = max_len slots, fixed: one compile per (B, S)); valid [B, S] bool:
    the slot holds a real token (not padding, already written); index: int32 scalar, the next slot to write (the
    same for every row; each row's RoPE position is its own).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, compute_dtype=jnp.float32,
                 attention_impl: str = "auto", remat_policy: str = "none", scan_layers: bool = True):
        """scan_layers=False runs the same stacked layers in a Python loop (N layers in the lowered program): the
        reference the scan is tested against (tests/test_scan.py) and benchmarks/compile_size.py's "before"."""
        policy = checkpoint_policy(remat_policy)  # validates the name early
        dt = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.cfg, self.param_dtype, self.compute_dtype = cfg, param_dtype, compute_dtype
        self.remat, self._checkpoint_policy, self.scan_layers = remat_policy, policy, scan_layers
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.layers = DecoderLayer(cfg, attention_impl=attention_impl, rngs=rngs, stack=cfg.num_layers, **dt)
        self.norm = RMSNorm(cfg.hidden_size, ("norm",), eps=cfg.rms_norm_eps, **dt)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, rngs=rngs, **dt)

    def set_max_segments(self, max_segments: int | None) -> None:
        """The most documents any packed row holds (the data side counts them). cuDNN's packed attention needs this
        static bound, and attention_impl="auto" picks cuDNN on a GPU only when it is known (a guessed bound too
        small would turn rows into NaN). Call before the first step; changing it recompiles."""
        self.layers.self_attn.max_segments = None if max_segments is None else int(max_segments)

    def layer(self, i: int) -> DecoderLayer:
        """A copy of decoder layer i: its slices of the stacked parameters (reading; writes do not come back)."""
        graphdef, rngs, weights = nnx.split(self.layers, nnx.RngState, ...)  # RNG state is not stacked
        return nnx.merge(graphdef, rngs, jax.tree.map(lambda a: a[i], weights))

    def run_layers(self, body, x, per_layer=(), remat: bool = False):
        """x through the N decoder layers: x, out_i = body(layer_i, x, *per_layer_i) for i = 0 .. N-1.

        The one place that reads per-layer parameters: the stacked state of `self.layers` (everything but RNG
        state: params, LoRA params, any other stacked variable) is sliced on its leading axis and merged into a
        DecoderLayer holding layer i's slices, which `body` calls. RNG state (LoRA dropout streams) is one per
        projection, not per layer: it goes through the layers as part of the carry (each layer advances it).
        per_layer: arrays with a leading layer axis (the KV cache), sliced alike; the outs are stacked back.
        Written over jax.lax.scan rather than nnx.scan, whose Carry cannot hold part of a module's state (the RNG).
        remat: rematerialize each layer in the backward pass with the model's remat policy.
        Returns (x, stacked outs).
        """
        graphdef, rngs, weights = nnx.split(self.layers, nnx.RngState, ...)

        def one_layer(carry, slices):
            x, rngs = carry
            weights_i, per_layer_i = slices
            layer = nnx.merge(graphdef, rngs, weights_i, copy=True)
            x, out = body(layer, x, *per_layer_i)
            return (x, nnx.state(layer, nnx.RngState)), out

        if remat and self._checkpoint_policy is not None:
            one_layer = jax.checkpoint(one_layer, policy=self._checkpoint_policy, prevent_cse=not self.scan_layers)
        if self.scan_layers:
            (x, rngs), outs = jax.lax.scan(one_layer, (x, rngs), (weights, tuple(per_layer)))
        else:
            outs = []
            for i in range(self.cfg.num_layers):
                (x, rngs), out = one_layer((x, rngs), jax.tree.map(lambda a: a[i], (weights, tuple(per_layer))))
                outs.append(out)
            outs = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        dropouts = [m for _, m in nnx.iter_modules(self.layers) if isinstance(m, nnx.Dropout)]
        if any(not m.deterministic and m.rate > 0 for m in dropouts):
            nnx.update(self.layers, rngs)  # only then advanced: an eval-mode model (generate's loop) stays untouched
        return x, outs

    def _check_window(self, length: int):
        if self.cfg.sliding_window is not None and length > self.cfg.sliding_window:
            raise ModelConfigError(f"sequence length {length} exceeds the model's sliding_window="
                                   f"{self.cfg.sliding_window}; sliding-window attention is not implemented, use "
                                   "max_length <= sliding_window")

    def embed(self, input_ids):
        """[B, L] int32 -> [B, L, H] token embeddings in the compute dtype."""
        return jnp.take(self.embed_tokens.embedding[...], input_ids, axis=0).astype(self.compute_dtype)

    def hidden_states(self, input_ids, positions, segment_ids, embed_noise=None):
        """[B, L] int32 each -> [B, L, H] final-normed hidden states in the compute dtype (no lm_head).
        embed_noise: input embeddings [B, L, H] -> noise added to them (NEFTune, jsft.step), or None."""
        self._check_window(input_ids.shape[1])
        x = self.embed(input_ids)
        if embed_noise is not None:
            x = x + embed_noise(x).astype(x.dtype)
        rope = rope_table(positions, jnp.asarray(self.cfg.inv_freq()))

        x, _ = self.run_layers(lambda layer, x: (layer(x, rope, segment_ids), None), x, remat=True)
        return self.norm(x)

    def lm_head_weight(self):
        """[H, V] in the param dtype (the embedding transposed when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden):
        """Final-normed hidden states [B, L, H] -> logits [B, L, V] float32."""
        w = self.lm_head_weight().astype(self.compute_dtype)
        return jnp.dot(hidden, w, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, positions, segment_ids):
        """[B, L] int32 each -> logits [B, L, V] float32."""
        return self.logits(self.hidden_states(input_ids, positions, segment_ids))

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache: max_len slots per row, keys/values in the compute dtype, nothing valid, index 0."""
        self._check_window(max_len)
        shape = (batch, max_len, self.cfg.num_kv_heads, self.cfg.head_dim)
        empty = jnp.zeros((self.cfg.num_layers, *shape), self.compute_dtype)
        return KVCache(k=empty, v=empty, valid=jnp.zeros((batch, max_len), bool), index=jnp.asarray(0, jnp.int32))

    def decode(self, input_ids, positions, mask, cache: KVCache, *, last_only: bool = False):
        """Run T new tokens per row against the cache -> (logits [B, T, V] float32, updated cache).

        input_ids, positions [B, T] int32 (RoPE reads positions, so each row counts its own); mask [B, T] bool,
        False for padding. The tokens go to cache slots [index, index + T) (the caller keeps index + T <= max_len)
        and each sees the valid slots up to its own. Prefill is one call with the prompts, decoding one call per
        token (T = 1); prompts may be padded on either side. Two rows, prompts of 2 and 3 tokens, left-padded:

            prefill   input_ids [[0, a, b], [c, d, e]]  positions [[0, 0, 1], [0, 1, 2]]  mask [[F, T, T], [T, T, T]]
            step      input_ids [[x], [y]]              positions [[2], [3]]              mask [[T], [T]]
            -> x (slot 3) sees slots 1..3 of row 0; y sees slots 0..3 of row 1; nothing ever sees slot 0 of row 0.

        last_only: logits of the last column only, [B, 1, V] (all a left-padded prefill needs: no [B, T, V]).
        """
        T, S = input_ids.shape[1], cache.valid.shape[1]
        valid = jax.lax.dynamic_update_slice(cache.valid, mask.astype(bool), (0, cache.index))
        causal = jnp.arange(S)[None, :] <= cache.index + jnp.arange(T)[:, None]  # [T, S]
        attend = (valid[:, None, :] & causal[None])[:, None]  # [B, 1, T, S]
        x = self.embed(input_ids)
        rope = rope_table(positions, jnp.asarray(self.cfg.inv_freq()))

        def body(layer, x, k, v):
            x, k, v = layer.cached(x, rope, k, v, cache.index, attend)
            return x, (k, v)

        x, (ks, vs) = self.run_layers(body, x, per_layer=(cache.k, cache.v))
        x = x[:, -1:] if last_only else x
        return self.logits(self.norm(x)), KVCache(ks, vs, valid, cache.index + T)

    def resize_vocab(self, new_size: int, rngs: nnx.Rngs | None = None):
        """Grow the embedding (and an untied lm_head) to new_size rows; new rows are the mean of the old rows.

        transformers' resize_token_embeddings (mean_resizing=True, its default) samples new rows from a normal
        with the old rows' mean and 1e-9 x their covariance: the mean up to ~1e-5. jsft uses the mean itself, so
        resizing is deterministic (`rngs` is accepted for interface symmetry and unused). Shrinking is refused.
        """
        old = self.cfg.vocab_size
        if new_size < old:
            raise ValueError(f"resize_vocab({new_size}) would drop rows of the {old}-row vocabulary; only growing is "
                             "supported")
        if new_size == old:
            return
        emb = self.embed_tokens.embedding
        emb.set_value(_grow_rows(emb[...], new_size))
        if not self.cfg.tie_word_embeddings:
            head = self.lm_head.kernel
            head.set_value(_grow_rows(head[...].T, new_size).T)
        hf = dict(self.cfg.hf_config, vocab_size=new_size)
        self.cfg = dataclasses.replace(self.cfg, vocab_size=new_size, hf_config=hf)


def _grow_rows(w, new_size):
    mean = jnp.mean(w.astype(jnp.float32), axis=0, keepdims=True).astype(w.dtype)
    return jnp.concatenate([w, jnp.repeat(mean, new_size - w.shape[0], axis=0)], axis=0)
