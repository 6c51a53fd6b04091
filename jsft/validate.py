"""Checking a whole config before any compute: types, choices, combinations and ranges (`validate`), each error a
ConfigError naming the field; and `quantization`, the base's quantization the model section asks for."""

from __future__ import annotations

import warnings
from pathlib import Path

from jsft import trackers
from jsft.config import (CHOICES, SECTIONS, ConfigError, DataConfig, SFTConfig, check_type, did_you_mean,
                         section_types)
from jsft.peft_names import check_target_syntax


def validate(config: SFTConfig) -> SFTConfig:
    """Check types, choices and combinations; raise ConfigError naming the field. Returns the config."""
    for section_name, section_cls in SECTIONS.items():
        section = getattr(config, section_name)
        if not isinstance(section, section_cls):
            raise ConfigError(f"{section_name}: expected a {section_cls}, got {type(section).__name__}")
        known = section_types(type(section))
        for name in vars(section):  # `config.training.learnig_rate = ...` in a config file adds an attribute
            if name not in known:
                raise ConfigError(f"unknown field {section_name}.{name}{did_you_mean(section_name, name)}")
        for name, annotation in section_types(type(section)).items():
            value = check_type(getattr(section, name), annotation, f"{section_name}.{name}")
            setattr(section, name, value)
            allowed = CHOICES.get((section_name, name))
            if allowed and value not in allowed:
                raise ConfigError(f"{section_name}.{name}={value!r}: choose one of {', '.join(allowed)}")

    d, t = config.data, config.training
    if d.padding_free and not d.packing:
        raise ConfigError(
            "data.padding_free=True needs data.packing=True: jsft batches have a fixed [B, max_length] shape, so "
            "padding-free means rows filled by packing. Set data.packing=True, or padding_free=False."
        )
    if d.packing and d.max_length is None:
        raise ConfigError("data.packing=True needs data.max_length (the row length packing fills).")
    if d.pad_to_multiple_of is not None:
        if d.pad_to_multiple_of < 1:
            raise ConfigError(f"data.pad_to_multiple_of={d.pad_to_multiple_of}: must be >= 1, or None (rows padded "
                              "to max_length)")
        if d.packing:
            raise ConfigError(f"data.pad_to_multiple_of={d.pad_to_multiple_of} has no effect with packing=True "
                              "(packed rows fill max_length): unset it, or set data.packing=False")
    if d.train_sampling_strategy == "group_by_length":
        if d.packing:
            raise ConfigError("data.train_sampling_strategy='group_by_length' groups unpacked rows by length; packed "
                              "rows all fill max_length. Set data.packing=False, or another sampling strategy")
        if d.pad_to_multiple_of is not None:
            raise ConfigError("data.pad_to_multiple_of and train_sampling_strategy='group_by_length' both choose the "
                              "step lengths: keep one (group_by_length picks data.length_buckets lengths)")
        if d.length_buckets < 1:
            raise ConfigError(f"data.length_buckets={d.length_buckets}: must be >= 1")
    if d.max_length is not None and d.max_length < 2:
        raise ConfigError(f"data.max_length={d.max_length}: must be >= 2 (one input and one target).")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(t, name) < 1:
            raise ConfigError(f"training.{name}={getattr(t, name)}: must be >= 1")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        raise ConfigError("training.max_steps and training.num_train_epochs are both <= 0: nothing to train.")
    if not 0.0 <= t.warmup_ratio <= 1.0:
        raise ConfigError(f"training.warmup_ratio={t.warmup_ratio}: must be in [0, 1]")
    if t.learning_rate < 0:
        raise ConfigError(f"training.learning_rate={t.learning_rate}: must be >= 0")
    if t.max_nonfinite_steps < 0:
        raise ConfigError(f"training.max_nonfinite_steps={t.max_nonfinite_steps}: must be >= 0 (0 stops at the first "
                          "non-finite step)")
    if config.lora.use_peft and config.lora.lora_r < 1:
        raise ConfigError(f"lora.lora_r={config.lora.lora_r}: must be >= 1")
    for axis, size in config.sharding.mesh_shape.items():
        if axis not in ("data", "fsdp", "tensor"):
            raise ConfigError(f"sharding.mesh_shape has an unknown axis {axis!r}: use data, fsdp, tensor")
        if size == 0 or size < -1:
            raise ConfigError(f"sharding.mesh_shape.{axis}={size}: use a positive size or -1 (the rest)")
    _validate_quantization(config)
    if not config.model.model_name_or_path and not config.model.init_from_scratch:
        raise ConfigError("model.model_name_or_path is empty: set an HF checkpoint directory (or init_from_scratch).")
    if d.datasets or d.test_split_size is not None:
        _validate_mixture(d)
    elif not d.dataset_name:
        raise ConfigError("data.dataset_name is empty: set a local dataset file/directory or a hub name.")
    if d.dataset_streaming:
        _validate_streaming(config)
    _validate_ranges(config)
    return config


