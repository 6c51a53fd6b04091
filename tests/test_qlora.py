"""QLoRA end to end: a quantized frozen base loaded tensor by tensor (also sharded on 8 CPU devices), trained through
`python -m jsft.train` from a TRL YAML, checkpoints without the base, PEFT adapter and merged bf16 exports."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jsft.config_files import load as load_config
from jsft import build, config as C
from jsft import export, fixtures, hf, progress, sharding, train
from jsft.model import quant
from jsft.model.lora import apply_lora
from jsft.validate import quantization

ROOT = Path(__file__).parent.parent
IDS = np.array([[5, 17, 42, 99, 7, 3, 250, 11, 64, 2]], np.int32)
POS = np.arange(IDS.shape[1], dtype=np.int32)[None]
PROJECTIONS = 7  # q k v o gate up down, each one kernel stacked over the 2 layers


def logits(model):
    model.eval()
    return np.asarray(model(IDS, POS, np.ones_like(IDS)))


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("quant_type, nested, tolerance", [("nf4", True, 0.15), ("fp4", False, 0.2),
                                                           ("int8", False, 0.02)])
def test_quantized_base_keeps_embeddings_head_norms_and_stays_close(checkpoint_dir, quant_type, nested, tolerance):
    dense, _ = hf.load_model(checkpoint_dir, dtype="float32")
    model, _ = hf.load_model(checkpoint_dir, dtype="float32",
                             quantization={"quant_type": quant_type, "nested": nested})
    kernels = quant.quantized_kernels(model)
    assert len(kernels) == PROJECTIONS and all(k.quant_type == quant_type for k in kernels.values())
    params = hf.base_params(model)
    assert {"embed_tokens.embedding", "lm_head.kernel", "norm.scale", "layers.input_layernorm.scale"} <= set(params)
    assert not any(p.endswith("_proj.kernel") for p in params)  # every projection's kernel is quantized
    by_dtype = quant.bytes_by_dtype(model)
    dense_bytes = quant.bytes_by_dtype(dense)["float32"]
    assert set(by_dtype) == {"float32", "int8" if quant_type == "int8" else "uint8"}
    assert sum(by_dtype.values()) < 0.6 * dense_bytes
    want, got = logits(dense), logits(model)
    assert 0 < np.abs(got - want).max() < tolerance * np.abs(want).max()


def test_stacked_quantized_load_is_each_layer_quantized_and_exports_one_layer_at_a_time(checkpoint_dir,
                                                                                       monkeypatch):
    """One stacked QuantizedKernel per projection: slice j of every array (codes, nested scales) is layer j's HF
    weight quantized on its own; merged_params dequantizes layer j only, equal to slice j of the whole kernel."""
    from safetensors.numpy import load_file

    from jsft.model.lora import merged_params

    tensors = {}
    for f in Path(checkpoint_dir).glob("*.safetensors"):
        tensors.update(load_file(f))
    model, cfg = hf.load_model(checkpoint_dir, dtype="float32", quantization={"quant_type": "nf4", "nested": True})
    kernel = quant.quantized_kernels(model)["layers.mlp.down_proj.kernel"]
    assert kernel.shape == (cfg.num_layers, cfg.intermediate_size, cfg.hidden_size)
    for key, value in kernel.arrays().items():
        layers = [quant.quantize(tensors[f"model.layers.{j}.mlp.down_proj.weight"], "nf4", True)[key]
                  for j in range(cfg.num_layers)]
        np.testing.assert_array_equal(np.asarray(value), np.stack(layers), err_msg=key)
    values = merged_params(apply_lora(model, r=2, alpha=4, dropout=0.0))
    whole = np.asarray(kernel.dequantize())
    dequantize, seen = quant.dequantize, []
    monkeypatch.setattr(quant, "dequantize", lambda arrays, *a: seen.append(arrays["codes"].shape) or
                        dequantize(arrays, *a))
    for j in range(cfg.num_layers):
        one = np.asarray(values[f"layers.{j}.mlp.down_proj.kernel"]())
        assert one.shape == (cfg.intermediate_size, cfg.hidden_size)
        np.testing.assert_array_equal(one, whole[j])  # lora_b is zero: the merge adds nothing
    assert seen == [(cfg.hidden_size, cfg.intermediate_size // 2)] * cfg.num_layers  # one layer's codes each time


def test_sharded_quantized_loading_on_8_devices(checkpoint_dir):
    """Each quantized array is placed on the mesh by the logical axes of its original (HF order); values equal the
    unsharded load."""
    assert jax.device_count() == 8
    mesh = sharding.create_mesh(C.ShardingConfig(mesh_shape={"data": 1, "fsdp": 4, "tensor": 2}))
    q = {"quant_type": "nf4", "nested": True}
    with pytest.warns(UserWarning, match="not divisible"):  # [out, in/64] = [.., 1] scales: that dim replicated
        model, _ = hf.load_model(checkpoint_dir, dtype="float32", quantization=q,
                                 shardings=build._variable_sharding(mesh))
    plain, _ = hf.load_model(checkpoint_dir, dtype="float32", quantization=q)
    # kernel [2, 64, 128] ("layers", "embed", "mlp") -> codes [2, 128, 32] ("layers", "mlp", "embed")
    up = model.layers.mlp.up_proj.kernel
    assert up.codes.shape == (2, 128, 32)
    assert up.codes.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    assert len(up.codes.get_value().addressable_shards[0].data.reshape(-1)) == 2 * 128 * 32 // 8
    down = model.layers.mlp.down_proj.kernel  # [2, 128, 64] -> absmax codes [2, 64, 2] ("layers", "embed", "mlp")
    assert down.absmax_codes.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert down.offset.shape == (2,) and down.absmax2.shape[0] == 2  # nested scales: one set per layer
    for path, kernel in quant.quantized_kernels(plain).items():
        sharded = quant.quantized_kernels(model)[path]
        for key, value in kernel.arrays().items():
            np.testing.assert_array_equal(np.asarray(sharded.arrays()[key]), np.asarray(value), err_msg=path)
    with jax.set_mesh(mesh):
        np.testing.assert_allclose(logits(model), logits(plain), rtol=1e-5, atol=1e-5)


def test_quantization_settings_from_trl_and_their_refusals(tmp_path):
    path = tmp_path / "trl.yaml"
    base = "model_name_or_path: ckpt\ndataset_name: d.jsonl\n"
    path.write_text(base + "use_peft: true\nload_in_4bit: true\nbnb_4bit_quant_type: fp4\nuse_bnb_nested_quant: true\n"
                    "bnb_4bit_quant_storage: bfloat16\n")
    cfg = load_config(path)
    m = cfg.model
    assert (m.load_in_4bit, m.bnb_4bit_quant_type, m.use_bnb_nested_quant) == (True, "fp4", True)
    assert quantization(cfg) == {"quant_type": "fp4", "nested": True}
    path.write_text(base + "use_peft: true\nload_in_8bit: true\n")
    assert quantization(load_config(path)) == {"quant_type": "int8", "nested": False}
    for text, needle in (("load_in_4bit: true\n", "needs lora.use_peft=True"),
                         ("use_peft: true\nload_in_4bit: true\nload_in_8bit: true\n", "choose one"),
                         ("use_peft: true\nload_in_4bit: true\nbnb_4bit_quant_type: int4\n", "nf4, fp4")):
        path.write_text(base + text)
        with pytest.raises(C.ConfigError, match=needle):
            load_config(path)


TRL_YAML = """\
model_name_or_path: {model}
dataset_name: {data}
output_dir: {out}
use_peft: true
lora_r: 8
lora_alpha: 16
lora_dropout: 0.0
lora_target_modules: all-linear
{quant}max_length: 64
packing: true
padding_free: true
learning_rate: 0.01
lr_scheduler_type: constant
max_steps: 24
per_device_train_batch_size: 1
logging_steps: 1
save_steps: 12
report_to: none
bf16: false
gradient_checkpointing: true
seed: 0
"""
QLORA = "load_in_4bit: true\nbnb_4bit_quant_type: nf4\nuse_bnb_nested_quant: true\n"


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, checkpoint_dir, tokenizer_dir):
    """The fixture checkpoint with its tokenizer, 8 rows (to learn by heart); a QLoRA run through
    `python -m jsft.train`."""
    root = tmp_path_factory.mktemp("qlora")
    model = root / "model"
    shutil.copytree(checkpoint_dir, model)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, model / f.name)
    data = fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 8, seed=3), root / "pc.jsonl")
    yaml = root / "qlora.yaml"
    yaml.write_text(TRL_YAML.format(model=model, data=data, out=root / "qlora", quant=QLORA))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "jsft.train", "--config", str(yaml)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "model": model, "data": data, "yaml": yaml, "out": root / "qlora", "stdout": done.stdout}


def test_qlora_trains_from_a_trl_yaml_like_lora(qlora_run):
    root = qlora_run["root"]
    assert "plan: frozen base float32" in qlora_run["stdout"] and "uint8" in qlora_run["stdout"]
    assert "projections quantized: nf4 + nested" in qlora_run["stdout"]
    qlora = [r["loss"] for r in progress.read_metrics(qlora_run["out"]) if "loss" in r]
    lora_yaml = root / "lora.yaml"
    lora_yaml.write_text(TRL_YAML.format(model=qlora_run["model"], data=qlora_run["data"], out=root / "lora", quant=""))
    train.run(load_config(lora_yaml))
    lora = [r["loss"] for r in progress.read_metrics(root / "lora") if "loss" in r]
    curves = f"qlora {np.round(qlora, 3).tolist()} lora {np.round(lora, 3).tolist()}"
    assert len(qlora) == len(lora) == 24, curves
    assert qlora[0] == pytest.approx(lora[0], rel=0.02), curves  # the quantized base starts where the base does
    assert np.mean(qlora[-4:]) < 0.92 * np.mean(qlora[:4]), curves  # it learns ...
    assert np.max(np.abs(np.subtract(qlora, lora))) < 0.05 * lora[0], curves  # ... step by step as LoRA does


def test_qlora_checkpoint_holds_only_the_adapters(qlora_run):
    step_dir = max((qlora_run["out"] / "checkpoints").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    keys = list(json.loads((step_dir / "state" / "_METADATA").read_text())["tree_metadata"])  # Orbax's array tree
    params = [k for k in keys if k.startswith("('params'")]
    assert params and all(k.endswith(("'lora_a')", "'lora_b')")) for k in params), params
    for name in ("codes", "absmax", "offset", "embed_tokens", "lm_head", "kernel"):
        assert not any(name in k for k in keys), name


def test_qlora_adapter_loads_in_peft_and_matches_the_merged_export(qlora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = load_config(qlora_run["yaml"])
    written = export.export_checkpoint(config, formats=["adapter", "merged"], out_dir=tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(written["merged"], dtype=torch.float32)
    want = torch_logits(merged)
    # the adapter onto the base it trained on (the dequantized base, written by jsft) gives the merged logits
    quantized, _ = hf.load_model(qlora_run["model"], dtype="float32",
                                 quantization={"quant_type": "nf4", "nested": True})
    hf.save_model(quantized, tmp_path / "dequantized")
    on_dequantized = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized", dtype=torch.float32), written["adapter"])
    np.testing.assert_allclose(torch_logits(on_dequantized), want, atol=1e-4)
    # the adapter onto the original base (as QLoRA adapters are used): off by the quantization error only
    base = AutoModelForCausalLM.from_pretrained(qlora_run["model"], dtype=torch.float32)
    base_logits = torch_logits(base)
    on_base = torch_logits(PeftModel.from_pretrained(base, written["adapter"]))
    dequantized = AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized", dtype=torch.float32)
    quant_error = np.abs(base_logits - torch_logits(dequantized)).mean()
    off, untrained = np.abs(on_base - want).mean(), np.abs(base_logits - want).mean()
    numbers = f"adapter on base vs merged {off:.4f}, base vs merged {untrained:.4f}, quantization {quant_error:.4f}"
    assert off < 2 * quant_error < untrained, numbers  # the adapter carries what trained; the rest is quantization
    config_json = json.loads((written["merged"] / "config.json").read_text())
    assert "quantization_config" not in config_json  # a plain dense checkpoint
