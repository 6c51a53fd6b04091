"""Read a TRL config file (YAML or JSON) into a jsft SFTConfig, field by field, refusing what jsft cannot honour.

A TRL run is configured by three dataclasses whose fields share one flat namespace (as in `trl sft --config
x.yaml`): `SFTConfig` (with transformers' TrainingArguments), `ModelConfig` and `ScriptArguments`. A file holds
any subset of them, e.g. `json.dump(SFTConfig(...).to_dict(), f)` plus `model_name_or_path`, `dataset_name`.

    config = from_trl_file("sft.yaml")          # -> jsft.config.SFTConfig (not yet validated)

`TRL_FIELDS` below is the one table: every TRL field, its TRL default, and where it goes:
    "section.field"   same meaning, value copied
    a function        a conversion (value, all TRL values) -> {jsft dotted path: value}
    NO_KNOB           jsft has no such knob: only TRL's default (or an equivalent spelling) is accepted
    NO_EFFECT         accepted with any value: it does not change what is trained (devices, logging backends, ...)
Fields missing from the file take TRL's default (so num_train_epochs is 3.0 and params load in float32, as in
TRL), unknown fields are errors, and a non-default value of a NO_KNOB field is refused with the reason.
"""

from __future__ import annotations

import difflib
import re
import json
from pathlib import Path

from jsft.config import ConfigError, SFTConfig, set_field

NO_KNOB = "no_knob"
NO_EFFECT = "no_effect"

# PEFT's default target_modules for the Llama family (peft TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
# what TRL's ModelConfig(lora_target_modules=None) trains.
PEFT_DEFAULT_TARGETS = ["q_proj", "v_proj"]
YAML_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
# Old TRL / transformers spellings of a field -> the current name.
RENAMED = {"max_seq_length": "max_length", "evaluation_strategy": "eval_strategy", "torch_dtype": "dtype"}


# ----------------------------------------------------------------------------------------------- conversions


def _compute_dtype(value, values):
    if values.get("fp16"):
        raise ConfigError("TRL fp16=True: jsft computes in bfloat16 or float32 (fp16 needs loss scaling). Use bf16.")
    return {"model.compute_dtype": "bfloat16" if value in (True, None) else "float32"}


def _param_dtype(value, values):
    if value in ("bfloat16", "float32"):
        return {"model.dtype": value}
    raise ConfigError(f"TRL dtype={value!r}: jsft loads params as bfloat16 or float32; set dtype to one of them")


def _remat(value, values):
    """gradient_checkpointing, activation_checkpointing (its new name) and activation_offloading -> remat_policy."""
    enabled = values["activation_checkpointing"]
    enabled = values["gradient_checkpointing"] if enabled is None else enabled
    policy = "offload" if values["activation_offloading"] else "full" if enabled else "none"
    return {"model.remat_policy": policy}


def _warmup(value, values):
    """transformers 5: warmup_steps >= 1 is a step count, 0 < warmup_steps < 1 a ratio of the total steps."""
    ratio = values.get("warmup_ratio") or 0.0
    if value and ratio:
        raise ConfigError(f"TRL warmup_steps={value} and warmup_ratio={ratio}: set only one")
    if value >= 1:
        if value != int(value):
            raise ConfigError(f"TRL warmup_steps={value}: a step count must be whole (or < 1 for a ratio)")
        return {"training.warmup_steps": int(value), "training.warmup_ratio": 0.0}
    if value > 0:
        return {"training.warmup_steps": 0, "training.warmup_ratio": float(value)}
    return {"training.warmup_steps": 0, "training.warmup_ratio": float(ratio)}


def _jit_checkpoint(value, values):
    """enable_jit_checkpoint=True (save a checkpoint on SIGTERM) is what jsft always does
    (logging.save_on_sigterm=True); TRL's default False, under which SIGTERM kills the run and loses the steps since
    the last save, keeps jsft's default too: a run stopped without its checkpoint is a fault jsft does not copy."""
    return {"logging.save_on_sigterm": True}


