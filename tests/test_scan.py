"""The scanned decoder layers: equal to the same layers unrolled (logits and gradients, fp32), the lowered program
does not grow with the layer count, and the stacked parameters read and write the same HF files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jsft.hf import layer_slices, load_model, save_model, save_peft_adapter, stacked_path
from jsft.model.llama import Llama, LlamaConfig
from jsft.model.lora import apply_lora

L = 16


def batch(vocab, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(2, vocab, size=(2, L)).astype(np.int32)
    seg = np.ones_like(ids)
    seg[0, 9:] = 2  # two documents in row 0
    pos = np.where(seg == 2, np.arange(L) - 9, np.arange(L)).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)


def loss_and_grads(model, ids, pos, seg, wrt=nnx.Param):
    def loss(m):
        logits = m(ids, pos, seg)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]), logits

    return nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, wrt), has_aux=True))(model)


@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.parametrize("lora", [False, True])
def test_scanned_layers_equal_the_unrolled_layers(checkpoint_dir, remat, lora):
    model, cfg = load_model(checkpoint_dir, dtype=jnp.float32, remat_policy=remat)
    wrt = nnx.Param
    if lora:
        apply_lora(model, r=2, alpha=4.0, dropout=0.0, rngs=nnx.Rngs(1))
        for module in (model.layers.self_attn.q_proj, model.layers.mlp.down_proj):  # B = 0 would hide the LoRA path
            module.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(2), module.lora_b.shape))
        wrt = nnx.LoRAParam
    ids, pos, seg = batch(cfg.vocab_size)
    assert model.scan_layers
    (_, scanned), scanned_grads = loss_and_grads(model, ids, pos, seg, wrt)
    model.scan_layers = False
    (_, unrolled), unrolled_grads = loss_and_grads(model, ids, pos, seg, wrt)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), atol=1e-6, rtol=0)
    flat_s, flat_u = nnx.to_flat_state(scanned_grads), nnx.to_flat_state(unrolled_grads)
    assert [p for p, _ in flat_s] == [p for p, _ in flat_u] and len(flat_s) > 0
    for (p, a), (_, b) in zip(flat_s, flat_u):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), atol=1e-6, rtol=0,
                                   err_msg=str(p))


def lowered_lines(num_layers, scan_layers):
    cfg = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2))
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), remat_policy="full", scan_layers=scan_layers,
                                         attention_impl="xla"))
    ids = jax.ShapeDtypeStruct((1, L), jnp.int32)
    grad = nnx.grad(lambda m, i: jnp.sum(m(i, i, i)))
    return len(nnx.jit(grad).lower(model, ids).as_text().splitlines())


def test_the_scanned_program_does_not_grow_with_the_layer_count():
    assert lowered_lines(2, True) == lowered_lines(6, True)
    assert lowered_lines(6, False) > 2 * lowered_lines(2, False)  # the unrolled one does (the old model)


def test_layer_slices_name_each_layer_both_ways():
    assert layer_slices("layers.mlp.up_proj.kernel", 2) == [("layers.0.mlp.up_proj.kernel", 0),
                                                            ("layers.1.mlp.up_proj.kernel", 1)]
    assert layer_slices("norm.scale", 2) == [("norm.scale", None)]
    assert stacked_path("layers.11.self_attn.q_proj.kernel") == ("layers.self_attn.q_proj.kernel", 11)
    assert stacked_path("lm_head.kernel") == ("lm_head.kernel", None)


def test_stacked_model_reads_and_writes_the_same_hf_files(checkpoint_dir, tmp_path):
    """Every tensor of the HF checkpoint goes into its layer's slice and comes back out bit for bit."""
    model, cfg = load_model(checkpoint_dir, dtype=jnp.float32)
    original = load_file(checkpoint_dir / "model.safetensors")
    for i in range(cfg.num_layers):  # each HF tensor sits in its slice
        np.testing.assert_array_equal(np.asarray(model.layers.mlp.up_proj.kernel[...][i]).T,
                                      original[f"model.layers.{i}.mlp.up_proj.weight"])
    written = load_file(save_model(model, tmp_path / "out") / "model.safetensors")
    assert sorted(written) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(written[name], tensor, err_msg=name)


def test_stacked_lora_writes_one_peft_tensor_per_layer(checkpoint_dir, tmp_path):
    model, cfg = load_model(checkpoint_dir, dtype=jnp.float32)
    apply_lora(model, r=2, alpha=4.0, dropout=0.0, target_modules=["v_proj"], rngs=nnx.Rngs(1))
    out = save_peft_adapter(model, tmp_path / "adapter", "base", 2, 4.0, 0.0, ["v_proj"])
    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 2 * cfg.num_layers
    for i in range(cfg.num_layers):
        np.testing.assert_array_equal(tensors[f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_A.weight"],
                                      np.asarray(model.layers.self_attn.v_proj.lora_a[...][i]).T)
