"""The Llama family model: parity with transformers, packed rows, remat, config errors, vocab resizing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jsft.hf import load_model
from jsft.model.llama import Llama, LlamaConfig, ModelConfigError

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 10000.0}
VARIANTS = {
    "llama": ("llama", {}),
    "tied": ("llama", {"tie_word_embeddings": True}),
    "llama3_rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "gqa4": ("llama", {"num_key_value_heads": 1}),
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mistral": ("mistral", {}),
}
DOCS = [[23, 17], [30, 18]]  # documents per row; L = 48, so row 0 ends with 8 tokens of padding
L = 48


def packed_batch(doc_lengths, length, vocab, seed=0):
    """Rows of packed random documents + tail padding -> (batch dict, [(row, start, stop)] per document)."""
    rng = np.random.RandomState(seed)
    ids = np.ones((len(doc_lengths), length), np.int32)  # pad id 1
    seg = np.zeros_like(ids)
    pos = np.zeros_like(ids)
    docs = []
    for r, lengths in enumerate(doc_lengths):
        start = 0
        for d, n in enumerate(lengths):
            ids[r, start:start + n] = rng.randint(2, vocab, size=n)
            seg[r, start:start + n] = d + 1
            pos[r, start:start + n] = np.arange(n)
            docs.append((r, start, start + n))
            start += n
    return {"input_ids": ids, "positions": pos, "segment_ids": seg}, docs


@nnx.jit
def forward(model, input_ids, positions, segment_ids):
    return model(input_ids, positions, segment_ids)


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor(np.asarray(ids)[None], dtype=torch.long)).logits[0].numpy()


@pytest.fixture(scope="module")
def variant(make_checkpoint):
    def get(name):
        arch, overrides = VARIANTS[name]
        path = make_checkpoint(name, arch, **overrides)
        model, cfg = load_model(path, dtype=jnp.float32)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return path, model, cfg, hf

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_packed_logits_match_transformers_per_document(variant, name):
    path, model, cfg, hf = variant(name)
    batch, docs = packed_batch(DOCS, L, cfg.vocab_size)
    logits = np.asarray(forward(model, batch["input_ids"], batch["positions"], batch["segment_ids"]))
    assert logits.shape == (2, L, cfg.vocab_size) and logits.dtype == np.float32
    assert np.isfinite(logits).all()  # padding rows included
    for r, start, stop in docs:
        ref = hf_logits(hf, batch["input_ids"][r, start:stop])
        np.testing.assert_allclose(logits[r, start:stop], ref, atol=1e-4, rtol=0)


def test_variant_flags_follow_the_config(variant):
    assert variant("qwen2")[2].qkv_bias and not variant("qwen2")[2].o_bias
    assert variant("qwen3")[2].qk_norm and hasattr(variant("qwen3")[1].layer(0).self_attn, "q_norm")
    assert variant("tied")[2].tie_word_embeddings and not hasattr(variant("tied")[1], "lm_head")
    gqa = variant("gqa4")[1]
    assert gqa.layer(0).self_attn.k_proj.kernel.shape == (64, 16)  # one kv head of dim 16
    assert gqa.layer(0).self_attn.q_proj.kernel.shape == (64, 64)
    assert variant("llama_bias")[1].layer(0).mlp.up_proj.bias is not None


def test_llama3_rope_frequencies_match_transformers_and_really_scale():
    hf_cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=dict(LLAMA3_ROPE))
    ref, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = LlamaConfig.from_hf(hf_cfg.to_dict()).inv_freq()
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    default = LlamaConfig.from_hf(transformers.LlamaConfig(hidden_size=64, num_attention_heads=4).to_dict()).inv_freq()
    changed = ~np.isclose(ours, default)
    assert changed.sum() >= 3 and not changed[0]  # low frequencies scaled, the highest kept


def test_llama3_scaling_changes_logits_more_than_the_parity_tolerance(variant):
    """Same weights (same seed), default vs llama3 RoPE: the parity test at 1e-4 would see a wrong scaling."""
    _, model, cfg, _ = variant("llama3_rope")
    default_hf = variant("llama")[3]
    batch, docs = packed_batch(DOCS, L, cfg.vocab_size)
    logits = np.asarray(forward(model, batch["input_ids"], batch["positions"], batch["segment_ids"]))
    r, start, stop = docs[2]  # the 30-token document
    assert np.abs(logits[r, start:stop] - hf_logits(default_hf, batch["input_ids"][r, start:stop])).max() > 1e-3


def test_legacy_rope_scaling_and_rope_theta_are_read():
    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4).to_dict()
    hf.pop("rope_parameters")
    legacy = dict(hf, rope_theta=500000.0, rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"})
    rope = dict(LlamaConfig.from_hf(legacy).rope)
    assert rope["rope_theta"] == 500000.0 and rope["rope_type"] == "llama3" and rope["factor"] == 8.0


def test_packed_row_equals_documents_alone(variant):
    _, model, cfg, _ = variant("qwen3")
    batch, docs = packed_batch(DOCS, L, cfg.vocab_size, seed=1)
    packed = np.asarray(forward(model, batch["input_ids"], batch["positions"], batch["segment_ids"]))
    for r, start, stop in docs:  # alone: the document at the start of a row of its own (then only padding)
        n = stop - start
        ids, pos, seg = (np.zeros((1, L), np.int32) for _ in range(3))
        ids[0, :n], pos[0, :n], seg[0, :n] = batch["input_ids"][r, start:stop], np.arange(n), 1
        alone = np.asarray(forward(model, ids, pos, seg))
        np.testing.assert_allclose(packed[r, start:stop], alone[0, :n], atol=1e-5, rtol=0)


def test_hidden_states_times_lm_head_weight_are_the_logits(variant):
    for name in ("llama", "tied"):
        _, model, cfg, _ = variant(name)
        batch, _ = packed_batch(DOCS, L, cfg.vocab_size)
        args = (batch["input_ids"], batch["positions"], batch["segment_ids"])
        hidden = nnx.jit(lambda m, *a: m.hidden_states(*a))(model, *args)
        assert hidden.shape == (2, L, cfg.hidden_size)
        assert model.lm_head_weight().shape == (cfg.hidden_size, cfg.vocab_size)
        np.testing.assert_allclose(hidden @ model.lm_head_weight(), forward(model, *args), atol=1e-5)


def test_bf16_params_and_compute_stay_close_to_fp32(variant):
    path, model, cfg, _ = variant("llama")
    bf16, _ = load_model(path, dtype=jnp.bfloat16)
    assert bf16.layer(0).mlp.up_proj.kernel.dtype == jnp.bfloat16
    batch, _ = packed_batch(DOCS, L, cfg.vocab_size)
    args = (batch["input_ids"], batch["positions"], batch["segment_ids"])
    low, ref = np.asarray(forward(bf16, *args)), np.asarray(forward(model, *args))
    assert low.dtype == np.float32 and np.isfinite(low).all()
    assert np.abs(low - ref).max() < 0.1 * np.abs(ref).max()


def remat_grads(path, remat, _cache={}):
    """Gradients of a masked sum of log-probs on a packed batch (cached per path and policy)."""
    if (path, remat) not in _cache:
        batch, _ = packed_batch([[9, 7], [16]], 16, 384, seed=2)
        args = (batch["input_ids"], batch["positions"], batch["segment_ids"])
        model, _ = load_model(path, dtype=jnp.float32, remat_policy=remat)

        def loss(m):
            logp = jax.nn.log_softmax(m(*args))
            return jnp.sum(jnp.where(batch["segment_ids"][..., None] > 0, logp, 0) ** 2) * 1e-4

        _cache[(path, remat)] = nnx.to_flat_state(nnx.jit(nnx.grad(loss))(model))
    return _cache[(path, remat)]


@pytest.mark.parametrize("policy", ["full", "save_dots", "offload"])
def test_remat_gradients_equal_no_remat(make_checkpoint, policy):
    path = make_checkpoint("one_layer", "llama", num_hidden_layers=1)  # remat wraps each layer; one keeps it fast
    ref, got = remat_grads(path, "none"), remat_grads(path, policy)
    assert [p for p, _ in ref] == [p for p, _ in got]
    for (p, a), (_, b) in zip(ref, got):
        np.testing.assert_allclose(b.get_value(), a.get_value(), atol=1e-6, rtol=1e-5, err_msg=str(p))
    assert max(float(np.abs(a.get_value()).max()) for _, a in ref) > 0


def test_unknown_remat_policy_is_refused():
    cfg = LlamaConfig.from_hf(read_config_dict())
    with pytest.raises(ValueError, match="remat_policy='sometimes'"):
        Llama(cfg, rngs=nnx.Rngs(0), remat_policy="sometimes")


def read_config_dict(**changes):
    hf = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                  vocab_size=100).to_dict()
    hf["architectures"] = ["LlamaForCausalLM"]
    hf.update(changes)
    return hf


def test_config_errors_name_the_field():
    with pytest.raises(ModelConfigError, match="GPT2LMHeadModel"):
        LlamaConfig.from_hf(read_config_dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    with pytest.raises(ModelConfigError, match="model_type='gemma'"):
        LlamaConfig.from_hf({k: v for k, v in read_config_dict(model_type="gemma").items() if k != "architectures"})
    hf = read_config_dict()
    del hf["intermediate_size"]
    with pytest.raises(ModelConfigError, match="'intermediate_size'"):
        LlamaConfig.from_hf(hf)
    with pytest.raises(ModelConfigError, match="'low_freq_factor'"):
        LlamaConfig.from_hf(read_config_dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}))
    with pytest.raises(ModelConfigError, match="use_sliding_window"):
        LlamaConfig.from_hf(read_config_dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                                             use_sliding_window=True))
    with pytest.raises(ModelConfigError, match="layer_types"):
        LlamaConfig.from_hf(read_config_dict(layer_types=["sliding_attention"]))
    with pytest.raises(ModelConfigError, match="yarn"):
        LlamaConfig.from_hf(read_config_dict(rope_parameters={"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e4}))


def test_mistral_refuses_rows_longer_than_its_sliding_window():
    cfg = LlamaConfig.from_hf(dict(read_config_dict(), model_type="mistral", architectures=["MistralForCausalLM"],
                                   sliding_window=8))
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))  # shapes only: nothing is computed or compiled
    ids = jax.ShapeDtypeStruct((1, 9), jnp.int32)
    with pytest.raises(ValueError, match="sliding_window=8"):
        nnx.eval_shape(lambda m, x: m(x, x, x), model, ids)
    ok = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    assert nnx.eval_shape(lambda m, x: m(x, x, x), model, ok).shape == (1, 8, 100)


def test_abstract_init_carries_logical_axes_on_every_param():
    cfg = LlamaConfig.from_hf(read_config_dict(attention_bias=True))
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert len(flat) > 0
    for path, var in flat:
        names = var.get_metadata()["out_sharding"]
        assert isinstance(var.get_value(), jax.ShapeDtypeStruct) and var.get_value().dtype == jnp.bfloat16
        assert len(names) == len(var.shape), path
    named = {".".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in flat}
    assert named["embed_tokens.embedding"] == ("vocab", "embed")
    assert named["layers.self_attn.k_proj.kernel"] == ("layers", "embed", "kv_heads")
    assert named["layers.mlp.down_proj.kernel"] == ("layers", "mlp", "embed")
    assert named["lm_head.kernel"] == ("embed", "vocab")


def test_resize_vocab_grows_rows_like_transformers(checkpoint_dir):
    model, cfg = load_model(checkpoint_dir, dtype=jnp.float32)
    old_emb = np.asarray(model.embed_tokens.embedding.get_value())
    model.resize_vocab(448)
    assert model.cfg.vocab_size == 448 and model.cfg.hf_config["vocab_size"] == 448
    emb = np.asarray(model.embed_tokens.embedding.get_value())
    head = np.asarray(model.lm_head_weight())
    assert emb.shape == (448, 64) and head.shape == (64, 448)
    np.testing.assert_array_equal(emb[:384], old_emb)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    torch.manual_seed(0)
    hf.resize_token_embeddings(448)  # mean_resizing=True: mean + 1e-9 * covariance noise
    np.testing.assert_allclose(emb, hf.get_input_embeddings().weight.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(head.T, hf.get_output_embeddings().weight.detach().numpy(), atol=1e-4)
    batch, _ = packed_batch(DOCS, L, 448, seed=3)
    assert np.isfinite(np.asarray(forward(model, batch["input_ids"], batch["positions"], batch["segment_ids"]))).all()
    with pytest.raises(ValueError, match="drop rows"):
        model.resize_vocab(100)


def test_max_segments_from_the_data_reaches_every_attention_call(monkeypatch):
    """Llama.set_max_segments hands the data's documents-per-row bound to packed attention (cuDNN's static bound,
    and what lets attention_impl="auto" pick cuDNN on a GPU); results are unchanged on the XLA path."""
    from jsft.model import llama as llama_module

    cfg = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    model = Llama(cfg, rngs=nnx.Rngs(0))
    batch, _ = packed_batch([[3, 4, 5]], 16, 32)
    ids, positions, segments = batch["input_ids"], batch["positions"], batch["segment_ids"]
    before = np.asarray(model(ids, positions, segments))
    seen = []
    real = llama_module.packed_attention

    def spy(*args, max_segments=None, **kwargs):
        seen.append(max_segments)
        return real(*args, max_segments=max_segments, **kwargs)

    monkeypatch.setattr(llama_module, "packed_attention", spy)
    model.set_max_segments(3)
    after = np.asarray(model(ids, positions, segments))
    assert seen == [3]  # the one scanned layer body, which runs every layer
    np.testing.assert_array_equal(before, after)