def _steps(path):
    def convert(value, values):
        if value is not None and not (0 < value < 1 or value >= 1 and float(value).is_integer()):
            raise ConfigError(f"TRL {path.split('.')[1]}={value}: a whole number of steps >= 1, or a ratio of the "
                              "total steps in (0, 1)")
        return {path: None if value is None else value if value < 1 else int(value)}

    return convert


def _eval(value, values):
    """eval_strategy + eval_steps (+ logging_steps, dataset_test_split) -> logging.eval_strategy, logging.eval_steps,
    data.dataset_test_split. transformers: eval_steps defaults to logging_steps."""
    if value == "no":
        return {"logging.eval_strategy": "no", "logging.eval_steps": None,
                "data.dataset_test_split": None if not values.get("eval_on_start") else values["dataset_test_split"]}
    if value == "steps":
        steps = values["eval_steps"] if values["eval_steps"] is not None else values["logging_steps"]
        return {"logging.eval_strategy": "steps", **_steps("logging.eval_steps")(steps, values),
                "data.dataset_test_split": values["dataset_test_split"]}
    if value == "epoch":
        return {"logging.eval_strategy": "epoch", "logging.eval_steps": None,
                "data.dataset_test_split": values["dataset_test_split"]}
    raise ConfigError(f"TRL eval_strategy={value!r}: choose steps, epoch or no")


def _mixture(value, values):
    """TRL's DatasetMixtureConfig: datasets (+ test_split_size) -> data.datasets, data.test_split_size. TRL's sft
    script takes the mixture's dataset_train_split and dataset_test_split ("test" with test_split_size) from
    get_dataset's splits; dataset_name is then unused (TRL warns and ignores it)."""
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise ConfigError(f"TRL datasets={value!r}: a list of mappings with TRL's DatasetConfig keys (path, name, "
                          "data_dir, data_files, split, columns, fraction)")
    if not value:
        return {} if values["test_split_size"] is None else {"data.test_split_size": values["test_split_size"]}
    return {"data.datasets": [dict(c) for c in value], "data.test_split_size": values["test_split_size"]}


def _report_to(value, values):
    """TRL report_to -> logging.report_to, metrics.jsonl always kept (jsft's resume reads it); 'all' is
    resolved by jsft.config.validate (every tracker installed)."""
    names = [] if value in (None, "none") else [value] if isinstance(value, str) else list(value)
    names = [n for n in names if n != "none"]
    return {"logging.report_to": ["jsonl"] + [n for n in names if n != "jsonl"]}


def _resume(value, values):
    if value is None or isinstance(value, bool):  # TRL's None: start fresh
        return {"logging.resume_from_checkpoint": bool(value)}
    raise ConfigError(f"TRL resume_from_checkpoint={value!r}: jsft resumes from the latest checkpoint in "
                      "output_dir; set output_dir to that run's directory and resume_from_checkpoint=true")


def _token(path, name):
    def convert(value, values):  # TrainingArguments.to_dict() writes "<EOS_TOKEN>" in place of *_token values
        return {path: None if value == f"<{name.upper()}>" else value}

    return convert


def _targets(value, values):
    if value is None:
        return {"lora.lora_target_modules": list(PEFT_DEFAULT_TARGETS)}
    if value == "all-linear" or value == ["all-linear"]:
        return {"lora.lora_target_modules": "all-linear"}
    if isinstance(value, str):  # PEFT: a regex, full-matched against each module name
        return {"lora.lora_target_modules": value}
    return {"lora.lora_target_modules": list(value)}


def _renamed(path, old_to_new):
    def convert(value, values):
        return {path: old_to_new.get(value, value)}

    return convert


def _default_none(path, default):
    def convert(value, values):
        return {path: default if value is None else value}

    return convert


def _one_of(accepted, why):
    """A NO_KNOB check that accepts several spellings of the default."""

    def convert(value, values):
        if value in accepted:
            return {}
        raise ConfigError(why)

    convert.accepted = accepted
    return convert


