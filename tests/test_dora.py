"""DoRA, lora_modules_to_save and PEFT's target matching, each against PEFT itself: the same weights loaded into
PEFT give the same logits and gradients, jsft's adapter exports load in PeftModel.from_pretrained with equal logits,
the trainable-parameter counts equal PEFT's, and a short jsft.train run with them checkpoints, resumes and exports."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from jsft import build, export, fixtures, sharding, train
from jsft.config import ConfigError, validate
from jsft.config_files import load as load_config
from jsft.hf import base_params, load_model, save_merged, save_peft_adapter
from jsft.model import quant
from jsft.model.lora import apply_lora, lora_modules, merge_lora
from jsft.optim import trainable_filter
from jsft.peft_names import resolve_modules_to_save, resolve_targets
from jsft.trainer import _apply_peft_config
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


def param_at(model, path):
    node = model
    for part in path.split("."):
        node = getattr(node, part)
    return np.asarray(node[...])


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


# ----------------------------------------------------------------------------------------------- modules_to_save

SAVED = ["lm_head", "embed_tokens", "norm"]  # "norm": PEFT's endswith rule takes model.norm and every *_layernorm


def test_modules_to_save_resolve_by_peft_rule_and_refuse_what_jsft_cannot_train():
    assert resolve_modules_to_save(["lm_head", "embed_tokens"], 2) == ("embed_tokens", "lm_head")
    assert resolve_modules_to_save(SAVED, 2) == ("embed_tokens", "lm_head", "norm", "input_layernorm",
                                                 "post_attention_layernorm")
    assert resolve_modules_to_save(["norm"], 2, qk_norm=True)[-2:] == ("q_norm", "k_norm")
    with pytest.raises(ConfigError, match="'lm_hed' matches no module.*model.layers.<i>.input_layernorm"):
        resolve_modules_to_save(["lm_hed"], 2)
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        resolve_modules_to_save(["embed_tokens"], 2, tied=True)
    with pytest.raises(ConfigError, match="model.layers.<i>.mlp.*jsft trains whole only"):
        resolve_modules_to_save(["mlp"], 2)
    with pytest.raises(ConfigError, match="input_layernorm in layers 0 only, of 2"):
        resolve_modules_to_save(["layers.0.input_layernorm"], 2)


def test_modules_to_save_train_whole_export_under_peft_names_and_match_peft(checkpoint_dir, tmp_path):
    model, _ = load_model(checkpoint_dir, dtype=jnp.float32)
    apply_lora(model, r=R, alpha=ALPHA, dropout=0.0, target_modules=["q_proj", "v_proj"], rngs=nnx.Rngs(3))
    train_adapters(model)
    saved = resolve_modules_to_save(SAVED, 2)
    wrt = trainable_filter(True, modules_to_save=saved)
    count, _ = peft_count(checkpoint_dir, target_modules=["q_proj", "v_proj"], modules_to_save=SAVED)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt))) == count
    keys = iter(jax.random.split(jax.random.key(9), 20))
    for path, var in base_params(model).items():  # "trained" whole
        if any(name in path.split(".") for name in saved):
            var.set_value(var[...] + 0.05 * jax.random.normal(next(keys), var.shape))
    out = save_peft_adapter(model, tmp_path / "adapter", str(checkpoint_dir), r=R, alpha=ALPHA, dropout=0.0,
                            target_modules=["q_proj", "v_proj"], modules_to_save=SAVED)
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == SAVED
    tensors = load_file(out / "adapter_model.safetensors")
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight",
            "base_model.model.model.norm.weight", "base_model.model.model.layers.1.input_layernorm.weight",
            "base_model.model.model.layers.0.post_attention_layernorm.weight"} <= set(tensors)
    peft_model = peft.PeftModel.from_pretrained(torch_base(checkpoint_dir), out).eval()
    assert "base_model.model.lm_head.modules_to_save.default.weight" in dict(peft_model.named_parameters())
    ids = ids_batch()
    ours = np.asarray(forward(model, ids))
    np.testing.assert_allclose(ours, peft_logits(peft_model, ids), atol=1e-4, rtol=0)
    # gradients of the whole-trained modules equal PEFT's (its modules_to_save copies)
    targets = np.roll(ids, -1, axis=1)
    grads = dict(nnx.to_flat_state(nnx.jit(nnx.grad(lambda m: nll(m, ids, targets),
                                                    argnums=nnx.DiffState(0, wrt)))(model)))
    ref = torch_grads(peft_model, ids, targets, lambda name: "lora_" in name or "modules_to_save" in name)
    np.testing.assert_allclose(np.asarray(grads[("lm_head", "kernel")].get_value()),
                               ref["base_model.model.lm_head.modules_to_save.default.weight"].T, atol=1e-6, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(grads[("layers", "input_layernorm", "scale")].get_value())[1],
                               ref["base_model.model.model.layers.1.input_layernorm.modules_to_save.default.weight"],
                               atol=1e-6, rtol=1e-3)
    merged = transformers.AutoModelForCausalLM.from_pretrained(save_merged(model, tmp_path / "merged"),
                                                               dtype=torch.float32).eval()
    np.testing.assert_allclose(peft_logits(merged, ids), ours, atol=1e-4, rtol=0)  # the merged export has them


# ----------------------------------------------------------------------------------------------- regex targets


def peft_targets(path, target_modules):
    """{(layer, projection)} PEFT puts LoRA on for this target_modules."""
    model = peft.get_peft_model(torch_base(path), peft.LoraConfig(r=R, target_modules=target_modules))
    found = set()
    for name, _ in model.named_modules():
        parts = name.split(".")
        if parts[-1] in PROJECTIONS and hasattr(model.get_submodule(name), "lora_A"):
            found.add((int(parts[parts.index("layers") + 1]), parts[-1]))
    return found


@pytest.mark.parametrize("target_modules", [r".*\.(q|v)_proj", r"model\.layers\.\d+\.mlp\.(up|down)_proj",
                                            ["self_attn.o_proj", "gate_proj"], "all-linear"])
def test_targets_select_what_peft_selects(checkpoint_dir, target_modules):
    ours = resolve_targets(target_modules, 2)
    assert {(layer, p) for layer in range(2) for p in ours} == peft_targets(checkpoint_dir, target_modules)


def test_a_regex_that_matches_nothing_or_part_of_the_layers_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"'q_proj' matches no module.*regex full-matched.*"
                                          r"model\.layers\.<i>\.self_attn\.q_proj.*did you mean \['q_proj'\]"):
        resolve_targets("q_proj", 2)  # PEFT: a string is a regex on the full name, so this matches nothing
    with pytest.raises(ConfigError, match=r"selects self_attn.q_proj in layers 0 only, of 2.*stacked"):
        resolve_targets(r".*layers\.0\.self_attn\.q_proj", 2)
    with pytest.raises(ConfigError, match="matches lm_head.*lora_modules_to_save"):
        resolve_targets(r".*(lm_head|q_proj)", 2)
    with pytest.raises(ConfigError, match="does not compile"):
        resolve_targets("(q_proj", 2)
    cfg = tiny_config("tok", "d.jsonl", "out", lora={"use_peft": True, "lora_target_modules": "[bad"})
    with pytest.raises(ConfigError, match="lora.lora_target_modules='\\[bad'.*does not compile"):
        validate(cfg)


def test_a_regex_target_round_trips_through_the_adapter_into_peft(checkpoint_dir, tmp_path):
    pattern = r"model\.layers\.\d+\.(self_attn\.k|mlp\.gate)_proj"
    model, _ = load_model(checkpoint_dir, dtype=jnp.float32)
    apply_lora(model, r=R, alpha=ALPHA, dropout=0.0, target_modules=pattern, rngs=nnx.Rngs(3))
    train_adapters(model)
    assert sorted(lora_modules(model)) == ["layers.mlp.gate_proj", "layers.self_attn.k_proj"]
    out = save_peft_adapter(model, tmp_path / "a", str(checkpoint_dir), r=R, alpha=ALPHA, dropout=0.0,
                            target_modules=pattern)
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == pattern
    peft_model = peft.PeftModel.from_pretrained(torch_base(checkpoint_dir), out).eval()
    np.testing.assert_allclose(np.asarray(forward(model, ids_batch())), peft_logits(peft_model, ids_batch()),
                               atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- through jsft.train


def test_trl_and_peft_configs_map_dora_modules_to_save_and_regex_targets(tmp_path):
    path = tmp_path / "trl.json"
    path.write_text(json.dumps({"model_name_or_path": "ckpt", "dataset_name": "d.jsonl", "use_peft": True,
                                "use_dora": True, "lora_modules_to_save": ["lm_head", "embed_tokens"],
                                "lora_target_modules": r".*\.(q|v)_proj"}))
    lora = load_config(path).lora
    assert lora.use_dora and lora.lora_modules_to_save == ["lm_head", "embed_tokens"]
    assert lora.lora_target_modules == r".*\.(q|v)_proj"
    cfg = tiny_config("tok", "d.jsonl", "out")
    _apply_peft_config(cfg, peft.LoraConfig(r=8, use_dora=True, modules_to_save=["lm_head"], target_modules=".*k_proj"))
    assert (cfg.lora.use_dora, cfg.lora.lora_modules_to_save, cfg.lora.lora_target_modules) == (
        True, ["lm_head"], ".*k_proj")
    with pytest.raises(ConfigError, match="layers_to_transform=\\[0\\] is not supported"):
        _apply_peft_config(cfg, peft.LoraConfig(layers_to_transform=[0]))



def test_a_dora_run_with_modules_to_save_trains_checkpoints_resumes_and_exports_what_peft_loads(
        tokenizer_dir, checkpoint_dir, tmp_path):
    config = tiny_config(tokenizer_dir, tmp_path / "pc.jsonl", tmp_path / "run",
                         model={"model_name_or_path": str(checkpoint_dir), "init_from_scratch": None},
                         lora={"use_peft": True, "lora_r": R, "lora_alpha": int(ALPHA), "lora_dropout": 0.1,
                               "use_dora": True, "lora_target_modules": r".*\.(q|v|down)_proj",
                               "lora_modules_to_save": ["lm_head"]},
                         training={"max_steps": 4}, logging={"save_steps": 2})
    fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 8, seed=5), tmp_path / "pc.jsonl")
    initial, _ = build.build_model(config, build.build_tokenizer(config)[0], sharding.create_mesh(config.sharding))
    summary = train.run(config)
    model = summary["model"]
    count, _ = peft_count(checkpoint_dir, target_modules=r".*\.(q|v|down)_proj", use_dora=True,
                          modules_to_save=["lm_head"])
    assert summary["plan"]["trainable_params"] == count  # what the run printed equals PEFT's count
    m0, m1 = (np.asarray(x.layers.self_attn.q_proj.lora_magnitude[...]) for x in (initial, model))
    assert np.abs(m1 - m0).max() > 1e-5  # the magnitude trained
    assert np.abs(np.asarray(model.lm_head.kernel[...]) - np.asarray(initial.lm_head.kernel[...])).max() > 1e-5
    np.testing.assert_array_equal(np.asarray(model.norm.scale[...]), np.asarray(initial.norm.scale[...]))
    # from the checkpoint (base rebuilt, trained params restored: the magnitude and lm_head included)
    written = export.export_checkpoint(config, formats=["adapter", "merged"], out_dir=tmp_path / "from_ckpt")
    tensors = load_file(written["adapter"] / "adapter_model.safetensors")
    np.testing.assert_array_equal(tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"],
                                  m1[1])
    np.testing.assert_array_equal(tensors["base_model.model.lm_head.weight"], np.asarray(model.lm_head.kernel[...]).T)
    model.eval()
    ids = ids_batch()
    ours = np.asarray(forward(model, ids))
    peft_model = peft.PeftModel.from_pretrained(torch_base(checkpoint_dir), written["adapter"]).eval()
    np.testing.assert_allclose(peft_logits(peft_model, ids), ours, atol=1e-4, rtol=0)
    merged = transformers.AutoModelForCausalLM.from_pretrained(written["merged"], dtype=torch.float32).eval()
    np.testing.assert_allclose(peft_logits(merged, ids), ours, atol=1e-4, rtol=0)
    # resumed from step 2 (as if killed after it), the run ends where the straight run did: magnitudes, head, RNG
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
    config.logging.resume_from_checkpoint = True
    resumed = train.run(config)["model"]
    for path in ("layers.self_attn.q_proj.lora_magnitude", "layers.mlp.down_proj.lora_b", "lm_head.kernel"):
        np.testing.assert_allclose(param_at(resumed, path), param_at(model, path), atol=1e-6, err_msg=path)
