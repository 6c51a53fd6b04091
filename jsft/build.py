"""A run's parts, built from its config, for train and export alike: the tokenizer (with the run's chat template
and special tokens), the model (loaded, quantized or random-initialized, vocabulary grown, LoRA applied, placed on
the mesh), and the checks of the model against the data that must come before any compute.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jsft import sharding
from jsft.config import ConfigError, SFTConfig, quantization
from jsft.optim import trainable_filter
from jsft.peft_names import resolve_modules_to_save

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


# ----------------------------------------------------------------------------------------------- building blocks


def tokenizer_path(config: SFTConfig) -> str:
    path = config.model.tokenizer_name_or_path or config.model.model_name_or_path
    if not path:
        raise ConfigError("model.tokenizer_name_or_path is empty and so is model.model_name_or_path: with "
                          "model.init_from_scratch, set model.tokenizer_name_or_path to a tokenizer directory")
    return path


def build_tokenizer(config: SFTConfig):
    """(tokenizer, added token ids) with the run's chat template and special tokens."""
    from jsft.data.templates import load_tokenizer

    field = "model.tokenizer_name_or_path" if config.model.tokenizer_name_or_path else "model.model_name_or_path"
    return load_tokenizer(tokenizer_path(config), config.data, field)


def _round_up(n: int, multiple: int = 64) -> int:
    return multiple * math.ceil(n / multiple)


def scratch_hf_config(config: SFTConfig, tokenizer) -> dict:
    """model.init_from_scratch + what the tokenizer decides: vocab size (len(tokenizer) rounded up to 64), ids."""
    hf = dict(config.model.init_from_scratch)
    hf.setdefault("model_type", "llama")
    hf.setdefault("architectures", ["LlamaForCausalLM"])
    hf.setdefault("vocab_size", _round_up(len(tokenizer)))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        hf.setdefault(name, getattr(tokenizer, name))
    return hf


