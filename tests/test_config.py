"""The config: unknown fields and wrong types are errors naming the field, --set parses, TRL config files map."""

import dataclasses
import json

import pytest

from jsft.config_files import load as load_config
from jsft import config as C
from jsft import trl_config as T
from jsft.config import ConfigError


def _valid(**sections):
    cfg = C.SFTConfig()
    cfg.model.model_name_or_path = "ckpt"
    cfg.data.dataset_name = "data.jsonl"
    for section, fields in sections.items():
        for name, value in fields.items():
            setattr(getattr(cfg, section), name, value)
    return cfg


PY_CONFIG = """
from jsft.config import SFTConfig, ModelConfig, DataConfig, TrainingConfig
config = SFTConfig(
    model=ModelConfig(model_name_or_path="ckpt"),
    data=DataConfig(dataset_name="data.jsonl", max_length=128, packing=True, padding_free=True),
    training=TrainingConfig({training}),
)
"""


def _py_file(tmp_path, training="learning_rate=1e-4"):
    path = tmp_path / "run.py"
    path.write_text(PY_CONFIG.format(training=training))
    return path


# ----------------------------------------------------------------------------------------------- files and --set


def test_python_config_file_loads_with_overrides(tmp_path):
    cfg = load_config(_py_file(tmp_path), ["training.max_steps=7", "data.packing_strategy=wrapped"])
    assert cfg.training.learning_rate == 1e-4 and cfg.training.max_steps == 7
    assert cfg.data.max_length == 128 and cfg.data.packing_strategy == "wrapped"


def test_unknown_field_in_python_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown field training\.learning_rat .*learning_rate"):
        load_config(_py_file(tmp_path, training="learning_rat=1e-4"))


def test_unknown_field_or_section_in_set_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown field 'training\.learning_rat'.*learning_rate"):
        load_config(_py_file(tmp_path), ["training.learning_rat=1e-5"])
    with pytest.raises(ConfigError, match="unknown config section 'trainer'"):
        load_config(_py_file(tmp_path), ["trainer.learning_rate=1e-5"])
    with pytest.raises(ConfigError, match="unknown config section 'optimizer'"):
        C.from_dict({"optimizer": {"lr": 1}})


@pytest.mark.parametrize("override, hint", [
    ("training.learnig_rate=1e-5", "(did you mean training.learning_rate?)"),  # a typo (no substring of the name)
    ("trainng.learning_rate=1e-5", "(did you mean training?)"),  # a typo of the section
    ("data.learning_rate=1e-5", "(did you mean training.learning_rate?)"),  # the field of another section
    ("learning_rate=1e-5", "(did you mean training.learning_rate?)"),  # no section
    ("training.max_len=64", "(did you mean data.max_length"),
])
def test_mistyped_set_overrides_get_a_did_you_mean(tmp_path, override, hint):
    with pytest.raises(ConfigError) as err:
        load_config(_py_file(tmp_path), [override])
    assert hint in str(err.value), str(err.value)


def test_mistyped_names_in_config_files_get_a_did_you_mean(tmp_path):
    """Python config files: a mistyped section keyword, a mistyped attribute set after construction (a dataclass
    took it silently), and nested dicts (from_dict) name the closest field."""
    path = tmp_path / "section.py"
    path.write_text("from jsft.config import SFTConfig, TrainingConfig\nconfig = SFTConfig(trainng=TrainingConfig())\n")
    with pytest.raises(ConfigError, match=r"section\.py: unknown config section 'trainng' \(did you mean training\?\)"):
        load_config(path)
    path = _py_file(tmp_path)
    path.write_text(path.read_text() + "config.training.learnig_rate = 1e-3\n")
    with pytest.raises(ConfigError, match=r"unknown field training\.learnig_rate \(did you mean "
                                          r"training\.learning_rate\?\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown field 'logging\.save_step' \(did you mean logging\.save_steps"):
        C.from_dict({"logging": {"save_step": 10}})


