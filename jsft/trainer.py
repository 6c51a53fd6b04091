"""The Python API, in TRL's shape:

    from jsft import SFTConfig, SFTTrainer
    trainer = SFTTrainer(model="path/to/Llama-3.2-1B", args=config, train_dataset=dataset, eval_dataset=held_out,
                         processing_class=tokenizer, formatting_func=None, peft_config=None, callbacks=[...])
    trainer.train(); trainer.evaluate(); trainer.save_model("out/final")

`args` is a jsft SFTConfig, a TRL `trl.SFTConfig` (read field by field through jsft's TRL table, refusing what jsft
cannot honour) or a dict of TRL fields. `model` is an HF checkpoint directory (or hub name), or a loaded
transformers model; `processing_class` a tokenizer; datasets are `datasets.Dataset`s, lists of row dicts or paths.
jsft's data path reads files, so in-memory objects are written once under `<output_dir>/inputs/` (JSON lines,
safetensors, tokenizer files) and the run reads them from there: the same code path, token cache and checkpoints
as `python -m jsft.train`. For a big model pass its directory, not the loaded model (it would be written again).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

from jsft.config import ConfigError, SFTConfig
from jsft.validate import validate


class TrainOutput(NamedTuple):  # transformers.trainer_utils.TrainOutput's fields
    global_step: int
    training_loss: float
    metrics: dict


class SFTTrainer:
    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 formatting_func=None, peft_config=None, callbacks=None):
        self.args = _jsft_config(args)
        self.inputs = Path(self.args.logging.output_dir) / "inputs"
        self.callbacks = list(callbacks or [])
        self.summary = None
        m, d = self.args.model, self.args.data
        m.model_name_or_path = _model_path(model, self.inputs / "model")
        if processing_class is not None:
            m.tokenizer_name_or_path = _saved(processing_class, self.inputs / "tokenizer", "processing_class")
        if peft_config is not None:
            _apply_peft_config(self.args, peft_config)
        if train_dataset is None and not d.dataset_name and not d.datasets:
            raise ConfigError("SFTTrainer needs train_dataset (a datasets.Dataset, a list of rows or a path), or "
                              "args.data.dataset_name (or a mixture, args.data.datasets)")
        if train_dataset is not None:
            d.datasets, d.test_split_size = [], None  # train_dataset is the rows (as TRL's SFTTrainer's argument)
            d.dataset_name = _dataset_path(train_dataset, self.inputs / "train.jsonl", formatting_func)
            d.dataset_train_split = "train"
        if eval_dataset is not None:
            d.dataset_test_split = _dataset_path(eval_dataset, self.inputs / "eval.jsonl", formatting_func)
        if formatting_func is not None:
            d.dataset_text_field = "text"
        validate(self.args)

    def train(self) -> TrainOutput:
        """The run `python -m jsft.train` makes (jsft.train.run, the one entry of both), of the config these
        arguments resolved to, with the callbacks."""
        from jsft import train

        self.summary = train.run(self.args, callbacks=self.callbacks)
        metrics = dict(self.summary["last_metrics"])
        metrics.update(self.summary.get("eval", {}))
        return TrainOutput(self.summary["steps"], float(metrics.get("loss", float("nan"))), metrics)

    def evaluate(self) -> dict:
        """eval_loss, eval_mean_token_accuracy, eval_entropy on eval_dataset: of the trained model after train()
        (computed at the run's end), of the model as loaded before it."""
        if self.args.data.dataset_test_split is None:
            raise ConfigError("evaluate() needs eval_dataset (or args.data.dataset_test_split)")
        if self.summary is not None:
            return dict(self.summary["eval"])
        from jsft import evaluation

        return evaluation.evaluate_only(self.args)

    def save_model(self, output_dir: str | None = None) -> Path:
        """The trained model into output_dir (default: args.logging.output_dir/export or /adapter), as TRL's
        save_model: the full model for full fine-tuning, the PEFT adapter for LoRA, with the tokenizer."""
        if self.summary is None:
            raise ConfigError("save_model() saves the trained model: call train() first")
        from jsft.export import export

        written = export(self.summary["model"], self.summary["tokenizer"], self.args, formats=["auto"],
                         out_dir=output_dir, trained_embeddings=self.summary["trained_embeddings"],
                         into_out_dir=output_dir is not None)
        return next(iter(written.values()))


def _jsft_config(args) -> SFTConfig:
    if args is None:
        return SFTConfig()
    if isinstance(args, SFTConfig):
        return copy.deepcopy(args)
    from jsft.trl_config import from_trl_dict

    if isinstance(args, dict):
        return from_trl_dict(args)
    if hasattr(args, "to_dict"):  # trl.SFTConfig (transformers TrainingArguments)
        return from_trl_dict({k: v for k, v in args.to_dict().items() if not k.startswith("_")})
    raise ConfigError(f"args: expected a jsft SFTConfig, a trl.SFTConfig or a dict of TRL fields, got "
                      f"{type(args).__name__}")


def _saved(obj, directory: Path, what: str) -> str:
    if not hasattr(obj, "save_pretrained"):
        raise ConfigError(f"{what}: expected a path or an object with save_pretrained (transformers), got "
                          f"{type(obj).__name__}")
    obj.save_pretrained(directory)
    return str(directory)


def _model_path(model, directory: Path) -> str:
    if isinstance(model, (str, Path)):
        return str(model)
    return _saved(model, directory, "model")


def _dataset_path(dataset, path: Path, formatting_func) -> str:
    """A path stays a path (with formatting_func: refused, the function needs the rows); a datasets.Dataset or
    a list of rows is written as JSON lines (only formatting_func's text when there is one)."""
    import datasets

    if isinstance(dataset, (str, Path)):
        if formatting_func is not None:
            raise ConfigError("formatting_func needs the dataset as a datasets.Dataset or a list of rows, not a path")
        return str(dataset)
    if isinstance(dataset, list):
        dataset = datasets.Dataset.from_list(dataset)
    if isinstance(dataset, datasets.DatasetDict):
        raise ConfigError("train_dataset/eval_dataset: pass one split (dataset['train']), not a DatasetDict")
    if not isinstance(dataset, datasets.Dataset):
        raise ConfigError(f"a dataset must be a datasets.Dataset, a list of row dicts or a path, got "
                          f"{type(dataset).__name__}")
    if formatting_func is not None:  # TRL: formatting_func(example) -> the example's text
        dataset = dataset.map(lambda row: {"text": formatting_func(row)}, remove_columns=dataset.column_names)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_json(str(path), lines=True, force_ascii=False)
    return str(path)


def _apply_peft_config(config: SFTConfig, peft_config) -> None:
    """A peft.LoraConfig -> lora.*: r, lora_alpha, lora_dropout, target_modules (None: PEFT's Llama default),
    use_rslora, use_dora, modules_to_save."""
    from jsft.trl_config import PEFT_DEFAULT_TARGETS

    if type(peft_config).__name__ != "LoraConfig":
        raise ConfigError(f"peft_config: jsft trains LoRA adapters (peft.LoraConfig), got {type(peft_config).__name__}")
    unsupported = {"bias": "none", "lora_bias": False, "exclude_modules": None, "layers_to_transform": None,
                   "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None, "trainable_token_indices": None,
                   "init_lora_weights": True, "use_qalora": False}
    refused = [f"{k}={getattr(peft_config, k)!r}" for k, v in unsupported.items() if getattr(peft_config, k, v) != v]
    if refused:
        raise ConfigError(f"peft_config: {', '.join(refused)} is not supported by jsft (plain LoRA: r, lora_alpha, "
                          "lora_dropout, target_modules, use_rslora, use_dora, modules_to_save)")
    lora = config.lora
    lora.use_peft, lora.lora_r, lora.lora_alpha = True, int(peft_config.r), int(peft_config.lora_alpha)
    lora.lora_dropout, lora.use_rslora = float(peft_config.lora_dropout), bool(peft_config.use_rslora)
    lora.use_dora = bool(peft_config.use_dora)
    lora.lora_modules_to_save = list(peft_config.modules_to_save) if peft_config.modules_to_save else None
    targets = peft_config.target_modules
    lora.lora_target_modules = (PEFT_DEFAULT_TARGETS if targets is None else
                                targets if isinstance(targets, str) else sorted(targets))