def _eval_packing(value, values):
    """eval_packing None (= packing) or equal to packing: jsft prepares eval rows as training rows."""
    if value is None or value == values["packing"]:
        return {}
    raise ConfigError(f"TRL eval_packing={value!r} with packing={values['packing']!r}: jsft prepares eval rows like "
                      "training rows (data.packing); unset eval_packing")


# transformers' AcceleratorConfig defaults, as TrainingArguments.to_dict() writes them
ACCELERATOR_DEFAULTS = {"split_batches": False, "dispatch_batches": None, "even_batches": True,
                        "use_seedable_sampler": True, "non_blocking": False, "gradient_accumulation_kwargs": None}


def _optim(value, values):
    """TRL optim -> training.optim: jsft has adamw_torch(_fused), adafactor, sgd, lion_32bit (also spelled
    paged_lion_32bit: no paging on accelerators with one memory) and muon."""
    name = {"paged_lion_32bit": "lion_32bit", "adamw_torch_fused": "adamw_torch"}.get(value, value)
    return {"training.optim": name}


def _optim_args(value, values):
    """TRL's optim_args string "momentum=0.9,nesterov=True" -> training.optim_args {"momentum": "0.9", ...}."""
    if not value:
        return {}
    if isinstance(value, dict):
        return {"training.optim_args": value}
    try:
        pairs = dict(item.split("=") for item in value.replace(" ", "").split(","))
    except ValueError:
        raise ConfigError(f"TRL optim_args={value!r}: write it as key=value pairs separated by commas, as "
                          "transformers parses it (e.g. 'momentum=0.9,nesterov=True')") from None
    return {"training.optim_args": pairs}


def _pad_to_multiple_of(value, values):
    """TRL pads each batch to its longest row rounded up to this ("auto"/None: no rounding). jsft: the same with a
    value; "auto"/None keep rows at max_length (every distinct length would compile the step once)."""
    if value in ("auto", None) or (isinstance(value, str) and value.lower() in ("none", "null")):
        return {"data.pad_to_multiple_of": None}
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return {"data.pad_to_multiple_of": value}  # anything else: set_field names the expected type