def _validate_streaming(config: SFTConfig) -> None:
    """data.dataset_streaming (jsft.data.streaming): what a stream of unknown length can honour."""
    d, t = config.data, config.training
    if t.max_steps <= 0:
        raise ConfigError(
            f"data.dataset_streaming=True needs training.max_steps > 0 (it is {t.max_steps}): a stream has no length, "
            "so the number of steps cannot come from num_train_epochs (as in transformers, where max_steps is then "
            "required). Fix: set training.max_steps (TRL: max_steps), or dataset_streaming=False")
    refused = [
        (bool(d.datasets), "data.datasets (a mixture) is read whole; streaming a mixture is not supported",
         "drop data.datasets and stream one dataset, or set dataset_streaming=False"),
        (d.packing and d.packing_strategy == "wrapped", "packing_strategy='wrapped' is not implemented for streams",
         "use packing_strategy='bfd_stream' (best fit over data.packing_buffer_size examples)"),
        (d.train_sampling_strategy == "group_by_length", "group_by_length chooses buckets from every row's length, "
         "which a stream does not know up front", "set train_sampling_strategy='random', or dataset_streaming=False"),
        (d.pad_to_multiple_of is not None, "pad_to_multiple_of is not implemented for streams (rows are padded to "
         "max_length)", "unset data.pad_to_multiple_of"),
        (d.packing and config.model.attention_impl == "cudnn", "attention_impl='cudnn' needs the most documents a "
         "packed row holds, which a stream does not know up front", "set model.attention_impl='auto' (it picks "
         "another packed kernel)"),
        (d.max_length is None, "max_length=None pads to the longest example, which a stream does not know up front",
         "set data.max_length"),
    ]
    for bad, why, fix in refused:
        if bad:
            raise ConfigError(f"data.dataset_streaming=True: {why}. Fix: {fix}")


def _validate_quantization(config: SFTConfig) -> None:
    m = config.model
    if m.load_in_4bit and m.load_in_8bit:
        raise ConfigError("model.load_in_4bit and model.load_in_8bit are both true: choose one")
    if not (m.load_in_4bit or m.load_in_8bit):
        return
    knob = "load_in_4bit" if m.load_in_4bit else "load_in_8bit"
    if not config.lora.use_peft:
        raise ConfigError(f"model.{knob}=True needs lora.use_peft=True: a quantized base is frozen (QLoRA trains "
                          "LoRA adapters on it; transformers refuses to train a quantized model alone)")
    if m.init_from_scratch:
        raise ConfigError(f"model.{knob}=True quantizes a loaded checkpoint; model.init_from_scratch has none. "
                          f"Fix: set model.{knob}=False, or model.model_name_or_path")
    storage = ("uint8", "int8", "bfloat16", "float16", "float32")
    if m.bnb_4bit_quant_storage is not None and m.bnb_4bit_quant_storage not in storage:
        raise ConfigError(f"model.bnb_4bit_quant_storage={m.bnb_4bit_quant_storage!r}: choose one of "
                          f"{', '.join(storage)} (or None)")


def quantization(config: SFTConfig) -> dict | None:
    """The base's quantization as jsft.hf.load_model takes it ({"quant_type", "nested"}), or None."""
    m = config.model
    if m.load_in_8bit:
        return {"quant_type": "int8", "nested": False}
    if m.load_in_4bit:
        return {"quant_type": m.bnb_4bit_quant_type, "nested": m.use_bnb_nested_quant}
    return None


# TRL's DatasetConfig fields: the keys of a data.datasets entry
COMPONENT_KEYS = ("path", "name", "data_dir", "data_files", "split", "columns", "fraction")


