"""Decoding with a KV cache: the cache gives the full model's logits at every step, greedy ids equal transformers'
generate, sampling is seeded and honours top-k / top-p, rows stop at their stop token, one compile per bucket."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jsft import fixtures
from jsft.generate import _decode, decode_batch, generate, sample
from jsft.model.llama import Llama, LlamaConfig
from jsft.model.lora import apply_lora, lora_modules

VOCAB = 48


def tiny_llama(seed=0, **overrides):
    hf = dict(fixtures.TINY_LLAMA, vocab_size=VOCAB, **{"model_type": "llama", **overrides})
    return Llama(LlamaConfig.from_hf(hf), rngs=nnx.Rngs(seed))


@nnx.jit
def last_logits(model, ids, length):
    """Logits at position length-1 of one sequence held in a fixed [1, 32] buffer (padding: segment 0)."""
    segment_ids = (jnp.arange(ids.shape[1]) < length).astype(jnp.int32)[None]
    return model(ids, jnp.arange(ids.shape[1], dtype=jnp.int32)[None], segment_ids)[0, length - 1]


def naive_greedy(model, prompt, max_new_tokens, stop_ids):
    """One sequence at a time: re-run the full model on everything so far, take the argmax, append, repeat."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        ids = jnp.asarray([seq + [0] * (32 - len(seq))], jnp.int32)
        nxt = int(jnp.argmax(last_logits(model, ids, len(seq))))
        seq.append(nxt)
        if nxt in stop_ids:
            break
    return seq[len(prompt):]


# ----------------------------------------------------------------------------------------------- the model's cache


@nnx.jit
def forward(model, ids, positions, segment_ids):
    return model(ids, positions, segment_ids)


@partial(nnx.jit, static_argnames="last_only")
def cached_step(model, ids, positions, mask, cache, last_only=False):
    return model.decode(ids, positions, mask, cache, last_only=last_only)


def with_lora(model):
    """LoRA on every projection with random (non-zero) B, dropout 0.5, in eval mode."""
    apply_lora(model, r=4, alpha=8.0, dropout=0.5, rngs=nnx.Rngs(1))
    for i, module in enumerate(lora_modules(model).values()):
        module.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), module.lora_b.shape)
    model.eval()
    return model


MODELS = {  # name -> config overrides; TINY_LLAMA has 4 query heads and 2 kv heads (GQA)
    "llama_lora": {},  # LoRA on every projection, in eval mode
    "qwen3_bias": {"model_type": "qwen3", "attention_bias": True},  # q/k norm, qkv and o_proj biases
}


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_logits_equal_full_recompute_at_every_step(name):
    """Prefill ragged prompts (rows padded on the left, on the right, or not at all), then feed 4 more tokens one
    at a time: each step's logits equal the full model's logits over the whole sequence so far, row by row."""
    model = tiny_llama(3, **MODELS[name])
    if name.endswith("lora"):
        model = with_lora(model)
    rng = np.random.default_rng(0)
    lengths, pads, steps, P = [3, 8, 1, 5], ["left", "none", "right", "right"], 4, 8
    seqs = [rng.integers(2, VOCAB, n + steps).astype(np.int32) for n in lengths]
    width = max(lengths) + steps  # the plain forward over each whole row, right-padded (segment 0)
    rows, segments = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs), width), np.int32)
    for b, s in enumerate(seqs):
        rows[b, : len(s)], segments[b, : len(s)] = s, 1
    full = np.asarray(forward(model, rows, np.broadcast_to(np.arange(width, dtype=np.int32), rows.shape), segments))

    B = len(lengths)
    ids, pos, mask = np.zeros((B, P), np.int32), np.zeros((B, P), np.int32), np.zeros((B, P), bool)
    last = []  # the slot of each row's last prompt token
    for b, (n, pad) in enumerate(zip(lengths, pads)):
        start = P - n if pad == "left" else 0
        ids[b, start:start + n], pos[b, start:start + n], mask[b, start:start + n] = seqs[b][:n], np.arange(n), True
        last.append(start + n - 1)
    logits, cache = cached_step(model, ids, pos, mask, model.init_cache(B, P + steps + 4))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(logits)[b, last[b]], full[b, n - 1], atol=1e-4, rtol=0)
    last_only, _ = cached_step(model, ids, pos, mask, model.init_cache(B, P + steps + 4), last_only=True)
    np.testing.assert_allclose(np.asarray(last_only)[:, 0], np.asarray(logits)[:, -1], atol=1e-5, rtol=0)
    for k in range(steps):
        token = np.array([[s[n + k]] for s, n in zip(seqs, lengths)], np.int32)
        position = np.array([[n + k] for n in lengths], np.int32)
        logits, cache = cached_step(model, token, position, np.ones((B, 1), bool), cache)
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(np.asarray(logits)[b, 0], full[b, n + k], atol=1e-4, rtol=0)
    assert int(cache.index) == P + steps
    assert np.asarray(cache.valid).sum(axis=1).tolist() == [n + steps for n in lengths]


# ----------------------------------------------------------------------------------------------- greedy decoding