def _scheduler_kwargs(value, values):
    """A dict, or the JSON string of one (as on TRL's command line); None: no options."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"TRL lr_scheduler_kwargs={value!r}: not a JSON dict ({e.msg})") from e
    return {"training.lr_scheduler_kwargs": value or {}}


def _with(field_name):
    """Read together with another field (its conversion handles this one)."""

    def convert(value, values):
        return {}

    convert.__doc__ = f"read with {field_name}"
    return convert


# ----------------------------------------------------------------------------------------------- the table

# name: (TRL default, where it goes, why a non-default is refused / what it means)
TRL_FIELDS: dict[str, tuple] = {
    # --- model (ModelConfig) ---
    "model_name_or_path": (None, _default_none("model.model_name_or_path", ""), ""),
    "model_revision": ("main", NO_KNOB, "jsft reads a local checkpoint directory; download the revision first"),
    "dtype": ("float32", _param_dtype, ""),
    "attn_implementation": (None, NO_EFFECT, "jsft picks its own packed attention (model.attention_impl)"),
    "trust_remote_code": (False, NO_KNOB, "jsft builds Llama-family models itself; no remote code runs"),
    "model_init_kwargs": (None, _one_of((None, {}), "jsft builds the model from its config.json; "
                                          "set model.dtype (TRL's dtype) instead"), ""),
    "use_peft": (False, "lora.use_peft", ""),
    "lora_r": (16, "lora.lora_r", ""),
    "lora_alpha": (32, "lora.lora_alpha", ""),
    "lora_dropout": (0.05, "lora.lora_dropout", ""),
    "lora_target_modules": (None, _targets, ""),
    "lora_target_parameters": (None, NO_KNOB, "LoRA on raw parameters (MoE experts) is not supported"),
    "lora_modules_to_save": (None, "lora.lora_modules_to_save", ""),
    "lora_task_type": ("CAUSAL_LM", NO_KNOB, "jsft trains causal LMs only"),
    "use_rslora": (False, "lora.use_rslora", ""),
    "use_dora": (False, "lora.use_dora", ""),
    "load_in_8bit": (False, "model.load_in_8bit", ""),
    "load_in_4bit": (False, "model.load_in_4bit", ""),
    "bnb_4bit_quant_type": ("nf4", "model.bnb_4bit_quant_type", ""),
    "use_bnb_nested_quant": (False, "model.use_bnb_nested_quant", ""),
    "bnb_4bit_quant_storage": (None, "model.bnb_4bit_quant_storage", ""),
    # --- data (ScriptArguments, DatasetMixtureConfig, SFTConfig) ---
    "dataset_name": (None, _default_none("data.dataset_name", ""), ""),
    "dataset_config": (None, "data.dataset_config", ""),
    "dataset_train_split": ("train", "data.dataset_train_split", ""),
    "dataset_test_split": ("test", _with("eval_strategy"), ""),
    "dataset_streaming": (False, "data.dataset_streaming", ""),
    "ignore_bias_buffers": (False, NO_EFFECT, "a torch DDP workaround"),
    "datasets": ([], _mixture, ""),
    "streaming": (False, NO_KNOB, "jsft reads a mixture's rows whole: a mixture's streaming is not supported (drop "
                  "streaming: true, the rows are then read whole; dataset_streaming streams a single dataset)"),
    "test_split_size": (None, _with("datasets"), ""),
    "dataset_text_field": ("text", "data.dataset_text_field", ""),
    "dataset_kwargs": (None, _one_of((None, {}), "skip_prepare_dataset and other preparation "
                                       "kwargs are not supported"), ""),
    "dataset_num_proc": (None, "data.dataset_num_proc", ""),
    "max_length": (1024, "data.max_length", ""),
    "truncation_mode": ("keep_start", "data.truncation_mode", ""),
    "shuffle_dataset": (False, "data.shuffle_dataset", ""),
    "packing": (False, "data.packing", ""),
    "packing_strategy": ("bfd", _renamed("data.packing_strategy", {"bfd-requeue": "bfd_split"}), ""),
    "padding_free": (False, "data.padding_free", ""),
    "pad_to_multiple_of": ("auto", _pad_to_multiple_of, ""),
    "eval_packing": (None, _eval_packing, ""),
    "completion_only_loss": (None, "data.completion_only_loss", ""),
    "assistant_only_loss": (False, "data.assistant_only_loss", ""),
    "chat_template_path": (None, "data.chat_template_path", ""),
    "eos_token": (None, _token("data.eos_token", "eos_token"), ""),
    "pad_token": (None, _token("data.pad_token", "pad_token"), ""),
    "remove_unused_columns": (True, NO_EFFECT, "jsft reads only the columns of the detected format"),
    "label_names": (None, NO_KNOB, "labels come from the dataset format and the loss masks"),
    "length_column_name": ("length", NO_EFFECT, "unused without group-by-length sampling"),
    "train_sampling_strategy": ("random", "data.train_sampling_strategy", ""),
    "data_seed": (None, NO_KNOB, "jsft seeds data order with seed"),
    # --- optimization ---
    "learning_rate": (2e-5, "training.learning_rate", ""),
    "lr_scheduler_type": ("linear", "training.lr_scheduler_type", ""),
    "lr_scheduler_kwargs": (None, _scheduler_kwargs, ""),
    "warmup_steps": (0, _warmup, ""),
    "warmup_ratio": (0.0, _with("warmup_steps"), ""),  # transformers < 5
    "optim": ("adamw_torch_fused", _optim, ""),
    "optim_args": (None, _optim_args, ""),
    "optim_target_modules": (None, NO_KNOB, "GaLore-style optimizers are not supported"),
    "weight_decay": (0.0, "training.weight_decay", ""),
    "adam_beta1": (0.9, "training.adam_beta1", ""),
    "adam_beta2": (0.999, "training.adam_beta2", ""),
    "adam_epsilon": (1e-8, "training.adam_epsilon", ""),
    "max_grad_norm": (1.0, "training.max_grad_norm", ""),
    "per_device_train_batch_size": (8, "training.per_device_train_batch_size", ""),
    "per_device_eval_batch_size": (8, "training.per_device_eval_batch_size", ""),
    "gradient_accumulation_steps": (1, "training.gradient_accumulation_steps", ""),
    "num_train_epochs": (3.0, "training.num_train_epochs", ""),
    "max_steps": (-1, "training.max_steps", ""),
    "seed": (42, "training.seed", ""),
    "loss_type": ("nll", _renamed("training.loss_type", {"chunked_nll": "nll"}), ""),
    "average_tokens_across_devices": (True, NO_KNOB, "jsft always divides by the trained tokens of all devices"),
    "label_smoothing_factor": (0.0, "training.label_smoothing_factor", ""),
    "neftune_noise_alpha": (None, "training.neftune_noise_alpha", ""),
    "router_aux_loss_coef": (None, NO_KNOB, "MoE models are not supported"),
    "auto_find_batch_size": (False, NO_KNOB, "set per_device_train_batch_size explicitly"),
    "full_determinism": (False, NO_EFFECT, "jsft runs are deterministic for a seed on a given device"),
    # --- precision and memory ---
    "bf16": (None, _compute_dtype, ""),
    "fp16": (False, NO_KNOB, "jsft computes in bfloat16 or float32 (fp16 needs loss scaling); use bf16"),
    "bf16_full_eval": (False, NO_KNOB, "eval runs in model.compute_dtype"),
    "fp16_full_eval": (False, NO_KNOB, "fp16 is not supported"),
    "tf32": (None, _one_of((None, True), "jsft leaves float32 matmul precision to XLA (TF32 on "
                                         "Ampere and newer GPUs); full float32 matmuls are not supported"), ""),
    "gradient_checkpointing": (True, _remat, ""),
    "activation_checkpointing": (None, _with("gradient_checkpointing"), ""),
    "activation_offloading": (False, _with("gradient_checkpointing"), ""),
    "gradient_checkpointing_kwargs": (None, NO_EFFECT, "torch checkpoint options (use_reentrant)"),
    "activation_checkpointing_kwargs": (None, NO_EFFECT, "torch checkpoint options (use_reentrant)"),
    "use_liger_kernel": (False, NO_KNOB, "Liger kernels are torch/Triton only; jsft's loss is already chunked"),
    "liger_kernel_config": (None, NO_KNOB, "Liger kernels are torch/Triton only"),
    "torch_compile": (False, NO_EFFECT, "XLA always compiles the step"),
    "torch_compile_backend": (None, NO_EFFECT, "XLA always compiles the step"),
    "torch_compile_mode": (None, NO_EFFECT, "XLA always compiles the step"),
    "torch_empty_cache_steps": (None, NO_EFFECT, "a torch allocator setting"),
    "use_cache": (False, NO_EFFECT, "a KV cache is not used in training"),
    # --- logging, evaluation, saving ---
    "output_dir": (None, _default_none("logging.output_dir", "trainer_output"), ""),
    "logging_strategy": ("steps", NO_KNOB, "jsft logs every logging_steps steps"),
    "logging_steps": (10, _steps("logging.logging_steps"), ""),
    "logging_first_step": (False, "logging.logging_first_step", ""),
    "logging_nan_inf_filter": (True, _one_of((True,), "jsft never logs a "
                                             "non-finite step into a mean (a NaN step stops the run, or is skipped and "
                                             "counted with training.max_nonfinite_steps)"), ""),
    "log_on_each_node": (True, NO_EFFECT, "a logging detail"),
    "log_level": ("passive", NO_EFFECT, "a logging detail"),
    "log_level_replica": ("warning", NO_EFFECT, "a logging detail"),
    "include_num_input_tokens_seen": ("no", NO_EFFECT, "jsft always logs num_tokens"),
    "disable_tqdm": (None, _default_none("logging.disable_tqdm", False), ""),
    "report_to": ("none", _report_to, ""),
    "run_name": (None, "logging.run_name", ""),
    "project": ("huggingface", "logging.project", ""),
    "trackio_space_id": (None, NO_EFFECT, "a logging-backend setting"),
    "trackio_bucket_id": (None, NO_EFFECT, "a logging-backend setting"),
    "trackio_static_space_id": (None, NO_EFFECT, "a logging-backend setting"),
    "eval_strategy": ("no", _eval, ""),
    "eval_steps": (None, _with("eval_strategy"), ""),
    "eval_delay": (0, NO_KNOB, "evaluation starts at step eval_steps"),
    "eval_on_start": (False, "logging.eval_on_start", ""),
    "prediction_loss_only": (False, NO_EFFECT, "jsft evaluates loss, entropy and token accuracy"),
    "eval_do_concat_batches": (True, NO_EFFECT, "an eval-loop detail"),
    "eval_use_gather_object": (False, NO_EFFECT, "an eval-loop detail"),
    "eval_accumulation_steps": (None, NO_EFFECT, "an eval-loop detail"),
    "include_for_metrics": ([], NO_KNOB, "compute_metrics inputs are not supported"),
    "batch_eval_metrics": (False, NO_KNOB, "compute_metrics is not supported"),
    "save_strategy": ("steps", "logging.save_strategy", ""),
    "save_steps": (500, _steps("logging.save_steps"), ""),
    "save_total_limit": (None, "logging.save_total_limit", ""),
    "save_only_model": (False, NO_KNOB, "checkpoints always hold the optimizer and data state (exact resume)"),
    "save_on_each_node": (False, NO_EFFECT, "Orbax writes one checkpoint for all hosts"),
    "enable_jit_checkpoint": (False, _jit_checkpoint, ""),
    "load_best_model_at_end": (False, "logging.load_best_model_at_end", ""),
    "metric_for_best_model": (None, "logging.metric_for_best_model", ""),
    "greater_is_better": (None, "logging.greater_is_better", ""),
    "resume_from_checkpoint": (None, _resume, ""),
    "ignore_data_skip": (False, NO_KNOB, "resuming always restores the data iterator exactly"),
    "restore_callback_states_from_checkpoint": (False, NO_EFFECT, "jsft has no callbacks"),
    "push_to_hub": (False, NO_KNOB, "jsft writes to output_dir only; upload it yourself"),
    "hub_token": (None, NO_EFFECT, "unused without push_to_hub"),
    "hub_private_repo": (None, NO_EFFECT, "unused without push_to_hub"),
    "hub_model_id": (None, NO_EFFECT, "unused without push_to_hub"),
    "hub_strategy": ("every_save", NO_EFFECT, "unused without push_to_hub"),
    "hub_always_push": (False, NO_EFFECT, "unused without push_to_hub"),
    "hub_revision": (None, NO_EFFECT, "unused without push_to_hub"),
    # --- devices and data loading (torch/accelerate) ---
    "use_cpu": (False, "sharding.use_cpu", ""),
    "accelerator_config": (None, _one_of((None, {}, ACCELERATOR_DEFAULTS), "accelerate's "
                                         "data-loader settings (split_batches, even_batches, ...) other than its "
                                         "defaults change what a batch is; jsft shards batches with sharding.*"), ""),
    "parallelism_config": (None, NO_KNOB, "set sharding.mesh_shape instead"),
    "fsdp": (None, _one_of((None, "", []), "TRL fsdp: set sharding.mesh_shape (fsdp axis) instead"), ""),
    "fsdp_config": (None, NO_KNOB, "set sharding.mesh_shape instead"),
    "deepspeed": (None, NO_KNOB, "set sharding.mesh_shape instead"),
    "ddp_find_unused_parameters": (None, NO_EFFECT, "a torch DDP setting"),
    "ddp_bucket_cap_mb": (None, NO_EFFECT, "a torch DDP setting"),
    "ddp_broadcast_buffers": (None, NO_EFFECT, "a torch DDP setting"),
    "ddp_static_graph": (None, NO_EFFECT, "a torch DDP setting"),
    "ddp_backend": (None, NO_EFFECT, "a torch DDP setting"),
    "ddp_timeout": (1800, NO_EFFECT, "a torch DDP setting"),
    "local_rank": (-1, NO_EFFECT, "set by torch launchers"),
    "dataloader_drop_last": (False, _one_of((False,), "TRL dataloader_drop_last=True: jsft trains every row each "
                                                      "epoch (the last step's free slots are empty rows)"), ""),
    "dataloader_num_workers": (0, NO_EFFECT, "set data.dataset_num_proc for tokenization workers"),
    "dataloader_pin_memory": (True, NO_EFFECT, "a torch data-loader setting"),
    "dataloader_persistent_workers": (False, NO_EFFECT, "a torch data-loader setting"),
    "dataloader_prefetch_factor": (None, NO_EFFECT, "a torch data-loader setting"),
    "dataloader_multiprocessing_context": (None, NO_EFFECT, "a torch data-loader setting"),
    "dataloader_in_order": (True, NO_EFFECT, "a torch data-loader setting"),
    "debug": ("", _one_of(("", [], None), "TRL debug: torch debug modes are not supported"), ""),
    "skip_memory_metrics": (True, NO_EFFECT, "a torch profiling setting"),
    "do_train": (False, NO_EFFECT, "unused by TRL's trainer"),
    "do_eval": (False, NO_EFFECT, "unused by TRL's trainer"),
    "do_predict": (False, NO_EFFECT, "unused by TRL's trainer"),
}


# ----------------------------------------------------------------------------------------------- reading


def _equal(a, b) -> bool:
    """TRL's default and a file value are equal; 0 and 0.0 are, True and 1 are not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _renamed_fields(values: dict) -> dict:
    values = dict(values)
    for old, new in RENAMED.items():
        if old in values:
            if new in values:
                raise ConfigError(f"TRL config has both {old!r} and its new name {new!r}: keep only {new!r}")
            values[new] = values.pop(old)
    return values


