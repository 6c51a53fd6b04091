"""LoRA: PEFT semantics (forward, gradients, init), merging, merged export and PEFT adapter export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from jsft.hf import load_model, save_merged, save_peft_adapter
from jsft.model.lora import LoRALinear, apply_lora, lora_modules, merge_lora

L = 24
R, ALPHA = 4, 8.0


@nnx.jit
def forward(model, ids):
    B, n = ids.shape
    return model(ids, jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n)), jnp.ones((B, n), jnp.int32))


def ids_batch(seed=0):
    return np.random.RandomState(seed).randint(2, 384, size=(2, L)).astype(np.int32)


def randomize_b(model, seed=1):
    """Give every lora_b random values (B starts at zero, which would hide any orientation mistake)."""
    keys = iter(jax.random.split(jax.random.key(seed), 100))
    for module in lora_modules(model).values():
        module.lora_b.set_value(0.05 * jax.random.normal(next(keys), module.lora_b.shape))


def lora_model(path, targets="all-linear", dropout=0.0, randomize=True):
    model, _ = load_model(path, dtype=jnp.float32)
    apply_lora(model, r=R, alpha=ALPHA, dropout=dropout, target_modules=targets, rngs=nnx.Rngs(3))
    if randomize:
        randomize_b(model)
    return model


def test_zero_b_leaves_logits_unchanged_and_init_follows_peft(checkpoint_dir):
    base, _ = load_model(checkpoint_dir, dtype=jnp.float32)
    ids = ids_batch()
    before = np.asarray(forward(base, ids))
    model = lora_model(checkpoint_dir, randomize=False)
    np.testing.assert_array_equal(np.asarray(forward(model, ids)), before)
    q = model.layer(0).self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.scale == ALPHA / R
    assert q.lora_a.shape == (64, R) and q.lora_b.shape == (R, 64)
    assert np.all(np.asarray(q.lora_b.get_value()) == 0)
    a = np.asarray(q.lora_a.get_value())
    assert np.abs(a).max() <= 1 / np.sqrt(64) and a.std() > 0.5 / np.sqrt(3 * 64)  # uniform(+-1/sqrt(in))


def test_lora_params_are_the_trainable_set_and_carry_logical_axes(checkpoint_dir):
    model = lora_model(checkpoint_dir, targets=["q_proj", "down_proj"], randomize=False)
    flat = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    paths = sorted(".".join(map(str, p)) for p, _ in flat)
    assert paths == sorted(f"layers.{m}.{w}" for m in ("self_attn.q_proj", "mlp.down_proj")
                           for w in ("lora_a", "lora_b"))  # stacked: [layers, ...]
    axes = {".".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in flat}
    assert axes["layers.self_attn.q_proj.lora_a"] == ("layers", "embed", "lora_rank")
    assert axes["layers.self_attn.q_proj.lora_b"] == ("layers", "lora_rank", "q_heads")
    assert axes["layers.mlp.down_proj.lora_a"] == ("layers", "mlp", "lora_rank")
    assert model.layers.mlp.down_proj.lora_a.shape == (2, 128, 4)  # [layers, mlp, r]
    assert not isinstance(model.layer(0).self_attn.k_proj, LoRALinear)
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(model.lm_head)))
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["lm_head"])


def test_merged_model_equals_unmerged_lora_model(checkpoint_dir):
    model = lora_model(checkpoint_dir)
    ids = ids_batch()
    unmerged = np.asarray(forward(model, ids))
    base, _ = load_model(checkpoint_dir, dtype=jnp.float32)
    assert np.abs(unmerged - np.asarray(forward(base, ids))).max() > 1e-3  # LoRA really changes the output
    merge_lora(model)
    assert not lora_modules(model) and not nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    np.testing.assert_allclose(np.asarray(forward(model, ids)), unmerged, atol=1e-5, rtol=0)


def test_dropout_is_active_in_training_and_off_in_eval(checkpoint_dir):
    model = lora_model(checkpoint_dir, dropout=0.5)
    ids = ids_batch()
    train_a, train_b = np.asarray(forward(model, ids)), np.asarray(forward(model, ids))
    assert np.abs(train_a - train_b).max() > 1e-4  # fresh dropout masks each call
    model.eval()
    no_dropout = lora_model(checkpoint_dir, dropout=0.0)
    np.testing.assert_allclose(np.asarray(forward(model, ids)), np.asarray(forward(no_dropout, ids)), atol=1e-6)


@pytest.fixture(scope="module")
def peft_pair(checkpoint_dir, tmp_path_factory):
    """(jsft LoRA model with random B, the PEFT model loaded from jsft's adapter export, the export dir)."""
    model = lora_model(checkpoint_dir, dropout=0.1)
    model.eval()
    out = save_peft_adapter(model, tmp_path_factory.mktemp("adapter"), str(checkpoint_dir), r=R, alpha=ALPHA,
                            dropout=0.1, target_modules="all-linear")
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    return model, peft.PeftModel.from_pretrained(base, out).eval(), out


def test_peft_adapter_export_loads_in_peft_with_the_same_logits(peft_pair):
    model, peft_model, out = peft_pair
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == R and config["lora_alpha"] == ALPHA and config["peft_type"] == "LORA"
    assert sorted(peft_model.peft_config["default"].target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ids = ids_batch()
    with torch.no_grad():
        ref = peft_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model, ids)), ref, atol=1e-4, rtol=0)