@pytest.mark.parametrize("code, line, error", [
    ("from jsft.config import SFTConfig\nconfig = SFTConfig(\n", 2, r"SyntaxError: '\(' was never closed"),
    ("from jsft.config import SFTConfig\nx = 1\nconfig = SFTConfig(model=Foo())\n", 3,
     r"NameError: name 'Foo' is not defined \(in: config = SFTConfig\(model=Foo\(\)\)\)"),
    ("import json\n\ndef f():\n    return json.loads('{')\n\nconfig = f()\n", 4, r"JSONDecodeError: Expecting"),
])
def test_an_error_in_a_python_config_file_names_its_line(tmp_path, code, line, error):
    path = tmp_path / "broken.py"
    path.write_text(code)
    with pytest.raises(ConfigError, match=rf"broken\.py, line {line}: {error}"):
        load_config(path)


def test_a_trl_file_that_does_not_parse_names_its_line(tmp_path):
    (tmp_path / "trl.yaml").write_text("learning_rate: 1e-4\n  max_length: [1\n")
    with pytest.raises(ConfigError, match=r"trl\.yaml: line 2: not valid YAML: mapping values are not allowed here"):
        load_config(tmp_path / "trl.yaml")
    (tmp_path / "trl.json").write_text('{"learning_rate": 1e-4,\n}')
    with pytest.raises(ConfigError, match=r"trl\.json: line 2: not valid JSON: Expecting property name"):
        load_config(tmp_path / "trl.json")


def test_wrong_type_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.learning_rate: expected float, got str 'fast'"):
        load_config(_py_file(tmp_path), ["training.learning_rate=fast"])
    with pytest.raises(ConfigError, match=r"training\.per_device_train_batch_size: expected int"):
        load_config(_py_file(tmp_path, training="per_device_train_batch_size='8'"))
    with pytest.raises(ConfigError, match=r"data\.packing: expected bool"):
        C.validate(_valid(data={"packing": 1}))
    with pytest.raises(ConfigError, match=r"data\.max_length: expected int or None, got float 12\.5"):
        load_config(_py_file(tmp_path), ["data.max_length=12.5"])
    with pytest.raises(ConfigError, match=r"logging\.eval_steps: expected int or float or None, got str 'often'"):
        load_config(_py_file(tmp_path), ["logging.eval_steps=often"])


@pytest.mark.parametrize("text, expected", [
    ("data.packing=true", True),
    ("data.shuffle_dataset=False", False),
    ("training.max_steps=12", 12),
    ("training.learning_rate=1e-5", 1e-5),
    ("training.warmup_ratio=0.25", 0.25),
    ("logging.save_total_limit=none", None),
    ("logging.save_total_limit=null", None),
    ("lora.lora_target_modules=[q_proj, v_proj]", ["q_proj", "v_proj"]),
    ('lora.lora_target_modules=["q_proj","o_proj"]', ["q_proj", "o_proj"]),
    ("logging.report_to=[]", []),
    ("data.dataset_name=/data/my file.jsonl", "/data/my file.jsonl"),
    ("logging.output_dir=output/run-1", "output/run-1"),
    ('sharding.mesh_shape={"data": 2, "fsdp": 4}', {"data": 2, "fsdp": 4}),
    ("data.eos_token=123", "123"),  # a str field keeps the text, not the number
    ("data.eos_token=<|im_end|>", "<|im_end|>"),
])
def test_set_overrides_parse(tmp_path, text, expected):
    cfg = load_config(_py_file(tmp_path), [text])
    section, _, name = text.split("=", 1)[0].partition(".")
    assert getattr(getattr(cfg, section), name) == expected
    assert type(getattr(getattr(cfg, section), name)) is type(expected)


def test_set_without_equals_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="expected section.field=value"):
        load_config(_py_file(tmp_path), ["data.packing"])


# ----------------------------------------------------------------------------------------------- combinations