def _unknown_fields(values: dict) -> list[str]:
    problems = []
    for name in values:
        if name not in TRL_FIELDS:
            close = difflib.get_close_matches(name, list(TRL_FIELDS), n=2)
            problems.append(f"unknown TRL field {name!r}" + (f" (did you mean {' or '.join(close)}?)" if close else "")
                            + "; jsft reads the fields of TRL's SFTConfig, ModelConfig and ScriptArguments")
    return problems


def _conversions(merged: dict) -> tuple[dict, list[str]]:
    """Every TRL field of `merged` through the table -> ({TRL field: {jsft dotted path: value}}, [each refusal])."""
    converted, problems = {}, []
    for name, (default, target, why) in TRL_FIELDS.items():
        value = merged[name]
        if target == NO_EFFECT:
            continue
        if target == NO_KNOB:
            if not _equal(value, default):
                problems.append(f"TRL {name}={value!r} is not supported by jsft ({why}). "
                                f"Remove it or set it to TRL's default {default!r}.")
            continue
        try:
            converted[name] = {target: value} if isinstance(target, str) else target(value, merged)
        except ConfigError as e:
            problems.append(f"TRL {name}={value!r}: {e}")
    return converted, problems


def _apply(config: SFTConfig, converted: dict, merged: dict, problems: list[str]) -> SFTConfig:
    for name, updates in converted.items():
        for path, new in updates.items():
            try:
                set_field(config, path, new)
            except ConfigError as e:  # its message starts with the jsft field
                problems.append(f"TRL {name}={merged[name]!r} -> {e}")
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems, fix them all:\n  - " + "\n  - ".join(problems))
    return config