def _token_ids(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def with_eos_of(cfg, tokenizer):
    """The model config with the tokenizer's EOS, TRL's rule when a run changes it (data.eos_token, a cloned
    template): config.json's eos_token_id becomes the tokenizer's and generation_config.json lists it first, so an
    exported model's generate() stops where the model learned to stop. Unchanged when the ids already hold it."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return cfg
    hf = dict(cfg.hf_config)
    generation = None if cfg.generation_config is None else dict(cfg.generation_config)
    if eos not in _token_ids(hf.get("eos_token_id")):
        hf["eos_token_id"] = eos
    if generation is not None and eos not in _token_ids(generation.get("eos_token_id")):
        generation["eos_token_id"] = [eos, *_token_ids(generation.get("eos_token_id"))]
    return dataclasses.replace(cfg, hf_config=hf, generation_config=generation)


def check_sliding_window(cfg, datasets) -> None:
    """jsft computes full causal attention: the same as a sliding-window model's (Mistral's config.json
    sliding_window) only while every row fits in the window."""
    longest = max(d.max_length for d in datasets)
    if cfg.sliding_window is not None and longest > cfg.sliding_window:
        raise ConfigError(
            f"rows of {longest} tokens (data.max_length={datasets[0].max_length}) exceed the model's sliding_window="
            f"{cfg.sliding_window} (config.json); jsft does not implement sliding-window attention, and full "
            f"attention over a longer row would train another model than the one you load. Fix: set "
            f"data.max_length <= {cfg.sliding_window}"
        )


def warn_past_max_positions(cfg, datasets, max_length) -> None:
    """Documents longer than config.json's max_position_embeddings train at RoPE positions the model never saw.
    transformers and TRL run them without a word (the default, linear and llama3 RoPE jsft supports do not depend on
    max_position_embeddings; dynamic/YaRN scaling, which would, jsft refuses); jsft warns, naming both lengths: it is
    nearly always a max_length meant for another model. Positions restart per document, so only a document (or
    fragment) longer than the limit counts, not a packed row of short ones."""
    limit = cfg.hf_config.get("max_position_embeddings")
    for prepared in datasets if limit else ():
        lengths = prepared.rows.stop - prepared.rows.start
        over = int((lengths > limit).sum())
        if over:
            warnings.warn(
                f"data.max_length={max_length}: {over:,} {prepared.stats.get('split', 'train')} document(s) are longer "
                f"than the model's max_position_embeddings={limit} (config.json; the longest has {int(lengths.max())} "
                "tokens), so they train at positions the model was never trained at. transformers and TRL accept "
                f"this silently. Fix: set data.max_length <= {limit}, or extend the context on purpose (rope scaling "
                "and max_position_embeddings in config.json)", UserWarning, stacklevel=2)


def check_model_config(config: SFTConfig) -> None:
    """The checkpoint's config.json as jsft reads it (architecture, RoPE type, sizes): ModelConfigError naming the
    problem, before any data is prepared. Random init checks its own config when it builds."""
    if config.model.init_from_scratch or not Path(config.model.model_name_or_path).is_dir():
        return  # a hub name or a missing path: build_model's loader resolves it and names what is wrong
    from jsft.hf import read_config
    from jsft.model.llama import LlamaConfig

    LlamaConfig.from_hf(read_config(config.model.model_name_or_path))


def build_model(config: SFTConfig, tokenizer, mesh):
    """The model, placed on the mesh: loaded from model.model_name_or_path (each device reads only its shards) or
    random-initialized from model.init_from_scratch; the vocabulary grown when the tokenizer has more tokens;
    LoRA applied when lora.use_peft. Returns (model, grew_vocab)."""
    from jsft.hf import load_model
    from jsft.model.llama import Llama, LlamaConfig

    m = config.model
    dtype = DTYPES[m.dtype]
    options = dict(compute_dtype=DTYPES[m.compute_dtype], attention_impl=m.attention_impl, remat_policy=m.remat_policy)
    if m.init_from_scratch:
        cfg = LlamaConfig.from_hf(scratch_hf_config(config, tokenizer))
        model = sharding.create_sharded_model(
            lambda: Llama(cfg, rngs=nnx.Rngs(config.training.seed), param_dtype=dtype, **options), mesh)
    else:
        model, _ = load_model(m.model_name_or_path, dtype=dtype, shardings=_variable_sharding(mesh),
                              quantization=quantization(config), **options)
    grew = len(tokenizer) > model.cfg.vocab_size
    if grew:
        model.resize_vocab(_round_up(len(tokenizer)), nnx.Rngs(config.training.seed))
    model.cfg = with_eos_of(model.cfg, tokenizer)
    if config.lora.use_peft:
        from jsft.model.lora import apply_lora

        lc = config.lora
        apply_lora(model, lc.lora_r, lc.lora_alpha, lc.lora_dropout, lc.lora_target_modules, use_rslora=lc.use_rslora,
                   use_dora=lc.use_dora, rngs=nnx.Rngs(config.training.seed + 1))
        modules_to_save(config, model)  # refused here, before any step, when it names what jsft cannot train
    sharding.shard_model(model, mesh)
    return model, grew


def modules_to_save(config: SFTConfig, model) -> tuple[str, ...]:
    """The jsft modules lora.lora_modules_to_save trains whole (PEFT's matching rule, jsft.peft_names)."""
    cfg = model.cfg
    return resolve_modules_to_save(config.lora.lora_modules_to_save, cfg.num_layers, cfg.qk_norm,
                                   cfg.tie_word_embeddings)


def trainable(config: SFTConfig, model, trained_embeddings: bool):
    """The run's trainable-parameter filter (jsft.optim.trainable_filter): everything, or the LoRA params plus the
    embedding and head when new tokens trained (trained_embeddings) plus lora.lora_modules_to_save."""
    saved = modules_to_save(config, model) if config.lora.use_peft else ()
    return trainable_filter(config.lora.use_peft, new_token_rows=trained_embeddings, modules_to_save=saved)


def _variable_sharding(mesh):
    def place(path, variable):
        names = variable.get_metadata().get("out_sharding")
        spec = sharding.logical_to_spec(tuple(names), tuple(variable.shape), mesh, path) if names else None
        return jax.sharding.NamedSharding(mesh, spec or jax.sharding.PartitionSpec())

    return place


