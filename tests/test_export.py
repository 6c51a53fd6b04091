"""HF exports load unchanged: the full model in transformers (jsft's logits), the adapter in peft."""

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from jsft import build, checkpoint, export, sharding, train
from jsft.config import ConfigError
from jsft.optim import trainable_filter
from train_configs import tiny_config

IDS = np.array([[5, 17, 42, 99, 7, 3, 250, 11, 64, 2]], np.int32)


def jsft_logits(model):
    model.eval()  # LoRA dropout off, as in peft's eval mode
    positions = np.arange(IDS.shape[1], dtype=np.int32)[None]
    return np.asarray(model(IDS, positions, np.ones_like(IDS)))


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


def _perturb(model, filt, seed):
    """Move the params matched by filt away from their init (LoRA B starts at zero: an adapter that does nothing)."""
    state = nnx.state(model, filt)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), state))


def _model(config):
    mesh = sharding.create_mesh(config.sharding)
    tokenizer, _ = build.build_tokenizer(config)
    model, _ = build.build_model(config, tokenizer, mesh)
    return model, tokenizer


def test_full_export_from_a_checkpoint_loads_in_transformers(tokenizer_dir, checkpoint_dir, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_config(tokenizer_dir, data_dir / "text.jsonl", tmp_path / "run")
    config.model.init_from_scratch, config.model.model_name_or_path = None, str(checkpoint_dir)
    model, _ = _model(config)
    _perturb(model, nnx.Param, 0)  # "trained"
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    manager = checkpoint.make_manager(tmp_path / "run", async_save=False)
    checkpoint.save(manager, 7, model, optimizer, {"position": 0})
    manager.close()

    written = export.export_checkpoint(config, step=None, formats=["full"])  # python -m jsft.export --format full
    hf = AutoModelForCausalLM.from_pretrained(written["full"], dtype=torch.float32)
    np.testing.assert_allclose(torch_logits(hf), jsft_logits(model), atol=1e-4)
    assert (written["full"] / "tokenizer_config.json").exists()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_export_loads_in_peft_and_merged_in_transformers(tokenizer_dir, checkpoint_dir, data_dir, tmp_path,
                                                                 use_rslora):
    """use_rslora: PEFT's rank-stabilized scale alpha / sqrt(r) (4 here, against alpha / r = 2)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = tiny_config(tokenizer_dir, data_dir / "text.jsonl", tmp_path / "lora",
                         lora={"use_peft": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": use_rslora})
    config.model.init_from_scratch, config.model.model_name_or_path = None, str(checkpoint_dir)
    model, tokenizer = _model(config)
    _perturb(model, nnx.LoRAParam, 1)
    written = export.export(model, tokenizer, config, formats=["adapter", "merged"])
    want = jsft_logits(model)

    base = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    assert np.abs(torch_logits(base) - want).max() > 1e-3  # the adapter changes the model
    peft_model = PeftModel.from_pretrained(base, written["adapter"])
    np.testing.assert_allclose(torch_logits(peft_model), want, atol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(written["merged"], dtype=torch.float32)
    np.testing.assert_allclose(torch_logits(merged), want, atol=1e-4)


def test_auto_format_and_refusals(tokenizer_dir, data_dir, tmp_path):
    config = tiny_config(tokenizer_dir, data_dir / "text.jsonl", tmp_path)
    assert export.resolve_formats(config) == ["full"]
    config.lora.use_peft = True
    assert export.resolve_formats(config) == ["adapter"]
    with pytest.raises(ConfigError, match="choose from"):
        export.resolve_formats(config, ["gguf"])


def test_lora_adapter_carries_the_embeddings_a_cloned_template_trained(tokenizer_dir, checkpoint_dir, data_dir,
                                                                         tmp_path):
    """A cloned chat template adds tokens: the vocabulary grows and the whole embedding and head train with LoRA
    (TRL's way); the adapter carries them, so PEFT on the resized base reproduces jsft's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoTokenizer.from_pretrained(tokenizer_dir)
    source.add_special_tokens({"additional_special_tokens": ["<|tool_call|>", "<|tool_result|>"]})
    source.save_pretrained(tmp_path / "source")
    config = tiny_config(tokenizer_dir, data_dir / "messages.jsonl", tmp_path / "run",
                         data={"chat_template_path": str(tmp_path / "source")},
                         lora={"use_peft": True, "lora_r": 4, "lora_alpha": 8})
    config.model.init_from_scratch, config.model.model_name_or_path = None, str(checkpoint_dir)
    mesh = sharding.create_mesh(config.sharding)
    tokenizer, added = build.build_tokenizer(config)
    model, grew = build.build_model(config, tokenizer, mesh)
    assert len(added) == 2 and grew
    _perturb(model, trainable_filter(lora=True, new_token_rows=True), 2)  # LoRA params and the whole embedding / head "trained"
    written = export.export(model, tokenizer, config, formats=["adapter"], trained_embeddings=True)

    saved = AutoTokenizer.from_pretrained(written["adapter"])  # padded with dummy tokens to the grown vocabulary
    assert len(saved) == model.cfg.vocab_size > len(tokenizer) and saved.eos_token == tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(saved))  # PEFT's recipe, as for TRL's adapters
    peft_model = PeftModel.from_pretrained(base, written["adapter"])
    np.testing.assert_allclose(torch_logits(peft_model), jsft_logits(model), atol=1e-4)


@pytest.mark.parametrize("how", ["cloned_template", "eos_token"])
def test_an_export_stops_generating_at_the_eos_the_run_trained(tokenizer_dir, checkpoint_dir, data_dir, tmp_path,
                                                               how):
    """A run that changes the tokenizer's EOS (a cloned template with its own EOS, or data.eos_token) exports a
    config.json and generation_config.json with that EOS, TRL's rule: transformers' generate() stops there."""
    import json

    from transformers import AutoTokenizer, GenerationConfig

    data = {"eos_token": "<|im_end|>"}
    if how == "cloned_template":
        source = AutoTokenizer.from_pretrained(tokenizer_dir)
        source.add_special_tokens({"eos_token": "<|eot_id|>"})
        source.save_pretrained(tmp_path / "source")
        data = {"chat_template_path": str(tmp_path / "source")}
    config = tiny_config(tokenizer_dir, data_dir / "messages.jsonl", tmp_path / "run", data=data)
    config.model.init_from_scratch, config.model.model_name_or_path = None, str(checkpoint_dir)
    base_eos = json.loads((checkpoint_dir / "config.json").read_text())["eos_token_id"]
    model, tokenizer = _model(config)
    assert tokenizer.eos_token_id != base_eos
    written = export.export(model, tokenizer, config, formats=["full"])["full"]
    assert json.loads((written / "config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    generation = GenerationConfig.from_pretrained(written).eos_token_id
    assert generation[0] == tokenizer.eos_token_id and base_eos in generation
    assert AutoTokenizer.from_pretrained(written).eos_token_id == tokenizer.eos_token_id
