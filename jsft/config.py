"""The typed configuration of a run. Field names are TRL's (SFTConfig, ModelConfig) wherever TRL has the knob.

A config file is a Python file that defines `config = SFTConfig(...)`. Fields are grouped in sections:

    config.model.model_name_or_path     config.data.max_length       config.training.learning_rate
    config.lora.use_peft                config.sharding.mesh_shape   config.logging.output_dir

Overrides on the command line: `--set training.learning_rate=1e-5 --set data.packing=true`.
Unknown fields and wrong types are errors, raised before any compute.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from jsft.errors import ConfigError
from jsft.peft_names import check_target_syntax


@dataclass
class ModelConfig:
    model_name_or_path: str = ""  # a local HF checkpoint directory (or a hub name where there is network)
    dtype: str = "bfloat16"  # parameter dtype: bfloat16 | float32
    compute_dtype: str = "bfloat16"  # matmul dtype; softmax, norms and the loss always run in float32
    attention_impl: str = "auto"  # auto | xla | cudnn | tokamax | pallas (jsft.model.attention)
    remat_policy: str = "full"  # none | full | save_dots | offload  (TRL: gradient_checkpointing)
    init_from_scratch: dict | None = None  # HF config.json fields: random-init a model instead of loading one
    tokenizer_name_or_path: str | None = None  # None: model_name_or_path (needed with init_from_scratch)
    # QLoRA (jsft/model/quant.py): the frozen base's q/k/v/o/gate/up/down kernels quantized as they load, in
    # bitsandbytes' formats; embeddings, lm_head and norms stay in dtype; matmuls dequantize to compute_dtype
    load_in_4bit: bool = False  # 4-bit blocks of 64 (needs lora.use_peft)
    load_in_8bit: bool = False  # LLM.int8's row-wise int8 (needs lora.use_peft)
    bnb_4bit_quant_type: str = "nf4"  # nf4 | fp4
    use_bnb_nested_quant: bool = False  # quantize the 4-bit block scales too (double quantization)
    bnb_4bit_quant_storage: str | None = None  # accepted for TRL; jsft stores the 4-bit codes as uint8 either way


@dataclass
class DataConfig:
    dataset_name: str = ""  # a local .jsonl/.json/.parquet/.arrow file or directory, or a hub name
    dataset_config: str | None = None
    dataset_train_split: str = "train"
    dataset_test_split: str | None = None  # a split name, or a second file path for eval
    dataset_text_field: str = "text"
    # read the train split lazily as a datasets IterableDataset, tokenized and packed while training runs
    # (jsft.data.streaming): nothing is tokenized up front, nothing cached; needs training.max_steps
    dataset_streaming: bool = False
    max_length: int | None = 1024
    packing: bool = False
    packing_strategy: str = "bfd"  # bfd | bfd_split | wrapped | bfd_stream
    packing_buffer_size: int = 10_000  # examples held by the streaming best-fit (bfd_stream)
    padding_free: bool = False  # true: rows filled by packing, only tail padding
    pad_to_multiple_of: int | None = None  # no packing: pad a step to its longest row, rounded up (None: max_length)
    completion_only_loss: bool | None = None  # None: on for prompt/completion data
    assistant_only_loss: bool = False
    # auto: a conversation whose template renders a turn differently once later turns follow (reasoning dropped from
    # history, a moved system prompt) trains that turn in a document of its own, as rendered at inference; never:
    # one document per row, such templates refused (without {% generation %} markers)
    split_conversations: str = "auto"
    truncation_mode: str = "keep_start"  # keep_start | keep_end (without packing)
    chat_template_path: str | None = None  # a .jinja file, or a tokenizer directory to clone the template from
    eos_token: str | None = None
    pad_token: str | None = None
    skip_bad_rows: bool = False  # true: count and report bad rows instead of raising
    shuffle_dataset: bool = True  # shuffle the examples before packing (TRL's knob)
    train_sampling_strategy: str = "random"  # random: rows reshuffled every epoch | sequential: in row order |
    #   group_by_length (no packing): each step's rows from one of a few length buckets, steps shuffled
    length_buckets: int = 8  # group_by_length: at most this many row lengths (compiled shapes)
    dataset_num_proc: int | None = None  # Grain worker processes for tokenization (None: in-process)
    cache_dir: str | None = None  # tokenized-dataset cache (default: <output_dir>/cache)
    # a mixture (TRL's DatasetMixtureConfig, jsft.data.mixture): a list of {path, name, data_dir, data_files, split,
    # columns, fraction}; when set, dataset_name is unused, dataset_train_split is "train" and dataset_test_split
    # "test" (with test_split_size) or an eval file
    datasets: list[dict] = field(default_factory=list)
    test_split_size: int | float | None = None  # mixture: the share (or row count) split off as "test", by seed
    # jsft, beyond TRL: sample the mixture's rows from its components with these probabilities (one a component,
    # summing to 1) as datasets.interleave_datasets(seed=training.seed), until one component runs out
    # (first_exhausted) or all have (all_exhausted: the others repeat)
    mixture_probabilities: list[float] | None = None
    mixture_stopping_strategy: str = "first_exhausted"


@dataclass
class TrainingConfig:
    learning_rate: float = 2e-5
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"  # transformers' names: linear | cosine | cosine_with_min_lr | polynomial |
    #   cosine_with_restarts | constant | constant_with_warmup | inverse_sqrt | warmup_stable_decay
    lr_scheduler_kwargs: dict = field(default_factory=dict)  # each schedule's options: jsft.config.SCHEDULE_KWARGS
    weight_decay: float = 0.0
    optim: str = "adamw_torch"  # transformers' names: adamw_torch | adafactor | sgd | lion_32bit | muon (optax)
    optim_args: dict = field(default_factory=dict)  # sgd: momentum, nesterov; muon: beta, ns_steps, nesterov
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    loss_type: str = "nll"  # nll | dft
    label_smoothing_factor: float = 0.0  # transformers' LabelSmoother (nll only), in training and eval loss
    neftune_noise_alpha: float | None = None  # NEFTune noise on the input embeddings while training (TRL's formula)
    loss_chunk_size: int = 1024  # tokens per chunk of the lm_head + cross-entropy
    master_weights_fp32: bool = False  # full fine-tuning with bf16 params: keep fp32 master weights in the optimizer
    optimizer_state_dtype: str = "float32"  # float32 | bfloat16
    seed: int = 42
    peak_tflops: float | None = None  # device peak for MFU; None: looked up from the device kind
    max_nonfinite_steps: int = 0  # NaN/inf steps to skip (no update) before the run stops; 0: stop (jsft.guard)
    # jax's persistent compilation cache, so a resume or a rerun loads its compiled steps instead of compiling them:
    # "auto": <output_dir>/jax_cache | "none": off | a directory (may be shared by runs: one per user, e.g.
    # ~/.cache/jsft/jax; the cache is trusted code, never share it with users you do not trust)
    compilation_cache_dir: str = "auto"


@dataclass
class LoraConfig:  # TRL's ModelConfig names
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str = "all-linear"  # PEFT's rules: a str is a regex (full match), a list suffixes
    use_rslora: bool = False  # PEFT's rank-stabilized LoRA: scale alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False  # PEFT's DoRA: a trained magnitude per output times the normalized W + s B A
    lora_modules_to_save: list[str] | None = None  # modules trained whole beside the adapters (PEFT modules_to_save)


@dataclass
class ShardingConfig:
    mesh_shape: dict[str, int] = field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})
    coordinator_address: str | None = None  # multi-host: host:port of process 0 (None: auto-detect or single)
    num_processes: int | None = None
    process_id: int | None = None
    use_cpu: bool = False  # TRL's use_cpu: the CPU even where a GPU is present (JAX_PLATFORMS=cpu does the same)


@dataclass
class LoggingConfig:
    output_dir: str = "output"
    # logging/eval/save steps: a step count, or a ratio of the total steps when < 1 (transformers: ceil(ratio * total))
    logging_steps: int | float = 10
    logging_first_step: bool = False  # also log the first step
    eval_strategy: str = "steps"  # steps: every eval_steps (when set) | epoch: each epoch's end | no; and at the end
    eval_steps: int | float | None = None
    eval_on_start: bool = False  # evaluate before the first step (a sanity check of the eval path and the base)
    save_steps: int | float = 500
    save_strategy: str = "steps"  # steps: every save_steps and at the end | epoch: every epoch | best: each new best
    #   eval metric | no: only on Ctrl-C / SIGTERM
    load_best_model_at_end: bool = False  # export (and return) the checkpoint with the best eval metric
    metric_for_best_model: str | None = None  # None: "loss" (eval_loss) with load_best_model_at_end or save "best"
    greater_is_better: bool | None = None  # None: False for a loss, True for anything else (transformers' rule)
    save_total_limit: int | None = 3
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])  # + wandb, trackio, mlflow;
    #   "all": every one installed; "none": nothing
    run_name: str | None = None  # the run's name in wandb / trackio / mlflow
    project: str = "huggingface"  # the wandb / trackio project (TRL's default; WANDB_PROJECT overrides for wandb)
    resume_from_checkpoint: bool | None = None  # None: resume when output_dir holds a checkpoint
    export_formats: list[str] = field(default_factory=lambda: ["auto"])  # auto | full | merged | adapter
    num_eval_generations: int = 3
    disable_tqdm: bool = False
    save_on_sigterm: bool = True  # SIGTERM: finish the step, save a checkpoint, exit 143 (False: exit at once)


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = typing.get_type_hints(SFTConfig)  # section name -> its dataclass


# ----------------------------------------------------------------------------------------------- type checking


def _check_type(value, annotation, where: str):
    """Raise ConfigError unless value fits the (simple) annotation; returns the value, ints widened to float."""
    hints = annotation
    origin = typing.get_origin(hints)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for option in typing.get_args(hints):
            try:
                return _check_type(value, option, where)
            except ConfigError:
                pass
        names = " or ".join("None" if o is type(None) else o.__name__ if isinstance(o, type) else str(o)
                            for o in typing.get_args(hints))
        raise ConfigError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")
    if hints is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected None, got {value!r}")
    if hints is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hints in (int, float, str, bool):
        if isinstance(value, hints) and not (hints is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{where}: expected {hints.__name__}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(hints)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a dict, got {type(value).__name__} {value!r}")
        args = typing.get_args(hints)
        if args:
            return {k: _check_type(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return value
    if hints is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a dict, got {type(value).__name__} {value!r}")
    return value


def _section_types(section_cls) -> dict:
    return typing.get_type_hints(section_cls)


# ----------------------------------------------------------------------------------------------- validation

CHOICES = {
    ("model", "dtype"): ("bfloat16", "float32"),
    ("model", "compute_dtype"): ("bfloat16", "float32"),
    ("model", "attention_impl"): ("auto", "xla", "cudnn", "tokamax", "pallas"),
    ("model", "remat_policy"): ("none", "full", "save_dots", "offload"),
    ("model", "bnb_4bit_quant_type"): ("nf4", "fp4"),
    ("data", "packing_strategy"): ("bfd", "bfd_split", "wrapped", "bfd_stream"),
    ("data", "truncation_mode"): ("keep_start", "keep_end"),
    ("data", "split_conversations"): ("auto", "never"),
    ("data", "train_sampling_strategy"): ("random", "sequential", "group_by_length"),
    ("logging", "save_strategy"): ("steps", "epoch", "best", "no"),
    ("logging", "eval_strategy"): ("steps", "epoch", "no"),
    ("training", "lr_scheduler_type"): ("linear", "cosine", "cosine_with_min_lr", "cosine_with_restarts", "polynomial",
                                        "constant", "constant_with_warmup", "inverse_sqrt", "warmup_stable_decay"),
    ("training", "loss_type"): ("nll", "dft"),
    ("training", "optim"): ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "lion_32bit", "muon"),
    ("training", "optimizer_state_dtype"): ("float32", "bfloat16"),
}


def validate(config: SFTConfig) -> SFTConfig:
    """Check types, choices and combinations; raise ConfigError naming the field. Returns the config."""
    for section_name, section_cls in SECTIONS.items():
        section = getattr(config, section_name)
        if not isinstance(section, section_cls):
            raise ConfigError(f"{section_name}: expected a {section_cls}, got {type(section).__name__}")
        known = _section_types(type(section))
        for name in vars(section):  # `config.training.learnig_rate = ...` in a config file adds an attribute
            if name not in known:
                raise ConfigError(f"unknown field {section_name}.{name}{did_you_mean(section_name, name)}")
        for name, annotation in _section_types(type(section)).items():
            value = _check_type(getattr(section, name), annotation, f"{section_name}.{name}")
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
        from jsft.trackers import TRACKERS, installed

        lg.report_to = ["jsonl", "tensorboard"] + [name for name in TRACKERS if installed(name)]
    bad = [r for r in lg.report_to if r not in REPORT_TO]
    need(not bad, "logging.report_to", lg.report_to, f"choose from {', '.join(REPORT_TO)}, all, none")
    from jsft.trackers import installed

    for name in lg.report_to:
        need(name in ("jsonl", "tensorboard") or installed(name), "logging.report_to", lg.report_to,
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


def check_data_compatibility(config: SFTConfig, columns, first_row: dict | None = None) -> None:
    """Refuse loss settings the dataset cannot satisfy, once its columns (and a first row) are known.

    assistant_only_loss needs conversational data: a `messages` or `conversations` column, a conversational
    prompt/completion (lists of {"role", "content"} messages; pass `first_row` to detect it), or pre-tokenized
    `assistant_masks`. completion_only_loss=True needs a `completion` column or a pre-tokenized `completion_mask`.
    Pre-tokenized `labels` satisfy both: they are the trained mask, used as is (jsft.data.formats).
    Example: check_data_compatibility(cfg, ["text"]) with data.assistant_only_loss=True raises ConfigError.
    jsft.data.pipeline calls it as soon as a split's rows are loaded, before tokenizing.
    """
    columns = set(columns)
    d = config.data

    def conversational(row) -> bool:  # TRL's is_conversational
        for key in ("prompt", "completion", "messages"):
            value = row.get(key) if row else None
            if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
                return True
        return False

    pretokenized = {"assistant_masks", "completion_mask", "labels"} if "input_ids" in columns else set()
    if d.assistant_only_loss:
        ok = bool(columns & ({"messages", "conversations"} | (pretokenized - {"completion_mask"}))) or \
            conversational(first_row)
        if not ok:
            raise ConfigError(
                f"data.assistant_only_loss=True, but the dataset (columns {sorted(columns)}) is not conversational: "
                "it needs a messages / conversations column or a conversational prompt/completion. Set "
                "data.assistant_only_loss=False (or completion_only_loss for prompt/completion data)."
            )
    if d.completion_only_loss is True and not columns & ({"completion"} | (pretokenized - {"assistant_masks"})):
        raise ConfigError(
            f"data.completion_only_loss=True, but the dataset (columns {sorted(columns)}) has no completion: it "
            "needs prompt + completion columns (or a pre-tokenized completion_mask). Set "
            "data.completion_only_loss=None (automatic) or False."
        )
    known = {"messages", "conversations", "prompt", "completion", "input_ids"}
    if not columns & known and d.dataset_text_field not in columns:
        raise ConfigError(
            f"data.dataset_text_field={d.dataset_text_field!r} is not a column of the dataset (columns "
            f"{sorted(columns)}), and no other format was detected: set data.dataset_text_field to the text column."
        )


# ----------------------------------------------------------------------------------------------- building


def from_dict(values: dict) -> SFTConfig:
    """Build from nested dicts {"training": {"learning_rate": 1e-5}, ...}; unknown keys are errors."""
    config = SFTConfig()
    for section_name, fields in values.items():
        if section_name not in SECTIONS:
            raise ConfigError(f"unknown config section {section_name!r}{did_you_mean(section_name)}: use one of "
                              f"{', '.join(SECTIONS)}")
        for name, value in fields.items():
            set_field(config, f"{section_name}.{name}", value)
    return config


def did_you_mean(section_name: str, name: str | None = None) -> str:
    """' (did you mean training.learning_rate?)' for a mistyped section (name None) or field; '' when nothing is
    close. A field is looked for in its own section first, then in every section (a field set under the wrong one)."""
    if name is None:
        close = difflib.get_close_matches(section_name, list(SECTIONS), n=2)
        fields = {f"{s}.{f}": f for s, c in SECTIONS.items() for f in _section_types(c)}
        close += [dotted for dotted, f in fields.items() if f == section_name]  # --set learning_rate=... (no section)
    else:
        own = list(_section_types(SECTIONS[section_name])) if section_name in SECTIONS else []
        close = [f"{section_name}.{f}" for f in difflib.get_close_matches(name, own, n=2, cutoff=0.7)]
        everywhere = {f: s for s, c in SECTIONS.items() for f in _section_types(c)}
        if name in everywhere:  # a field of another section
            close = [f"{everywhere[name]}.{name}"]
        elif not close:
            close = [f"{everywhere[f]}.{f}" for f in difflib.get_close_matches(name, list(everywhere), n=2)]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def set_field(config: SFTConfig, dotted: str, value) -> None:
    section_name, _, name = dotted.partition(".")
    if section_name not in SECTIONS:
        raise ConfigError(f"unknown config section {section_name!r} in {dotted!r}{did_you_mean(section_name)}: use "
                          f"one of {', '.join(SECTIONS)}")
    section = getattr(config, section_name)
    known = _section_types(type(section))
    if name not in known:
        raise ConfigError(f"unknown field {dotted!r}{did_you_mean(section_name, name)}")
    setattr(section, name, _check_type(value, known[name], dotted))


def parse_value(raw: str):
    """A --set value: true/false, none/null, JSON (numbers, quoted strings, lists, dicts), a bare [a, b] list of
    words, else the string itself. Examples: '1e-5' -> 1e-05, '[q_proj, v_proj]' -> ['q_proj', 'v_proj'],
    'none' -> None, 'output/run1' -> 'output/run1'."""
    text = raw.strip()
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    if text in ("none", "None", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_value(item.strip().strip("'\"")) for item in inner.split(",")] if inner else []
    return raw


def parse_override(text: str) -> tuple[str, object]:
    """'training.learning_rate=1e-5' -> ('training.learning_rate', 1e-05); see parse_value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    return key.strip(), parse_value(raw)


def apply_override(config: SFTConfig, text: str) -> None:
    """Apply one --set; a value that parsed as a number/bool but lands in a str field is kept as the string
    (--set data.eos_token=123 sets '123')."""
    key, value = parse_override(text)
    try:
        set_field(config, key, value)
    except ConfigError:
        raw = text.split("=", 1)[1]
        if isinstance(value, str) or not _accepts_str(config, key):
            raise
        set_field(config, key, raw)


def _accepts_str(config: SFTConfig, dotted: str) -> bool:
    section_name, _, name = dotted.partition(".")
    annotation = _section_types(type(getattr(config, section_name))).get(name) if section_name in SECTIONS else None
    return annotation is str or str in typing.get_args(annotation)