def test_lora_gradients_match_peft(peft_pair):
    model, peft_model, _ = peft_pair
    ids = ids_batch(seed=4)
    targets = np.roll(ids, -1, axis=1)

    def loss(m):
        logp = jax.nn.log_softmax(m(ids, jnp.broadcast_to(jnp.arange(L), ids.shape), jnp.ones_like(ids)))
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
    for name, p in peft_model.named_parameters():  # loaded for inference: switch the adapters' gradients on
        p.requires_grad_("lora_" in name)
    peft_model.zero_grad()
    logits = peft_model(torch.tensor(ids, dtype=torch.long)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, 384), torch.tensor(targets).reshape(-1).long()).backward()
    named = dict(peft_model.named_parameters())
    checked = 0
    for path, g in nnx.to_flat_state(grads):
        block, proj, which = path[1], path[2], path[3]  # layers.<block>.<proj>.lora_a: [layers, ...]
        for layer, g_layer in enumerate(np.asarray(g.get_value())):
            key = f"base_model.model.model.layers.{layer}.{block}.{proj}.lora_{which[-1].upper()}.default.weight"
            np.testing.assert_allclose(g_layer, named[key].grad.numpy().T, atol=1e-5, rtol=1e-3, err_msg=key)
            checked += 1
    assert checked == 2 * 7 * 2


def test_merged_export_loads_in_transformers_with_the_same_logits(checkpoint_dir, tmp_path):
    model = lora_model(checkpoint_dir)
    ids = ids_batch()
    ours = np.asarray(forward(model, ids))
    out = save_merged(model, tmp_path / "merged")
    assert lora_modules(model)  # exporting does not change the training model
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor(ids, dtype=torch.long)).logits.numpy(), ours, atol=1e-4, rtol=0)
    base, _ = load_model(checkpoint_dir, dtype=jnp.float32)
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_merged(base, tmp_path / "nothing")


@pytest.mark.parametrize("tied", [False, True])
def test_adapter_with_added_tokens_loads_in_peft_like_trl_saves_it(make_checkpoint, tmp_path, tied):
    """A cloned chat template added tokens 400-403: their embedding rows (and an untied head) travel in the adapter."""
    path = make_checkpoint("tied", "llama", tie_word_embeddings=True) if tied else make_checkpoint("llama", "llama")
    model, _ = load_model(path, dtype=jnp.float32)
    model.resize_vocab(448)
    apply_lora(model, r=R, alpha=ALPHA, dropout=0.0, target_modules="all-linear", rngs=nnx.Rngs(3))
    randomize_b(model)
    added = [400, 401, 402, 403]
    emb = model.embed_tokens.embedding
    emb.set_value(emb[...].at[np.asarray(added)].add(jax.random.normal(jax.random.key(7), (4, 64))))  # "trained"
    if not tied:
        model.lm_head.kernel.set_value(model.lm_head.kernel[...] * 1.1)
    out = save_peft_adapter(model, tmp_path / "adapter", str(path), r=R, alpha=ALPHA, dropout=0.0,
                            target_modules="all-linear", added_token_ids=added)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": added}
    assert config["modules_to_save"] == (None if tied else ["lm_head"])
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base.resize_token_embeddings(448)
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    ids = ids_batch()
    ids[:, 3:7] = added
    with torch.no_grad():
        ref = peft_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model, ids)), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_adapter_with_whole_trained_embeddings_loads_in_peft(make_checkpoint, tmp_path, tied):
    """Embedding and head trained whole (every row changed): saved as modules_to_save, PEFT reproduces the logits."""
    path = make_checkpoint("tied", "llama", tie_word_embeddings=True) if tied else make_checkpoint("llama", "llama")
    model, _ = load_model(path, dtype=jnp.float32)
    model.resize_vocab(448)
    apply_lora(model, r=R, alpha=ALPHA, dropout=0.0, target_modules=["q_proj", "v_proj"], rngs=nnx.Rngs(3))
    randomize_b(model)
    emb = model.embed_tokens.embedding
    emb.set_value(emb[...] + 0.05 * jax.random.normal(jax.random.key(8), emb.shape))
    out = save_peft_adapter(model, tmp_path / "adapter", str(path), r=R, alpha=ALPHA, dropout=0.0,
                            target_modules=["q_proj", "v_proj"], save_embeddings=True)
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["embed_tokens", "lm_head"]
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base.resize_token_embeddings(448)
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    ids = ids_batch()
    ids[:, 3:7] = [400, 401, 440, 447]
    with torch.no_grad():
        ref = peft_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model, ids)), ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        save_peft_adapter(model, tmp_path / "x", str(path), r=R, alpha=ALPHA, dropout=0.0,
                          target_modules=["q_proj", "v_proj"], added_token_ids=[400], save_embeddings=True)


def test_dropout_masks_are_replayed_by_remat(make_checkpoint):
    """With LoRA dropout on, remat recomputes each layer with the same dropout mask: gradients equal no-remat."""
    ids = ids_batch(seed=5)
    path = make_checkpoint("one_layer", "llama", num_hidden_layers=1)

    def grads(policy):
        model, _ = load_model(path, dtype=jnp.float32, remat_policy=policy)
        apply_lora(model, r=R, alpha=ALPHA, dropout=0.3, target_modules=["q_proj", "up_proj"], rngs=nnx.Rngs(3))
        randomize_b(model)

        def loss(m):
            return jnp.mean(jax.nn.log_softmax(forward(m, ids))[..., 5] ** 2)

        return nnx.to_flat_state(nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model))

    ref, got = grads("none"), grads("full")
    for (p, a), (_, b) in zip(ref, got):
        np.testing.assert_allclose(b.get_value(), a.get_value(), atol=1e-6, rtol=1e-5, err_msg=str(p))
