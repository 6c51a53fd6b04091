"""The Python API: SFTTrainer(model, args, train_dataset, ...).train() / evaluate() / save_model(), as TRL's."""

import numpy as np
import pytest

from jsft import SFTConfig, SFTTrainer, TrainerCallback, fixtures
from jsft.config import ConfigError
from train_configs import tiny_config


def _rows(n, seed):
    return fixtures.make_rows("messages", n, seed=seed)


def _config(tmp_path, tokenizer_dir, **training):
    config = tiny_config(tokenizer_dir, "unused", tmp_path / "run",
                         data={"packing": False, "padding_free": False, "shuffle_dataset": False},
                         training={"max_steps": 4, **training}, logging={"save_strategy": "no"})
    config.model.init_from_scratch = None
    config.data.dataset_name = None
    return config


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step, self.seen, self.ended, self.began = step, [], None, None

    def on_train_begin(self, config, model, tokenizer):
        self.began = (len(self.seen), config.lora.use_peft, type(model).__name__, len(tokenizer) > 0)

    def on_log(self, step, logs):
        self.seen.append((step, sorted(k for k in logs if k in ("loss", "eval_loss"))))
        return step >= self.step

    def on_train_end(self, summary):
        self.ended = summary["steps"]


def test_lora_from_in_memory_rows_and_tokenizer_trains_evaluates_and_saves_a_peft_adapter(
        tokenizer, checkpoint_dir, tmp_path):
    """peft.LoraConfig, a tokenizer object, lists of rows, a callback that stops at step 3; the adapter
    trainer.save_model(dir) writes loads in peft onto the base and gives jsft's logits."""
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    stopper = StopAfter(3)
    trainer = SFTTrainer(model=str(checkpoint_dir), args=_config(tmp_path, None, learning_rate=3e-2),
                         train_dataset=_rows(16, 1), eval_dataset=_rows(8, 2), processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj"]),
                         callbacks=[stopper])
    before = trainer.evaluate()["eval_loss"]
    output = trainer.train()
    assert output.global_step == 3 and stopper.ended == 3  # stopped by the callback, then ended normally
    assert stopper.began == (0, True, "Llama", True)  # before any record: the run's config, model and tokenizer
    assert [s for s, _ in stopper.seen if _ == ["loss"]] == [1, 2, 3]
    after = trainer.evaluate()["eval_loss"]
    assert after < before, (before, after)
    adapter = trainer.save_model(tmp_path / "final")
    assert (tmp_path / "final" / "adapter_config.json").exists() and adapter == tmp_path / "final"

    base = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "final"))
    ids = torch.tensor([tokenizer("hello there")["input_ids"]])
    model = trainer.summary["model"]
    import jax.numpy as jnp

    jsft_logits = np.asarray(model(jnp.asarray(ids.numpy(), jnp.int32), jnp.arange(ids.shape[1])[None],
                                   jnp.ones(ids.shape, jnp.int32)))
    np.testing.assert_allclose(peft_model(ids).logits.detach().numpy(), jsft_logits, atol=1e-4)


def test_a_trl_sft_config_object_and_a_formatting_func(tokenizer_dir, checkpoint_dir, tmp_path):
    """args=trl.SFTConfig(...) read through the TRL table; formatting_func makes the text of each row."""
    import trl

    args = trl.SFTConfig(output_dir=str(tmp_path / "trl_run"), max_steps=3, learning_rate=1e-2,
                         per_device_train_batch_size=1, lr_scheduler_type="constant", report_to="none",
                         logging_steps=1, save_strategy="no", max_length=64, packing=False, bf16=False,
                         use_cpu=True, dataloader_pin_memory=False)
    rows = fixtures.make_rows("prompt_completion", 16, seed=3)
    trainer = SFTTrainer(model=str(checkpoint_dir), args=args, train_dataset=rows,
                         processing_class=__import__("transformers").AutoTokenizer.from_pretrained(tokenizer_dir),
                         formatting_func=lambda row: f"Q: {row['prompt']} A: {row['completion']}")
    assert trainer.args.data.dataset_text_field == "text" and trainer.args.training.max_steps == 3
    output = trainer.train()
    assert output.global_step == 3 and np.isfinite(output.training_loss)


def test_bad_arguments_are_clear_errors(checkpoint_dir, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ConfigError, match="needs train_dataset"):
        SFTTrainer(model=str(checkpoint_dir), args=SFTConfig())
    with pytest.raises(ConfigError, match="bias='all' is not supported"):
        SFTTrainer(model=str(checkpoint_dir), args=SFTConfig(), train_dataset=_rows(2, 0),
                   peft_config=LoraConfig(bias="all"))
    with pytest.raises(ConfigError, match="formatting_func needs the dataset"):
        SFTTrainer(model=str(checkpoint_dir), args=SFTConfig(), train_dataset="rows.jsonl",
                   formatting_func=lambda row: row["text"])
    with pytest.raises(ConfigError, match="args: expected"):
        SFTTrainer(model=str(checkpoint_dir), args=42, train_dataset=_rows(2, 0))