@pytest.mark.parametrize("sections, needle", [
    ({"data": {"padding_free": True, "packing": False}}, "data.padding_free=True needs data.packing=True"),
    ({"data": {"packing": True, "max_length": None}}, "data.packing=True needs data.max_length"),
    ({"training": {"warmup_steps": 10, "warmup_ratio": 0.1}}, "set only one"),
    ({"training": {"master_weights_fp32": True}, "model": {"dtype": "float32"}}, "training.master_weights_fp32"),
    ({"training": {"adam_beta2": 1.0}}, "training.adam_beta2"),
    ({"training": {"max_grad_norm": -1.0}}, "training.max_grad_norm"),
    ({"training": {"loss_chunk_size": 0}}, "training.loss_chunk_size"),
    ({"training": {"loss_type": "chunked_nll"}}, "training.loss_type"),
    ({"lora": {"use_peft": True, "lora_target_modules": ["qkv"]}}, "lora.lora_target_modules"),
    ({"lora": {"use_peft": True, "lora_dropout": 1.0}}, "lora.lora_dropout"),
    ({"logging": {"report_to": ["comet_ml"]}}, "logging.report_to"),
    ({"logging": {"eval_steps": 0}}, "logging.eval_steps"),
    ({"logging": {"eval_steps": 10}}, "evaluates data.dataset_test_split, which is None"),
    ({"sharding": {"mesh_shape": {"pipeline": 2}}}, "sharding.mesh_shape"),
])
def test_impossible_combinations_are_refused(sections, needle):
    with pytest.raises(ConfigError) as err:
        C.validate(_valid(**sections))
    assert needle in str(err.value)


def test_valid_configs_pass():
    C.validate(_valid(training={"master_weights_fp32": True}, model={"dtype": "bfloat16"}))
    C.validate(_valid(lora={"use_peft": True, "lora_target_modules": ["q_proj", "down_proj"]}))
    C.validate(_valid(data={"packing": True, "padding_free": True, "packing_strategy": "bfd_split"}))


def test_keep_end_with_packing_is_a_warning_not_silence():
    with pytest.warns(UserWarning, match="truncation_mode='keep_end' has no effect with packing"):
        C.validate(_valid(data={"packing": True, "truncation_mode": "keep_end"}))


def test_assistant_only_loss_needs_conversational_data():
    cfg = _valid(data={"assistant_only_loss": True})
    for columns in (["text"], ["prompt", "completion"]):
        with pytest.raises(ConfigError, match="data.assistant_only_loss"):
            C.check_data_compatibility(cfg, columns, {"prompt": "2+2=", "completion": "4"})
    C.check_data_compatibility(cfg, ["messages"])
    C.check_data_compatibility(cfg, ["conversations"])
    C.check_data_compatibility(cfg, ["input_ids", "assistant_masks"])
    row = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    C.check_data_compatibility(cfg, ["prompt", "completion"], row)


def test_completion_only_loss_and_text_field_need_their_columns():
    with pytest.raises(ConfigError, match="data.completion_only_loss"):
        C.check_data_compatibility(_valid(data={"completion_only_loss": True}), ["text"])
    C.check_data_compatibility(_valid(data={"completion_only_loss": True}), ["prompt", "completion"])
    C.check_data_compatibility(_valid(data={"completion_only_loss": True}), ["input_ids", "completion_mask"])
    C.check_data_compatibility(_valid(data={"completion_only_loss": True}), ["input_ids", "labels"])
    # a `labels` column of a text dataset (a class label) is no pre-tokenized mask: still refused, for both losses
    with pytest.raises(ConfigError, match="data.completion_only_loss"):
        C.check_data_compatibility(_valid(data={"completion_only_loss": True}), ["text", "labels"])
    with pytest.raises(ConfigError, match="data.assistant_only_loss"):
        C.check_data_compatibility(_valid(data={"assistant_only_loss": True}), ["text", "labels", "assistant_masks"])
    with pytest.raises(ConfigError, match="data.dataset_text_field='text'"):
        C.check_data_compatibility(_valid(), ["content"])
    C.check_data_compatibility(_valid(data={"dataset_text_field": "content"}), ["content"])


# ----------------------------------------------------------------------------------------------- TRL files


