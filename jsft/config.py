"""The typed configuration of a run. Field names are TRL's (SFTConfig, ModelConfig) wherever TRL has the knob.

A config file is a Python file that defines `config = SFTConfig(...)`. Fields are grouped in sections:

    config.model.model_name_or_path     config.data.max_length       config.training.learning_rate
    config.lora.use_peft                config.sharding.mesh_shape   config.logging.output_dir

Overrides on the command line: `--set training.learning_rate=1e-5 --set data.packing=true`.
Unknown fields and wrong types are errors, raised before any compute (jsft.validate checks a whole config).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field

from jsft.errors import ConfigError


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
    lr_scheduler_kwargs: dict = field(default_factory=dict)  # each schedule's options: jsft.validate.SCHEDULE_KWARGS
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


def check_type(value, annotation, where: str):
    """Raise ConfigError unless value fits the (simple) annotation; returns the value, ints widened to float."""
    hints = annotation
    origin = typing.get_origin(hints)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for option in typing.get_args(hints):
            try:
                return check_type(value, option, where)
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
        return [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a dict, got {type(value).__name__} {value!r}")
        args = typing.get_args(hints)
        if args:
            return {k: check_type(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return value
    if hints is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a dict, got {type(value).__name__} {value!r}")
    return value


def section_types(section_cls) -> dict:
    return typing.get_type_hints(section_cls)


# ----------------------------------------------------------------------------------------------- choices

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
        fields = {f"{s}.{f}": f for s, c in SECTIONS.items() for f in section_types(c)}
        close += [dotted for dotted, f in fields.items() if f == section_name]  # --set learning_rate=... (no section)
    else:
        own = list(section_types(SECTIONS[section_name])) if section_name in SECTIONS else []
        close = [f"{section_name}.{f}" for f in difflib.get_close_matches(name, own, n=2, cutoff=0.7)]
        everywhere = {f: s for s, c in SECTIONS.items() for f in section_types(c)}
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
    known = section_types(type(section))
    if name not in known:
        raise ConfigError(f"unknown field {dotted!r}{did_you_mean(section_name, name)}")
    setattr(section, name, check_type(value, known[name], dotted))


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
    annotation = section_types(type(getattr(config, section_name))).get(name) if section_name in SECTIONS else None
    return annotation is str or str in typing.get_args(annotation)