def _defaults() -> dict:
    return {name: default for name, (default, _, _) in TRL_FIELDS.items()}


def from_trl_dict(values: dict) -> SFTConfig:
    """Flat TRL fields -> SFTConfig (see the module docstring). Raises one ConfigError naming EVERY refused field
    (a typical TRL recipe should not take one edit-and-rerun per refusal)."""
    values = _renamed_fields(values)
    merged = {**_defaults(), **{k: v for k, v in values.items() if k in TRL_FIELDS}}
    converted, refused = _conversions(merged)
    return _apply(SFTConfig(), converted, merged, _unknown_fields(values) + refused)


def apply_trl_flags(config: SFTConfig, flags: dict) -> SFTConfig:
    """TRL fields given as flags (`--learning_rate 1e-4`) on top of a jsft config: only what those fields change.
    The table converts them with TRL's defaults for the other fields; a field whose conversion then differs from
    its conversion of the defaults (warmup_steps, when --warmup_ratio is given) is applied whole, the others not."""
    flags = _renamed_fields(flags)
    merged = {**_defaults(), **{k: v for k, v in flags.items() if k in TRL_FIELDS}}
    base, _ = _conversions(_defaults())
    converted, refused = _conversions(merged)
    changed = {name: updates for name, updates in converted.items() if name in flags or updates != base.get(name)}
    return _apply(config, changed, merged, _unknown_fields(flags) + refused)