def _validate_mixture(d: DataConfig) -> None:
    """data.datasets (jsft.data.mixture): TRL's DatasetConfig keys, fraction on all components or none, and the
    split names of the mixture."""
    if not d.datasets:
        raise ConfigError(f"data.test_split_size={d.test_split_size}: it splits a mixture (data.datasets), which is "
                          "empty. Fix: unset test_split_size, or list the datasets")
    for i, component in enumerate(d.datasets):
        unknown = [k for k in component if k not in COMPONENT_KEYS]
        if unknown or not component.get("path"):
            raise ConfigError(f"data.datasets[{i}]={component!r}: " + (
                f"unknown key(s) {', '.join(map(repr, unknown))}" if unknown else "no path") +
                f". Fix: use TRL's keys {', '.join(COMPONENT_KEYS)} (path is required)")
        fraction = component.get("fraction")
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or fraction < 0):
            raise ConfigError(f"data.datasets[{i}].fraction={fraction!r}: must be a number >= 0")
    fractions = [c.get("fraction") for c in d.datasets]
    if any(f is None for f in fractions) and any(f is not None for f in fractions):
        raise ConfigError("data.datasets: `fraction` must be set for either all datasets in the mixture or none of "
                          "them (as TRL)")
    if fractions[0] is not None and sum(fractions) <= 0:
        raise ConfigError("data.datasets: the fractions sum to 0; give at least one a share > 0")
    p = d.mixture_probabilities
    if p is not None:
        if len(p) != len(d.datasets) or any(x < 0 for x in p) or abs(sum(p) - 1) > 1e-6:
            raise ConfigError(f"data.mixture_probabilities={p}: one probability >= 0 for each of the "
                              f"{len(d.datasets)} data.datasets, summing to 1")
        if fractions[0] is not None:
            raise ConfigError("data.mixture_probabilities and data.datasets[i].fraction both set: fraction keeps the "
                              "first rows of each component, probabilities sample them; choose one")
    if d.mixture_stopping_strategy not in ("first_exhausted", "all_exhausted"):
        raise ConfigError(f"data.mixture_stopping_strategy={d.mixture_stopping_strategy!r}: choose first_exhausted "
                          "or all_exhausted")
    size = d.test_split_size
    if size is not None and not (0 < size < 1 or (isinstance(size, int) and size >= 1)):
        raise ConfigError(f"data.test_split_size={size}: a share in (0, 1), or a row count >= 1")
    if d.dataset_train_split != "train":
        raise ConfigError(f"data.dataset_train_split={d.dataset_train_split!r}: a mixture's training split is "
                          "'train' (set each component's own split in data.datasets[i].split)")
    test = d.dataset_test_split
    if test is not None and size is None and not Path(test).is_file():
        raise ConfigError(f"data.dataset_test_split={test!r}: the mixture has only a 'train' split. Fix: set "
                          "data.test_split_size to split off a 'test' split, or dataset_test_split to an eval file")
    if test is not None and size is not None and test != "test":
        raise ConfigError(f"data.dataset_test_split={test!r}: with data.test_split_size the mixture's eval split "
                          "is 'test'; set dataset_test_split to 'test'")