def _trl_classes():
    pytest.importorskip("trl")
    from trl import ModelConfig, ScriptArguments, SFTConfig
    from trl.scripts.utils import DatasetMixtureConfig

    return SFTConfig, ModelConfig, ScriptArguments, DatasetMixtureConfig


def _trl_dict(**sft_kwargs):
    SFTConfig, ModelConfig, ScriptArguments, _ = _trl_classes()
    sft = SFTConfig(output_dir="out/trl", use_cpu=True, bf16=False, **sft_kwargs)
    model = ModelConfig(model_name_or_path="ckpt", dtype="bfloat16", use_peft=True, lora_r=8, lora_alpha=16,
                        lora_dropout=0.1, lora_target_modules=["q_proj", "k_proj", "down_proj"])
    script = ScriptArguments(dataset_name="data/messages.jsonl", dataset_train_split="train",
                             dataset_test_split="data/messages_test.jsonl")
    values = {**sft.to_dict(), **dataclasses.asdict(model), **dataclasses.asdict(script)}
    return sft, model, script, values


SFT_KWARGS = dict(
    learning_rate=1e-4, per_device_train_batch_size=4, per_device_eval_batch_size=2, gradient_accumulation_steps=2,
    num_train_epochs=2.0, max_steps=50, warmup_steps=0.1, lr_scheduler_type="cosine", weight_decay=0.01,
    adam_beta1=0.85, adam_beta2=0.98, adam_epsilon=1e-6, max_grad_norm=0.5, seed=7, logging_steps=5,
    save_steps=25, save_total_limit=2, eval_strategy="steps", eval_steps=20, max_length=256, packing=True,
    packing_strategy="bfd_split", padding_free=True, completion_only_loss=False, assistant_only_loss=True,
    shuffle_dataset=True, dataset_text_field="content", loss_type="dft", gradient_checkpointing=False,
    report_to="tensorboard", dataset_num_proc=2, chat_template_path="template.jinja", disable_tqdm=True,
)

# TRL field -> jsft path, for fields copied unchanged
SAME = {
    "learning_rate": "training.learning_rate", "per_device_train_batch_size": "training.per_device_train_batch_size",
    "per_device_eval_batch_size": "training.per_device_eval_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "num_train_epochs": "training.num_train_epochs", "max_steps": "training.max_steps",
    "lr_scheduler_type": "training.lr_scheduler_type", "weight_decay": "training.weight_decay",
    "adam_beta1": "training.adam_beta1", "adam_beta2": "training.adam_beta2", "adam_epsilon": "training.adam_epsilon",
    "max_grad_norm": "training.max_grad_norm", "seed": "training.seed", "loss_type": "training.loss_type",
    "logging_steps": "logging.logging_steps", "save_steps": "logging.save_steps",
    "save_total_limit": "logging.save_total_limit", "eval_steps": "logging.eval_steps",
    "output_dir": "logging.output_dir", "disable_tqdm": "logging.disable_tqdm",
    "max_length": "data.max_length", "packing": "data.packing", "packing_strategy": "data.packing_strategy",
    "padding_free": "data.padding_free", "completion_only_loss": "data.completion_only_loss",
    "assistant_only_loss": "data.assistant_only_loss", "shuffle_dataset": "data.shuffle_dataset",
    "dataset_text_field": "data.dataset_text_field", "dataset_num_proc": "data.dataset_num_proc",
    "chat_template_path": "data.chat_template_path", "truncation_mode": "data.truncation_mode",
}
SAME_MODEL = {"model_name_or_path": "model.model_name_or_path", "dtype": "model.dtype", "use_peft": "lora.use_peft",
              "lora_r": "lora.lora_r", "lora_alpha": "lora.lora_alpha", "lora_dropout": "lora.lora_dropout",
              "lora_target_modules": "lora.lora_target_modules"}
SAME_SCRIPT = {"dataset_name": "data.dataset_name", "dataset_train_split": "data.dataset_train_split",
               "dataset_test_split": "data.dataset_test_split"}