def parse_flags(argv: list[str]) -> dict:
    """TRL's flat flags, as `trl sft` (HfArgumentParser) takes them -> {field: value}.

    `--learning_rate 1e-4`, `--max_length=4096`; a boolean field alone is true (`--packing`), `--no_packing` false;
    several words are a list (`--lora_target_modules q_proj v_proj`). Values parse like --set values."""
    from jsft.config import parse_value

    flags, i = {}, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: TRL flags look like --field value (or --field=value)")
        name, eq, raw = token[2:].partition("=")
        i += 1
        words = [raw] if eq else []
        while not eq and i < len(argv) and not argv[i].startswith("--"):
            words.append(argv[i])
            i += 1
        negated = name.startswith("no_") and name not in TRL_FIELDS and name[3:] in TRL_FIELDS
        field_name = name[3:] if negated else name
        default = TRL_FIELDS.get(RENAMED.get(field_name, field_name), (None,))[0]
        if negated:
            if words:
                raise ConfigError(f"--{name} takes no value (it sets {field_name} to false)")
            flags[field_name] = False
        elif not words:
            if not isinstance(default, bool):
                raise ConfigError(f"--{name} needs a value" + ("" if field_name in TRL_FIELDS or field_name in RENAMED
                                                              else " (and is not a TRL field)"))
            flags[field_name] = True
        else:
            values = [parse_value(w) for w in words]
            flags[field_name] = values[0] if len(values) == 1 else values
    return flags