def _validate_ranges(config: SFTConfig) -> None:
    """Numeric ranges and combinations beyond types and choices."""
    d, t, lo, lg = config.data, config.training, config.lora, config.logging

    def need(ok: bool, field_name: str, value, rule: str):
        if not ok:
            raise ConfigError(f"{field_name}={value!r}: {rule}")

    if t.warmup_steps > 0 and t.warmup_ratio > 0:
        raise ConfigError(
            f"training.warmup_steps={t.warmup_steps} and training.warmup_ratio={t.warmup_ratio} are both set: "
            "set only one (warmup_steps wins in transformers, which hides the mistake)"
        )
    need(t.warmup_steps >= 0, "training.warmup_steps", t.warmup_steps, "must be >= 0")
    need(t.loss_chunk_size >= 1, "training.loss_chunk_size", t.loss_chunk_size, "must be >= 1 (tokens per chunk)")
    need(t.max_grad_norm >= 0, "training.max_grad_norm", t.max_grad_norm, "must be >= 0 (0 disables clipping)")
    need(t.weight_decay >= 0, "training.weight_decay", t.weight_decay, "must be >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        need(0.0 <= getattr(t, name) < 1.0, f"training.{name}", getattr(t, name), "must be in [0, 1)")
    need(t.adam_epsilon >= 0, "training.adam_epsilon", t.adam_epsilon, "must be >= 0")
    need(t.peak_tflops is None or t.peak_tflops > 0, "training.peak_tflops", t.peak_tflops, "must be > 0 or None")
    options = t.lr_scheduler_kwargs
    unknown = sorted(set(options) - set(SCHEDULE_KWARGS.get(t.lr_scheduler_type, ())))
    need(not unknown, "training.lr_scheduler_kwargs", options, f"{', '.join(unknown)} is not an option of "
         f"lr_scheduler_type={t.lr_scheduler_type!r} (its options: "
         f"{', '.join(SCHEDULE_KWARGS.get(t.lr_scheduler_type, ())) or 'none'})")
    if t.lr_scheduler_type == "cosine_with_min_lr":
        need(("min_lr" in options) != ("min_lr_rate" in options), "training.lr_scheduler_kwargs", options,
             "cosine_with_min_lr needs exactly one of min_lr (the final learning rate) or min_lr_rate (its ratio to "
             "learning_rate)")
    need(0.0 <= t.label_smoothing_factor < 1.0, "training.label_smoothing_factor", t.label_smoothing_factor,
         "must be in [0, 1)")
    need(not (t.label_smoothing_factor and t.loss_type != "nll"), "training.label_smoothing_factor",
         t.label_smoothing_factor, f"smooths the nll loss only; loss_type={t.loss_type!r} (TRL ignores it there; "
         "jsft refuses rather than ignore it)")
    need(t.neftune_noise_alpha is None or t.neftune_noise_alpha >= 0, "training.neftune_noise_alpha",
         t.neftune_noise_alpha, "must be >= 0 or None")
    accepted = OPTIM_ARGS.get(t.optim, ())
    unknown = sorted(set(t.optim_args) - set(accepted))
    need(not unknown, "training.optim_args", t.optim_args, f"{', '.join(unknown)} is not an argument of "
         f"optim={t.optim!r} (its arguments: {', '.join(accepted) or 'none'})")
    if t.lr_scheduler_type == "warmup_stable_decay":
        need("num_decay_steps" in options, "training.lr_scheduler_kwargs", options,
             "warmup_stable_decay needs num_decay_steps (steps of the final decay), as transformers' get_wsd_schedule")
        for key in ("warmup_type", "decay_type"):
            need(options.get(key, "linear") in ("linear", "cosine", "1-sqrt"), "training.lr_scheduler_kwargs",
                 options, f"{key} must be one of linear, cosine, 1-sqrt")
    if t.master_weights_fp32 and config.model.dtype == "float32":
        raise ConfigError(
            "training.master_weights_fp32=True with model.dtype='float32': the params already are float32 master "
            "weights. Set model.dtype='bfloat16' (bf16 params + fp32 master copy), or master_weights_fp32=False."
        )
    need(d.packing_buffer_size >= 1, "data.packing_buffer_size", d.packing_buffer_size, "must be >= 1")
    if d.packing and d.truncation_mode == "keep_end":
        warnings.warn("data.truncation_mode='keep_end' has no effect with packing=True: bfd / bfd_stream cut an "
                      "overlong example keep_start, as TRL does (bfd_split keeps every token, in fragments)")
    need(d.dataset_num_proc is None or d.dataset_num_proc >= 1, "data.dataset_num_proc", d.dataset_num_proc,
         "must be >= 1 or None (in-process)")
    if lo.use_peft:
        need(lo.lora_alpha > 0, "lora.lora_alpha", lo.lora_alpha, "must be > 0")
        need(0.0 <= lo.lora_dropout < 1.0, "lora.lora_dropout", lo.lora_dropout, "must be in [0, 1)")
        check_target_syntax(lo.lora_target_modules)  # the rest, against the model's modules, when it is built
        saved = lo.lora_modules_to_save
        need(saved is None or isinstance(saved, (list, tuple)) and all(isinstance(m, str) and m for m in saved),
             "lora.lora_modules_to_save", saved, "must be a list of module names (e.g. ['lm_head', 'embed_tokens'])")
    for name in ("logging_steps", "save_steps", "eval_steps"):
        value = getattr(lg, name)
        need(value is None and name == "eval_steps" or value is not None and (
             0 < value < 1 or value >= 1 and float(value).is_integer()), f"logging.{name}", value,
             "must be a whole number of steps >= 1, or a ratio of the total steps in (0, 1)"
             + (", or None" if name == "eval_steps" else ""))
    evaluates = lg.eval_strategy == "epoch" or lg.eval_strategy == "steps" and lg.eval_steps is not None
    need(not (lg.eval_on_start or lg.eval_strategy == "epoch") or d.dataset_test_split is not None,
         "logging.eval_strategy", lg.eval_strategy, "evaluates data.dataset_test_split, which is None: set it to a "
         "split name or an eval file (or eval_strategy='no', eval_on_start=False)")
    if lg.load_best_model_at_end or lg.save_strategy == "best":
        need(evaluates, "logging.load_best_model_at_end" if lg.load_best_model_at_end else "logging.save_strategy",
             True, "selects by the eval metric: set logging.eval_strategy ('steps' with eval_steps, or 'epoch')")
    if lg.load_best_model_at_end and lg.save_strategy not in ("best", "no"):
        need(lg.save_strategy == lg.eval_strategy, "logging.load_best_model_at_end", True,
             f"needs checkpoints where it evaluates (transformers' rule): save_strategy={lg.save_strategy!r} and "
             f"eval_strategy={lg.eval_strategy!r} must match")
        if lg.save_strategy == "steps" and lg.eval_steps is not None and lg.save_steps >= 1 and lg.eval_steps >= 1:
            need(lg.save_steps % lg.eval_steps == 0, "logging.save_steps", lg.save_steps,
                 f"must be a multiple of logging.eval_steps={lg.eval_steps} with load_best_model_at_end")
    need(not (lg.load_best_model_at_end and lg.save_strategy == "no"), "logging.load_best_model_at_end", True,
         "needs checkpoints: set logging.save_strategy to 'steps', 'epoch' or 'best'")
    need(lg.eval_steps is None or d.dataset_test_split is not None, "logging.eval_steps", lg.eval_steps,
         "evaluates data.dataset_test_split, which is None: set it to a split name or an eval file (or eval_steps "
         "to None)")
    need(lg.save_total_limit is None or lg.save_total_limit >= 1, "logging.save_total_limit", lg.save_total_limit,
         "must be >= 1 or None (keep all)")
    if isinstance(lg.report_to, str):
        lg.report_to = [lg.report_to]
    if "none" in lg.report_to:
        need(lg.report_to == ["none"], "logging.report_to", lg.report_to, "'none' stands alone")
        lg.report_to = []
    if "all" in lg.report_to:  # transformers' "all": every integration installed
        lg.report_to = ["jsonl", "tensorboard"] + [name for name in trackers.TRACKERS if trackers.installed(name)]
    bad = [r for r in lg.report_to if r not in REPORT_TO]
    need(not bad, "logging.report_to", lg.report_to, f"choose from {', '.join(REPORT_TO)}, all, none")
    for name in lg.report_to:
        need(name in ("jsonl", "tensorboard") or trackers.installed(name), "logging.report_to", lg.report_to,
             f"{name} is not installed: pip install 'jsft[{name}]' (or leave it out of report_to)")
    bad = [f for f in lg.export_formats if f not in ("auto", "full", "merged", "adapter")]
    need(not bad, "logging.export_formats", lg.export_formats, "choose from auto, full, merged, adapter")


# lr_scheduler_kwargs each schedule takes (transformers' names); jsft.optim.schedule_options reads them.
SCHEDULE_KWARGS = {
    "cosine": ("num_cycles",),
    "cosine_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate"),
    "cosine_with_restarts": ("num_cycles",),
    "polynomial": ("lr_end", "power"),
    "inverse_sqrt": ("timescale",),
    "warmup_stable_decay": ("num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio",
                            "num_cycles"),
}
# optim_args each optimizer takes (transformers' optim_args names); jsft.optim reads them.
OPTIM_ARGS = {"sgd": ("momentum", "nesterov"), "muon": ("beta", "ns_steps", "nesterov")}
REPORT_TO = ("jsonl", "tensorboard", "wandb", "trackio", "mlflow")