def _get(cfg, dotted):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_real_trl_config_maps_field_by_field(tmp_path, suffix):
    import yaml

    sft, model, script, values = _trl_dict(**SFT_KWARGS)
    path = tmp_path / f"trl{suffix}"
    path.write_text(json.dumps(values) if suffix == ".json" else yaml.safe_dump(values))
    cfg = load_config(path)  # validated too
    for objects, table in ((sft, SAME), (model, SAME_MODEL), (script, SAME_SCRIPT)):
        for trl_name, jsft_path in table.items():
            assert _get(cfg, jsft_path) == getattr(objects, trl_name), trl_name
    # the converted ones
    assert cfg.training.warmup_ratio == 0.1 and cfg.training.warmup_steps == 0  # warmup_steps < 1 is a ratio
    assert cfg.model.compute_dtype == "float32"  # bf16=False
    assert cfg.model.remat_policy == "none"  # gradient_checkpointing=False
    assert cfg.logging.report_to == ["jsonl", "tensorboard"]
    assert cfg.logging.resume_from_checkpoint is False  # TRL's None: a fresh start


def test_trl_defaults_apply_to_missing_fields(tmp_path):
    """An almost empty TRL file means TRL's defaults, not jsft's: 3 epochs, fp32 params + bf16 compute, no
    shuffling before packing, gradient checkpointing, PEFT's default LoRA targets for Llama."""
    path = tmp_path / "trl.yaml"
    path.write_text("model_name_or_path: ckpt\ndataset_name: data.jsonl\nuse_peft: true\n")
    cfg = load_config(path)
    assert cfg.training.num_train_epochs == 3.0 and cfg.training.learning_rate == 2e-5
    assert cfg.model.dtype == "float32" and cfg.model.compute_dtype == "bfloat16"
    assert cfg.data.shuffle_dataset is False and cfg.model.remat_policy == "full"
    assert cfg.lora.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.data.dataset_test_split is None and cfg.logging.eval_steps is None  # eval_strategy "no"
    assert cfg.logging.output_dir == "trainer_output" and cfg.data.max_length == 1024