@pytest.mark.parametrize("name, architecture", [("llama", "llama"), ("qwen3", "qwen3")])
def test_greedy_ids_equal_transformers_generate(make_checkpoint, name, architecture):
    """A batch of prompts of different lengths, greedy, stop at EOS: the same ids as transformers'
    generate(do_sample=False) on each prompt alone."""
    import torch
    import transformers

    from jsft.hf import load_model

    path = make_checkpoint(name, architecture)
    model, cfg = load_model(path, dtype=jnp.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, cfg.vocab_size, n).tolist() for n in (5, 17, 1, 30)]
    got = generate(model, prompts, max_new_tokens=12, stop_ids=(0,), pad_id=1, keep_stop=True)
    want = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=12, do_sample=False, eos_token_id=0, pad_token_id=1)
            want.append(out[0, len(p):].tolist())
    assert got == want


def test_greedy_matches_full_model_argmax_for_ragged_prompts():
    model = tiny_llama()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, VOCAB, n).tolist() for n in (3, 9, 1, 14)]
    got = generate(model, prompts, max_new_tokens=8, keep_stop=True)
    want = [naive_greedy(model, p, 8, ()) for p in prompts]
    assert got == want
    assert all(len(g) == 8 for g in got)


def test_batches_of_one_shape_give_what_each_prompt_gives_alone():
    model = tiny_llama(4)
    prompts = [[5, 6, 7], [9, 3], [11], [4, 4, 4, 4], [8, 2, 9]]
    got = generate(model, prompts, max_new_tokens=6, batch_size=2, keep_stop=True)  # 3 batches, the last padded
    assert got == [naive_greedy(model, p, 6, ()) for p in prompts]


def test_rows_stop_at_their_stop_token_and_pad_after_it():
    model = tiny_llama(1)
    prompts = [[5, 6, 7], [9, 3]]
    free = generate(model, prompts, max_new_tokens=6, keep_stop=True)
    stop = free[0][2]  # make row 0 stop at its third token
    got = generate(model, prompts, max_new_tokens=6, stop_ids=(stop,), keep_stop=True)
    assert got == [naive_greedy(model, p, 6, (stop,)) for p in prompts]
    assert got[0] == free[0][: free[0].index(stop) + 1]
    assert generate(model, prompts, max_new_tokens=6, stop_ids=(stop,))[0] == got[0][:-1]
    tokens, counts = decode_batch(model, prompts, max_new_tokens=6, stop_ids=(stop,), pad_id=47)
    n = len(got[0])
    assert counts[0] == n and tokens[0, :n].tolist() == got[0] and tokens[0, n:].tolist() == [47] * (6 - n)


# ----------------------------------------------------------------------------------------------- sampling


def test_sampling_is_seeded_and_top_1_is_greedy():
    model = tiny_llama(2)
    prompts = [[4, 5, 6], [7]]
    greedy = generate(model, prompts, max_new_tokens=5)
    assert generate(model, prompts, max_new_tokens=5, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(model, prompts, max_new_tokens=5, temperature=1.0, top_p=1e-6, seed=3) == greedy
    a = generate(model, prompts, max_new_tokens=5, temperature=2.0, seed=7)
    assert a == generate(model, prompts, max_new_tokens=5, temperature=2.0, seed=7)
    assert a != generate(model, prompts, max_new_tokens=5, temperature=2.0, seed=8)


def test_top_k_and_top_p_keep_the_right_tokens():
    """probs [0.5, 0.3, 0.15, 0.05]: top_p 0.7 keeps the first two, 0.5 the first, 0.81 three; top_k 3 three
    (top_k 0 and top_p 1 keep all); what is kept is drawn in proportion to its probability."""
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]] * 4000))
    key, draw = jax.random.key(0), jax.jit(sample)  # settings are traced: one compile for all of them
    for top_k, top_p, support in [(0, 0.7, {1, 3}), (0, 0.5, {1}), (0, 0.81, {1, 2, 3}), (3, 1.0, {1, 2, 3}),
                                  (3, 0.7, {1, 3}), (1, 1.0, {1}), (0, 1.0, {0, 1, 2, 3})]:
        drawn = np.asarray(draw(logits, key, 1.0, top_k, top_p))
        assert set(drawn.tolist()) == support, (top_k, top_p)
    freq = np.bincount(np.asarray(draw(logits, key, 1.0, 0, 0.7)), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=0.03)


def test_generation_turns_lora_dropout_off_and_leaves_the_model_in_train_mode():
    model = with_lora(tiny_llama(5))
    prompts = [[3, 4, 5], [6]]
    want = generate(model, prompts, max_new_tokens=6)
    model.train()
    assert generate(model, prompts, max_new_tokens=6) == want
    assert all(not m.dropout.deterministic for m in lora_modules(model).values())


# ----------------------------------------------------------------------------------------------- compiling


def test_one_compile_per_bucket_across_tokens_prompts_and_settings():
    """32 new tokens, then other prompts, max_new_tokens, stop ids and sampling settings in the same bucket:
    the decode loop compiled once."""
    model = tiny_llama(6, num_hidden_layers=1)  # a shape no other test compiles
    before = _decode._cache_size()
    assert len(generate(model, [[1, 2, 3], [4]], max_new_tokens=32)[0]) == 32
    generate(model, [[5] * 20, [6, 7]], max_new_tokens=9, seed=1, stop_ids=(3, 4))
    generate(model, [[8, 9], [1]], max_new_tokens=17, temperature=0.7, top_k=5, top_p=0.9)
    assert _decode._cache_size() == before + 1
