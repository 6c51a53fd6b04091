"""DoRA, lora_modules_to_save and PEFT's target matching, each against PEFT itself: the same weights loaded into
PEFT give the same logits and gradients, jsft's adapter exports load in PeftModel.from_pretrained with equal logits,
the trainable-parameter counts equal PEFT's, and a short jsft.train run with them checkpoints, resumes and exports."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from jsft import build, export, hf, sharding, train
from jsft.config import ConfigError, validate
from jsft.hf import base_params, load_model, save_merged, save_peft_adapter
from jsft.model import quant
from jsft.model.lora import apply_lora, lora_modules, merge_lora
from jsft.optim import trainable_filter
from jsft.peft_names import resolve_modules_to_save, resolve_targets
from train_configs import tiny_config

L = 24
R, ALPHA = 4, 8.0
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ids_batch(seed=0):
    return np.random.RandomState(seed).randint(2, 384, size=(2, L)).astype(np.int32)


@nnx.jit
def forward(model, ids):
    B, n = ids.shape
    return model(ids, jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n)), jnp.ones((B, n), jnp.int32))


def peft_logits(peft_model, ids):
    with torch.no_grad():
        return peft_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def train_adapters(model, seed=1):
    """Give lora_b and the DoRA magnitudes "trained" values (B zero and m = ||W|| would hide orientation mistakes)."""
    keys = iter(jax.random.split(jax.random.key(seed), 100))
    for module in lora_modules(model).values():
        module.lora_b.set_value(0.05 * jax.random.normal(next(keys), module.lora_b.shape))
        if module.lora_magnitude is not None:
            m = module.lora_magnitude
            m.set_value(m[...] * (1 + 0.2 * jax.random.normal(next(keys), m.shape)))


def dora_model(path, targets="all-linear", dropout=0.0, trained=True, **load):
    model, _ = load_model(path, dtype=jnp.float32, **load)
    apply_lora(model, r=R, alpha=ALPHA, dropout=dropout, target_modules=targets, rngs=nnx.Rngs(3), use_dora=True)
    if trained:
        train_adapters(model)
    return model


def torch_base(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def peft_count(path, **lora_config):
    """PEFT's trainable-parameter count (what print_trainable_parameters prints) for this LoraConfig."""
    model = peft.get_peft_model(torch_base(path), peft.LoraConfig(r=R, lora_alpha=ALPHA, **lora_config))
    return model.get_nb_trainable_parameters()[0], model


def nll(m, ids, targets):
    logp = jax.nn.log_softmax(m(ids, jnp.broadcast_to(jnp.arange(L), ids.shape), jnp.ones_like(ids)))
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()