def test_table_covers_every_trl_field_with_trl_defaults():
    """Every field of TRL's SFTConfig, ModelConfig, ScriptArguments, DatasetMixtureConfig is in the table, with
    TRL's own default (so 'equal to TRL's default' means what TRL says)."""
    for cls in _trl_classes():
        for f in dataclasses.fields(cls):
            assert f.name in T.TRL_FIELDS, f"{cls.__name__}.{f.name} is missing from jsft.trl_config.TRL_FIELDS"
            if f.default is not dataclasses.MISSING:
                default = getattr(f.default, "value", f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                continue
            assert T.TRL_FIELDS[f.name][0] == default, f"{f.name}: table {T.TRL_FIELDS[f.name][0]!r} vs TRL {default!r}"


def test_full_default_trl_dump_loads(tmp_path):
    _, _, _, values = _trl_dict()
    path = tmp_path / "trl.json"
    path.write_text(json.dumps(values))
    cfg = load_config(path)
    assert cfg.lora.use_peft is True and cfg.training.num_train_epochs == 3.0


@pytest.mark.parametrize("field_name, value, needle", [
    ("fp16", True, "fp16"),
    ("optim", "adamw_8bit", "training.optim"),
    ("report_to", ["comet_ml"], "comet_ml"),
    ("eval_strategy", "sometimes", "eval_strategy"),
    ("lora_target_parameters", ["experts.gate_up_proj"], "MoE"),
    ("lr_scheduler_kwargs", {"num_cycles": 2}, "lr_scheduler_kwargs"),
    ("logging_steps", 1.5, "logging_steps"),
    ("dtype", "auto", "dtype"),
    ("resume_from_checkpoint", "out/checkpoint-10", "resume_from_checkpoint"),
])
def test_unsupported_trl_values_are_refused_by_name(tmp_path, field_name, value, needle):
    path = tmp_path / "trl.json"
    path.write_text(json.dumps({"model_name_or_path": "ckpt", "dataset_name": "d.jsonl", field_name: value}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert field_name in str(err.value) and needle in str(err.value)


def test_trl_default_values_of_missing_knobs_are_accepted(tmp_path):
    path = tmp_path / "trl.json"
    fields = {"model_name_or_path": "ckpt", "dataset_name": "d.jsonl", "neftune_noise_alpha": None,
              "label_smoothing_factor": 0.0, "report_to": "none", "optim": "adamw_torch", "use_cpu": True,
              "torch_compile": True, "pad_to_multiple_of": None, "loss_type": "chunked_nll", "max_seq_length": 64}
    path.write_text(json.dumps(fields))
    cfg = load_config(path)
    assert cfg.training.loss_type == "nll" and cfg.data.max_length == 64 and cfg.logging.report_to == ["jsonl"]


def test_unknown_and_wrongly_typed_trl_fields_are_errors(tmp_path):
    path = tmp_path / "trl.json"
    path.write_text(json.dumps({"model_name_or_path": "ckpt", "learning_rat": 1e-4}))
    with pytest.raises(ConfigError, match=r"unknown TRL field 'learning_rat'.*learning_rate"):
        load_config(path)
    path.write_text(json.dumps({"model_name_or_path": "ckpt", "learning_rate": "fast"}))
    with pytest.raises(ConfigError, match=r"learning_rate.*expected float"):
        load_config(path)


def test_cli_prints_a_config_error_without_traceback_and_exits_2(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "trl.json"
    path.write_text('{"output_dir": "out", "max_seq_len": 512}')
    done = subprocess.run([sys.executable, "-m", "jsft.train", "--config", str(path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert "error (ConfigError)" in done.stderr and "max_seq_len" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("value, want", [("auto", None), (None, None), ("none", None), (64, 64), ("128", 128)])
def test_trl_pad_to_multiple_of_maps_to_step_length_buckets(tmp_path, value, want):
    path = tmp_path / "trl.json"
    path.write_text(json.dumps({"model_name_or_path": "ckpt", "dataset_name": "d.jsonl", "pad_to_multiple_of": value}))
    assert load_config(path).data.pad_to_multiple_of == want


def test_trl_yaml_exponent_floats_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 reads 2e-5 as a string; TRL's parser reads it as a float, and so does jsft."""
    path = tmp_path / "trl.yaml"
    path.write_text("model_name_or_path: ckpt\ndataset_name: d.jsonl\nlearning_rate: 2e-5\nadam_epsilon: 1e-8\n"
                    "output_dir: 1e5x\n")
    config = load_config(path)
    assert config.training.learning_rate == 2e-5 and config.training.adam_epsilon == 1e-8
    assert config.logging.output_dir == "1e5x"
    path.write_text("model_name_or_path: ckpt\npad_to_multiple_of: abc\n")
    with pytest.raises(ConfigError, match=r"pad_to_multiple_of='abc' -> data.pad_to_multiple_of: expected int"):
        load_config(path)


def test_trl_train_sampling_strategy_and_drop_last(tmp_path):
    path = tmp_path / "trl.json"
    base = {"model_name_or_path": "ckpt", "dataset_name": "d.jsonl"}
    path.write_text(json.dumps({**base, "train_sampling_strategy": "sequential"}))
    assert load_config(path).data.train_sampling_strategy == "sequential"
    path.write_text(json.dumps(base))
    assert load_config(path).data.train_sampling_strategy == "random" and load_config(path).data.shuffle_dataset is False
    path.write_text(json.dumps({**base, "train_sampling_strategy": "group_by_length"}))
    assert load_config(path).data.train_sampling_strategy == "group_by_length"  # TRL's default: no packing
    path.write_text(json.dumps({**base, "train_sampling_strategy": "shortest_first"}))
    with pytest.raises(ConfigError, match="train_sampling_strategy='shortest_first'.*random, sequential"):
        load_config(path)
    path.write_text(json.dumps({**base, "dataloader_drop_last": True}))
    with pytest.raises(ConfigError, match="dataloader_drop_last"):
        load_config(path)


def test_save_strategy(tmp_path):
    from jsft.config import LoggingConfig
    from jsft.train import should_save

    every_3 = LoggingConfig(save_steps=3)
    assert [s for s in range(1, 10) if should_save(every_3, s, epoch_steps=4)] == [3, 6, 9]
    assert [s for s in range(1, 10) if should_save(LoggingConfig(save_strategy="epoch"), s, 4)] == [4, 8]
    assert not any(should_save(LoggingConfig(save_strategy="no"), s, 4) for s in range(1, 10))
    path = tmp_path / "trl.json"
    path.write_text(json.dumps({"model_name_or_path": "ckpt", "dataset_name": "d.jsonl", "save_strategy": "no"}))
    assert load_config(path).logging.save_strategy == "no"
    path.write_text(json.dumps({"model_name_or_path": "ckpt", "dataset_name": "d.jsonl", "save_strategy": "best"}))
    with pytest.raises(ConfigError, match="save_strategy.*selects by the eval metric"):
        load_config(path)  # "best" needs evaluation
    path.write_text(json.dumps({"model_name_or_path": "ckpt", "dataset_name": "d.jsonl", "save_strategy": "bestest"}))
    with pytest.raises(ConfigError, match="save_strategy='bestest'.*steps, epoch, best, no"):
        load_config(path)


# ----------------------------------------------------------------------------------------------- TRL flat flags


def test_trl_flags_parse_as_trl_sft_takes_them():
    from jsft.trl_config import parse_flags

    flags = parse_flags(["--learning_rate", "1e-4", "--max_length=4096", "--packing", "--no_shuffle_dataset",
                         "--lora_target_modules", "q_proj", "v_proj", "--output_dir", "out/run1"])
    assert flags == {"learning_rate": 1e-4, "max_length": 4096, "packing": True, "shuffle_dataset": False,
                     "lora_target_modules": ["q_proj", "v_proj"], "output_dir": "out/run1"}
    with pytest.raises(ConfigError, match="--learning_rate needs a value"):
        parse_flags(["--learning_rate", "--packing"])
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        parse_flags(["stray"])


def test_trl_flags_override_a_trl_file_and_stand_alone(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text("model_name_or_path: ckpt\ndataset_name: d.jsonl\nlearning_rate: 2.0e-5\nmax_length: 128\n")
    cfg = load_config(path, [], {"learning_rate": 1e-4, "packing": False})
    assert cfg.training.learning_rate == 1e-4 and cfg.data.max_length == 128 and cfg.data.packing is False
    alone = load_config(None, [], {"model_name_or_path": "ckpt", "dataset_name": "d.jsonl", "use_peft": True})
    assert alone.lora.use_peft and alone.training.num_train_epochs == 3.0  # TRL's defaults for the rest


def test_trl_flags_on_a_jsft_config_change_only_what_they_name(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("from jsft.config import SFTConfig\nconfig = SFTConfig()\n"
                    "config.model.model_name_or_path = 'ckpt'\nconfig.data.dataset_name = 'd.jsonl'\n"
                    "config.training.num_train_epochs = 1.0\nconfig.training.warmup_steps = 7\n")
    cfg = load_config(path, ["training.seed=3"], {"learning_rate": 1e-4, "max_length": 256, "warmup_ratio": 0.1})
    assert cfg.training.learning_rate == 1e-4 and cfg.data.max_length == 256 and cfg.training.seed == 3
    assert cfg.training.num_train_epochs == 1.0  # not TRL's default 3: the flags did not name it
    assert cfg.training.warmup_ratio == 0.1


def test_every_refusal_of_a_trl_config_is_reported_at_once(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"model_name_or_path": "ckpt", "dataset_name": "d.jsonl", "fp16": True,
                                "use_liger_kernel": True, "report_to": ["wandb_typo"], "learnig_rate": 1e-4}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "problems, fix them all" in message
    for needle in ("fp16", "use_liger_kernel", "learnig_rate", "did you mean learning_rate"):
        assert needle in message, needle


def test_the_jsft_command_runs_each_module_and_says_its_usage(capsys):
    from jsft import command

    with pytest.raises(SystemExit) as exit_:
        command.main(["fly"])
    assert exit_.value.code == 2 and "unknown command 'fly'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        command.main(["train", "--help"])
    assert exit_.value.code == 0 and "--learning_rate 1e-4" in capsys.readouterr().out


def test_best_model_settings_follow_transformers_rules(tmp_path):
    from jsft.best import BestCheckpoint

    path = tmp_path / "trl.json"
    base = {"model_name_or_path": "ckpt", "dataset_name": "d.jsonl", "dataset_test_split": "e.jsonl",
            "eval_strategy": "epoch", "save_strategy": "epoch", "load_best_model_at_end": True,
            "eval_on_start": True, "logging_first_step": True, "save_steps": 0.25}
    path.write_text(json.dumps(base))
    cfg = load_config(path)
    lg = cfg.logging
    assert lg.eval_strategy == "epoch" and lg.load_best_model_at_end and lg.eval_on_start and lg.save_steps == 0.25
    best = BestCheckpoint.from_config(lg)
    assert best.metric == "eval_loss" and best.greater is False
    assert best.is_better({"eval_loss": 2.0}) and (best.record(4, {"eval_loss": 2.0}) or True)
    assert not best.is_better({"eval_loss": 2.5}) and best.is_better({"eval_loss": 1.5})
    lg.metric_for_best_model = "mean_token_accuracy"
    assert BestCheckpoint.from_config(lg).greater is True
    path.write_text(json.dumps({**base, "save_strategy": "steps"}))
    with pytest.raises(ConfigError, match="save_strategy='steps' and eval_strategy='epoch' must match"):
        load_config(path)
    path.write_text(json.dumps({**base, "eval_strategy": "no", "save_strategy": "best"}))
    with pytest.raises(ConfigError, match="selects by the eval metric"):
        load_config(path)


def test_silently_ignored_trl_fields_are_honoured_or_refused(tmp_path):
    """use_cpu maps; tf32, logging_nan_inf_filter, accelerator_config, model_init_kwargs, dataset_kwargs and
    eval_packing accept TRL's defaults (and equivalent spellings) and refuse what would change the run."""
    import trl

    from jsft.trainer import _jsft_config

    args = trl.SFTConfig(output_dir=str(tmp_path / "o"), use_cpu=True, bf16=False, report_to="none")
    cfg = _jsft_config(args)  # every field of a real trl.SFTConfig dump, accelerator_config as its defaults dict
    assert cfg.sharding.use_cpu is True
    path = tmp_path / "trl.json"
    base = {"model_name_or_path": "ckpt", "dataset_name": "d.jsonl"}
    for fields in ({"model_init_kwargs": {}}, {"dataset_kwargs": {}}, {"eval_packing": True, "packing": True},
                   {"tf32": True}, {"accelerator_config": {}}):
        path.write_text(json.dumps({**base, **fields}))
        load_config(path)
    for fields, needle in (({"tf32": False}, "float32 matmul"), ({"logging_nan_inf_filter": False}, "non-finite"),
                           ({"accelerator_config": {"split_batches": True}}, "change what a batch is"),
                           ({"eval_packing": False, "packing": True}, "eval_packing"),
                           ({"model_init_kwargs": {"dtype": "bfloat16"}}, "model.dtype")):
        path.write_text(json.dumps({**base, **fields}))
        with pytest.raises(ConfigError, match=needle):
            load_config(path)


def test_an_unquoted_yaml_no_gets_a_hint(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text("model_name_or_path: ckpt\ndataset_name: d.jsonl\neval_strategy: no\n")
    with pytest.raises(ConfigError, match="eval_strategy: False: YAML reads an unquoted no"):
        load_config(path)
    path.write_text("model_name_or_path: ckpt\ndataset_name: d.jsonl\neval_strategy: 'no'\n")
    assert load_config(path).logging.eval_strategy == "no"