def read_trl_file(path: str | Path) -> dict:
    """The flat dict of a TRL YAML or JSON config file."""
    import yaml

    path = Path(path)
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text) or {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"line {e.lineno}: not valid JSON: {e.msg}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}not valid YAML: {' '.join(str(getattr(e, 'problem', None) or e).split())}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a TRL config file must hold one mapping of field: value")
    if path.suffix != ".json":  # YAML 1.1 reads an unquoted no / off / yes as a bool
        unquoted = [f"{k}: {v}" for k, v in values.items()
                    if isinstance(v, bool) and k in TRL_FIELDS and isinstance(TRL_FIELDS[k][0], str)]
        if unquoted:
            raise ConfigError(f"{path}: {', '.join(unquoted)}: YAML reads an unquoted no/yes/off as a boolean; "
                              "quote the word, e.g. eval_strategy: 'no'")
    # YAML 1.1 reads 2e-5 (no dot) as a string; TRL's argument parser reads it as the float it is
    return {k: float(v) if isinstance(v, str) and YAML_EXPONENT_FLOAT.match(v) else v for k, v in values.items()}


def from_trl_file(path: str | Path) -> SFTConfig:
    """A TRL config saved as YAML or JSON -> jsft SFTConfig (call jsft.config.validate, or use jsft.config_files.load)."""
    try:
        return from_trl_dict(read_trl_file(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