def torch_grads(peft_model, ids, targets, trained):
    for name, p in peft_model.named_parameters():  # loaded for inference: switch the trained ones' gradients on
        p.requires_grad_(trained(name))
    peft_model.zero_grad()
    logits = peft_model(torch.tensor(ids, dtype=torch.long)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, 384), torch.tensor(targets).reshape(-1).long()).backward()
    return {name: p.grad.numpy() for name, p in peft_model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------- DoRA


@pytest.fixture(scope="module")
def dora_pair(checkpoint_dir, tmp_path_factory):
    """(jsft DoRA model with trained B and m, the PEFT model loaded from jsft's adapter export, the export dir)."""
    model = dora_model(checkpoint_dir, dropout=0.1)
    model.eval()
    out = save_peft_adapter(model, tmp_path_factory.mktemp("dora"), str(checkpoint_dir), r=R, alpha=ALPHA,
                            dropout=0.1, target_modules="all-linear")
    return model, peft.PeftModel.from_pretrained(torch_base(checkpoint_dir), out).eval(), out


def test_dora_init_and_trainable_count_equal_peft(checkpoint_dir):
    model = dora_model(checkpoint_dir, trained=False)
    count, peft_model = peft_count(checkpoint_dir, target_modules="all-linear", use_dora=True)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == count
    named = dict(peft_model.named_parameters())
    for path, module in lora_modules(model).items():
        _, block, proj = path.split(".")
        for layer in range(2):
            want = named[f"base_model.model.model.layers.{layer}.{block}.{proj}.lora_magnitude_vector.default.weight"]
            np.testing.assert_allclose(np.asarray(module.lora_magnitude[...][layer]), want.detach().numpy(),
                                       rtol=1e-6, err_msg=path)  # m starts at ||W|| per output
    np.testing.assert_allclose(np.asarray(forward(model, ids_batch())),
                               np.asarray(forward(load_model(checkpoint_dir, dtype=jnp.float32)[0], ids_batch())),
                               atol=1e-5)  # B = 0, m = ||W||: the base model's logits


def test_dora_adapter_export_loads_in_peft_with_the_same_logits(dora_pair):
    model, peft_model, out = dora_pair
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    tensors = load_file(out / "adapter_model.safetensors")
    magnitude = "base_model.model.model.layers.1.self_attn.k_proj.lora_magnitude_vector"
    assert tensors[magnitude].shape == (32,)  # PEFT's file name: no ".weight"; k_proj's out = 2 kv heads x 16
    assert sum(k.endswith("lora_magnitude_vector") for k in tensors) == 2 * 7
    assert peft_model.peft_config["default"].use_dora
    ids = ids_batch()
    ours = np.asarray(forward(model, ids))
    assert np.abs(ours - np.asarray(forward(dora_model(peft_model.peft_config["default"].base_model_name_or_path,
                                                        trained=False), ids))).max() > 1e-3  # DoRA changes them
    np.testing.assert_allclose(ours, peft_logits(peft_model, ids), atol=1e-4, rtol=0)


def test_dora_gradients_match_peft(dora_pair):
    model, peft_model, _ = dora_pair
    ids = ids_batch(seed=4)
    targets = np.roll(ids, -1, axis=1)
    grads = nnx.jit(nnx.grad(lambda m: nll(m, ids, targets), argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
    ref = torch_grads(peft_model, ids, targets, lambda name: "lora_" in name)
    peft_name = {"lora_a": ("lora_A", True), "lora_b": ("lora_B", True), "lora_magnitude": ("lora_magnitude_vector",
                                                                                            False)}
    checked = 0
    for path, g in nnx.to_flat_state(grads):
        block, proj, which = path[1], path[2], path[3]
        name, transposed = peft_name[which]
        for layer, g_layer in enumerate(np.asarray(g.get_value())):
            key = f"base_model.model.model.layers.{layer}.{block}.{proj}.{name}.default.weight"
            want = ref[key].T if transposed else ref[key]
            np.testing.assert_allclose(g_layer, want, atol=1e-5, rtol=1e-3, err_msg=key)
            checked += 1
    assert checked == 3 * 7 * 2


def test_dora_merged_export_and_merge_equal_the_adapter(dora_pair, checkpoint_dir, tmp_path):
    model, _, adapter_dir = dora_pair
    ids = ids_batch()
    ours = np.asarray(forward(model, ids))
    merged = transformers.AutoModelForCausalLM.from_pretrained(save_merged(model, tmp_path / "m"),
                                                               dtype=torch.float32).eval()
    np.testing.assert_allclose(peft_logits(merged, ids), ours, atol=1e-4, rtol=0)
    peft_merged = peft.PeftModel.from_pretrained(torch_base(checkpoint_dir), adapter_dir).merge_and_unload().eval()
    np.testing.assert_allclose(peft_logits(peft_merged, ids), ours, atol=1e-4, rtol=0)  # PEFT's own merge
    in_place = dora_model(checkpoint_dir)
    merge_lora(in_place)
    assert not nnx.to_flat_state(nnx.state(in_place, nnx.LoRAParam))
    np.testing.assert_allclose(np.asarray(forward(in_place, ids)), ours, atol=1e-5, rtol=0)


def test_dora_dropout_perturbs_only_the_adapter_path_as_peft_does(checkpoint_dir):
    """PEFT with dropout active: y = W x + b + (m/n - 1) W x' + (m/n) s B A x', x' = dropout(x). At init (B = 0,
    m = ||W|| = n) that is the base output exactly, dropout or not; a dropout applied to the base path would not be."""
    ids = ids_batch()
    base = np.asarray(forward(load_model(checkpoint_dir, dtype=jnp.float32)[0], ids))
    model = dora_model(checkpoint_dir, dropout=0.5, trained=False)  # training mode: dropout active
    np.testing.assert_allclose(np.asarray(forward(model, ids)), base, atol=1e-5)
    _, peft_model = peft_count(checkpoint_dir, target_modules="all-linear", use_dora=True, lora_dropout=0.5)
    with torch.no_grad():
        np.testing.assert_allclose(peft_model.train()(torch.tensor(ids, dtype=torch.long)).logits.numpy(), base,
                                   atol=1e-4)
    train_adapters(model)
    a, b = np.asarray(forward(model, ids)), np.asarray(forward(model, ids))
    assert np.abs(a - b).max() > 1e-4  # trained adapters, fresh dropout masks: outputs differ call to call
    model.eval()
    np.testing.assert_allclose(np.asarray(forward(model, ids)), np.asarray(forward(dora_model(checkpoint_dir), ids)),
                               atol=1e-5)


def test_dora_on_a_quantized_base_equals_dora_on_its_dequantized_weights(checkpoint_dir):
    """QLoRA + DoRA: the norm and the merge read the dequantized kernel, one layer at a time."""
    ids = ids_batch()
    qmodel = dora_model(checkpoint_dir, quantization={"quant_type": "nf4", "nested": True})
    dense, _ = load_model(checkpoint_dir, dtype=jnp.float32)
    params = base_params(dense)
    for path, kernel in quant.quantized_kernels(qmodel).items():
        params[path].set_value(kernel.dequantize(jnp.float32))
    apply_lora(dense, r=R, alpha=ALPHA, dropout=0.0, target_modules="all-linear", rngs=nnx.Rngs(3), use_dora=True)
    train_adapters(dense)
    np.testing.assert_allclose(np.asarray(forward(qmodel, ids)), np.asarray(forward(dense, ids)), atol=1e-5)
    merge_lora(qmodel)
    np.testing.assert_allclose(np.asarray(forward(qmodel, ids)), np.asarray(forward(dense, ids)), atol=1e-5)
