"""HF checkpoints <-> jsft: round trips through transformers, bf16, shards, sharded loading, clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jsft.hf import CheckpointError, base_params, hf_to_jsft, jsft_to_hf, load_model, save_model
from jsft.model.llama import ModelConfigError

L = 24


@nnx.jit
def forward(model, ids):
    B, n = ids.shape
    return model(ids, jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n)), jnp.ones((B, n), jnp.int32))


def ids_batch(vocab=384, seed=0):
    return np.random.RandomState(seed).randint(2, vocab, size=(2, L)).astype(np.int32)


def hf_logits(path, ids, dtype=torch.float32):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def test_the_table_maps_names_both_ways():
    assert hf_to_jsft("model.layers.11.self_attn.q_proj.weight") == ("layers.11.self_attn.q_proj.kernel", True)
    assert hf_to_jsft("model.layers.0.self_attn.k_norm.weight") == ("layers.0.self_attn.k_norm.scale", False)
    assert hf_to_jsft("model.layers.2.post_attention_layernorm.weight") == (
        "layers.2.post_attention_layernorm.scale", False)
    assert hf_to_jsft("model.embed_tokens.weight") == ("embed_tokens.embedding", False)
    assert hf_to_jsft("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    for name in ("model.layers.3.mlp.down_proj.weight", "model.layers.0.self_attn.v_proj.bias", "lm_head.weight",
                 "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert jsft_to_hf(hf_to_jsft(name)[0]) == (name, hf_to_jsft(name)[1])


def test_round_trip_through_transformers_keeps_logits(checkpoint_dir, tokenizer, tmp_path):
    model, cfg = load_model(checkpoint_dir, dtype=jnp.float32)
    ids = ids_batch()
    ours = np.asarray(forward(model, ids))
    np.testing.assert_allclose(ours, hf_logits(checkpoint_dir, ids), atol=1e-4, rtol=0)
    out = save_model(model, tmp_path / "export", tokenizer=tokenizer)
    assert sorted(p.name for p in out.glob("*.json")) >= ["config.json", "generation_config.json", "tokenizer.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["vocab_size"] == 384 and config["architectures"] == [
        "LlamaForCausalLM"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
    np.testing.assert_allclose(hf_logits(out, ids), ours, atol=1e-4, rtol=0)
    again, _ = load_model(out, dtype=jnp.float32)
    for (p, a), b in zip(base_params(model).items(), base_params(again).values()):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=p)
    assert transformers.AutoTokenizer.from_pretrained(out).encode("four zero") == tokenizer.encode("four zero")


def test_tied_checkpoint_round_trip_writes_no_lm_head(make_checkpoint, tmp_path):
    path = make_checkpoint("tied", "llama", tie_word_embeddings=True)
    model, _ = load_model(path, dtype=jnp.float32)
    out = save_model(model, tmp_path / "tied")
    with safe_open(out / "model.safetensors", "np") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    ids = ids_batch()
    np.testing.assert_allclose(hf_logits(out, ids), hf_logits(path, ids), atol=1e-5, rtol=0)


def test_sharded_safetensors_round_trip(make_checkpoint, tmp_path):
    path = make_checkpoint("qwen3", "qwen3")
    model, _ = load_model(path, dtype=jnp.float32)
    out = save_model(model, tmp_path / "sharded", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 4 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(
        v.nbytes for f in files for v in load_file(out / f).values())
    ids = ids_batch()
    ref = hf_logits(path, ids)
    np.testing.assert_allclose(hf_logits(out, ids), ref, atol=1e-4, rtol=0)
    again, _ = load_model(out, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(forward(again, ids)), ref, atol=1e-4, rtol=0)


def test_bf16_checkpoint_loads_and_saves_as_bf16(make_checkpoint, tmp_path):
    path = make_checkpoint("bf16", "llama", dtype="bfloat16")
    with safe_open(path / "model.safetensors", "np") as f:
        assert f.get_tensor("model.norm.weight").dtype == ml_dtypes.bfloat16
    ids = ids_batch()
    ref = hf_logits(path, ids)  # bf16 weights upcast exactly to fp32 by transformers
    as_fp32, _ = load_model(path, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(forward(as_fp32, ids)), ref, atol=1e-4, rtol=0)
    as_bf16, _ = load_model(path, dtype="bfloat16")
    assert as_bf16.embed_tokens.embedding.dtype == jnp.bfloat16
    low = np.asarray(forward(as_bf16, ids))
    assert np.abs(low - ref).max() < 0.05 * np.abs(ref).max()
    out = save_model(as_bf16, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "np") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(load_file(out / "model.safetensors")["model.layers.1.self_attn.o_proj.weight"],
                                  load_file(path / "model.safetensors")["model.layers.1.self_attn.o_proj.weight"])


def test_loading_with_shardings_places_each_tensor(checkpoint_dir):
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("fsdp", "tensor"))
    rules = {"vocab": "tensor", "embed": "fsdp", "mlp": "tensor", "q_heads": "tensor", "kv_heads": "tensor"}

    def sharding(path, var):
        names = var.get_metadata()["out_sharding"]
        return NamedSharding(mesh, PartitionSpec(*(rules.get(n) for n in names)))

    plain, _ = load_model(checkpoint_dir, dtype=jnp.float32)
    sharded, _ = load_model(checkpoint_dir, dtype=jnp.float32, shardings=sharding)
    kernel = sharded.layer(0).mlp.down_proj.kernel.get_value()  # [mlp 128, embed 64]
    assert kernel.sharding == NamedSharding(mesh, PartitionSpec("tensor", "fsdp"))
    assert kernel.addressable_shards[0].data.shape == (32, 32)
    for (p, a), b in zip(base_params(plain).items(), base_params(sharded).values()):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=p)
    ids = ids_batch()
    np.testing.assert_allclose(np.asarray(forward(sharded, ids)), np.asarray(forward(plain, ids)), atol=1e-5)


def test_loading_with_the_sharding_modules_placement(checkpoint_dir):
    from jsft import sharding

    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract, _ = load_model(checkpoint_dir, dtype=jnp.float32)  # any model of the same shapes
    shardings = sharding.model_shardings(nnx.state(abstract, nnx.Param), mesh)
    model, _ = load_model(checkpoint_dir, dtype=jnp.float32, shardings=shardings)
    embedding = model.embed_tokens.embedding.get_value()
    assert embedding.sharding.spec == PartitionSpec("tensor", "fsdp")
    np.testing.assert_array_equal(np.asarray(embedding), np.asarray(abstract.embed_tokens.embedding.get_value()))


# ----------------------------------------------------------------------------------------------- bad checkpoints


def broken_copy(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_missing_tensor_is_named(checkpoint_dir, tmp_path):
    path = broken_copy(checkpoint_dir, tmp_path / "c", lambda t: t.pop("model.layers.1.mlp.gate_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.gate_proj\.weight'"):
        load_model(path)


def test_unexpected_tensor_is_named(checkpoint_dir, tmp_path):
    def add(t):
        t["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)

    path = broken_copy(checkpoint_dir, tmp_path / "c", add)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_norm\.weight'"):
        load_model(path)
    path = broken_copy(checkpoint_dir, tmp_path / "d", lambda t: t.update(extra_head=np.ones(3, np.float32)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'extra_head'"):
        load_model(path)


def test_wrong_shape_names_the_tensor_and_both_shapes(checkpoint_dir, tmp_path):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16]

    path = broken_copy(checkpoint_dir, tmp_path / "c", shrink)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[16, 64\] "
                                              r"in the checkpoint but the model expects \[32, 64\]"):
        load_model(path)


def test_unknown_architecture_and_missing_field_are_named(checkpoint_dir, tmp_path):
    path = broken_copy(checkpoint_dir, tmp_path / "c", edit_config=lambda c: c.update(
        architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    with pytest.raises(ModelConfigError, match="'GPT2LMHeadModel' is not supported"):
        load_model(path)
    path = broken_copy(checkpoint_dir, tmp_path / "d", edit_config=lambda c: c.pop("num_attention_heads"))
    with pytest.raises(ModelConfigError, match="missing the required field 'num_attention_heads'"):
        load_model(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_a_randomly_initialized_model_exports_to_transformers(tmp_path):
    """jsft -> HF direction from scratch: a config dict without `architectures` still exports a loadable model."""
    from jsft.model.llama import Llama, LlamaConfig

    hf = dict(model_type="qwen3", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, tie_word_embeddings=True)
    model = nnx.jit(lambda: Llama(LlamaConfig.from_hf(hf), rngs=nnx.Rngs(0)))()
    out = save_model(model, tmp_path / "scratch")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    ids = ids_batch(vocab=96)
    np.testing.assert_allclose(hf_logits(out, ids), np.asarray(forward(model, ids)), atol=1e-4, rtol=0)


def test_config_json_is_read_the_way_transformers_reads_it(checkpoint_dir, make_checkpoint, tmp_path):
    """A legacy rope_scaling next to transformers 5's rope_parameters wins, as in transformers (context extension
    recipes add it); keys a config.json lacks take the transformers class default (Mistral's sliding_window 4096),
    so jsft and transformers run the same model."""
    path = broken_copy(checkpoint_dir, tmp_path / "rope", edit_config=lambda c: c.update(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rope_scaling={"rope_type": "linear", "factor": 4.0}))
    model, cfg = load_model(path, dtype="float32")
    assert dict(cfg.rope)["rope_type"] == "linear"
    ids = ids_batch()
    np.testing.assert_allclose(np.asarray(forward(model, ids)), hf_logits(path, ids), atol=1e-4, rtol=0)
    exported = save_model(model, tmp_path / "rope_export")
    np.testing.assert_allclose(hf_logits(exported, ids), hf_logits(path, ids), atol=1e-4, rtol=0)

    mistral = broken_copy(make_checkpoint("mistral", "mistral"), tmp_path / "mistral",
                          edit_config=lambda c: c.pop("sliding_window", None))
    _, cfg = load_model(mistral, dtype="float32")
    assert cfg.sliding_window == transformers.AutoConfig.from_pretrained(mistral).sliding_window == 4096


def test_models_differing_only_in_config_metadata_keep_their_own_config(checkpoint_dir, tmp_path):
    """A jitted function traced for model A and called with model B (same shapes, other eos id / lengths) must not
    hand B A's config, or B's export writes A's config.json."""
    from jsft import step

    b_path = broken_copy(checkpoint_dir, tmp_path / "b", edit_config=lambda c: c.update(
        eos_token_id=5, max_position_embeddings=4096))
    a, _ = load_model(checkpoint_dir, dtype="float32")
    b, _ = load_model(b_path, dtype="float32")
    z = jnp.zeros((1, 8), jnp.int32)
    batch = dict(input_ids=z, positions=jnp.arange(8, dtype=jnp.int32)[None], segment_ids=z + 1, targets=z,
                 loss_mask=jnp.ones((1, 8), bool))
    step.eval_step(a, batch)
    step.eval_step(b, batch)
    assert b.cfg.hf_config["eos_token_id"] == 5 and b.cfg.hf_config["max_position_embeddings"] == 4096
    config = json.loads((save_model(b, tmp_path / "b_export") / "config.json").read_text())
    assert config["eos_token_id"] == 5 and config["max_position_embeddings"] == 4096


def overwrite_tensor(file, name, payload):
    """Replace the bytes of one tensor in a safetensors file (its header stays valid): payload(nbytes) -> bytes."""
    raw = bytearray(file.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start, stop = json.loads(raw[8:8 + n])[name]["data_offsets"]
    raw[8 + n + start:8 + n + stop] = payload(stop - start)
    file.write_bytes(bytes(raw))


def test_non_finite_weights_are_named_with_the_tensor_and_file(checkpoint_dir, make_checkpoint, tmp_path):
    """A NaN or random bytes in one tensor of the input checkpoint is an error naming the tensor and file (jsft used
    to train NaN to the end, exit 0). Checked after the cast to the load dtype, on every slice a device reads;
    weights that are huge but finite (their float32 sum overflows) pass."""
    def set_value(name, index, value):
        return lambda t: t[name].__setitem__(index, value)

    nan = broken_copy(checkpoint_dir, tmp_path / "nan", set_value("model.layers.1.mlp.up_proj.weight", (5, 7), np.nan))
    with pytest.raises(CheckpointError, match=r"nan/model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' "
                                              r"holds 1 non-finite value\(s\) \(NaN or inf\) of 8,192: the file is "
                                              r"damaged.*Fix: download or copy it again"):
        load_model(nan, dtype=jnp.float32)

    noise = shutil.copytree(make_checkpoint("bf16", "llama", dtype="bfloat16"), tmp_path / "noise")
    overwrite_tensor(noise / "model.safetensors", "model.layers.0.self_attn.o_proj.weight",
                     lambda n: np.random.RandomState(0).bytes(n))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' holds [0-9,]+ "
                                              r"non-finite value\(s\) \(NaN or inf\) of (1,024|512|256)"):  # a slice
        load_model(noise, shardings=lambda p, v: NamedSharding(mesh, PartitionSpec(None, "fsdp", "tensor")
                                                               if len(v.shape) == 3 else PartitionSpec()))

    huge = broken_copy(checkpoint_dir, tmp_path / "huge", set_value("model.norm.weight", slice(0, 2), 3.4e38))
    model, _ = load_model(huge, dtype=jnp.float32)  # finite in float32 (their sum is not)
    assert float(model.norm.scale[...][0]) == pytest.approx(3.4e38)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' holds 2 non-finite"):
        load_model(huge, dtype=jnp.bfloat16)  # 3.4e38 is past bfloat16's largest value: inf after the cast


def test_a_tied_config_with_its_own_head_loads_the_head_as_transformers_does(checkpoint_dir, tmp_path):
    """config.json says tie_word_embeddings=true, yet the files hold an lm_head.weight unlike the embedding:
    transformers keeps that head (untied, with a warning); jsft did drop it without a word. Now it loads it too, warns
    naming both, gives transformers' logits and exports untied. A head equal to the embedding is tied, silently."""
    import warnings

    path = broken_copy(checkpoint_dir, tmp_path / "tied_head", edit_config=lambda c: c.update(tie_word_embeddings=True))
    with pytest.warns(UserWarning, match=r"tie_word_embeddings=true but the files hold an lm_head\.weight that "
                                         r"differs from model\.embed_tokens\.weight; loading both, untied, as "
                                         r"transformers does"):
        model, cfg = load_model(path, dtype=jnp.float32)
    assert not cfg.tie_word_embeddings and transformers.AutoConfig.from_pretrained(path).tie_word_embeddings
    ids = ids_batch()
    np.testing.assert_allclose(np.asarray(forward(model, ids)), hf_logits(path, ids), atol=1e-4, rtol=0)
    out = save_model(model, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_allclose(hf_logits(out, ids), hf_logits(path, ids), atol=1e-4, rtol=0)

    same = broken_copy(checkpoint_dir, tmp_path / "same_head",
                       lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()),
                       lambda c: c.update(tie_word_embeddings=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, cfg = load_model(same, dtype=jnp.float32)
    assert cfg.tie_word_embeddings and not any("tie_word_embeddings" in str(w.message) for w in caught)
    np.testing.assert_allclose(np.asarray(forward(model, ids)), hf_logits(same, ids), atol=1e-4, rtol=0)


def test_a_truncated_missing_or_broken_checkpoint_file_is_named(checkpoint_dir, make_checkpoint, tmp_path):
    """A truncated model.safetensors, a shard the index lists but the directory lacks, a damaged config.json: each is
    a CheckpointError naming the file and the fix (raw SafetensorError / FileNotFoundError / JSONDecodeError before)."""
    cut = shutil.copytree(checkpoint_dir, tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut/model\.safetensors is not a readable safetensors file \(Error "
                                              r"while deserializing header: incomplete metadata.*Fix: download or "
                                              r"copy it again"):
        load_model(cut)
    model, _ = load_model(make_checkpoint("qwen3", "qwen3"), dtype=jnp.float32)
    sharded = save_model(model, tmp_path / "sharded", max_shard_bytes=60_000)
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name} is missing \(model\.safetensors\.index\.json lists it\)"):
        load_model(sharded)
    (cut / "config.json").write_text('{"vocab_size": 384, "hidden')
    with pytest.raises(CheckpointError, match=r"cut/config\.json is not valid JSON"):
        load_model(cut)
