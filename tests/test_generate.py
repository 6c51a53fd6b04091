"""Decoding: the compiled fixed-buffer loop picks exactly what argmax over the full model picks, step by step."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsft import fixtures
from jsft.generate import generate
from jsft.model.llama import Llama, LlamaConfig

VOCAB = 48


def tiny_llama(seed=0):
    hf = dict(fixtures.TINY_LLAMA, vocab_size=VOCAB, model_type="llama")
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


def test_greedy_matches_full_model_argmax_for_ragged_prompts():
    model = tiny_llama()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, VOCAB, n).tolist() for n in (3, 9, 1, 14)]
    got = generate(model, prompts, max_new_tokens=8, keep_stop=True)
    want = [naive_greedy(model, p, 8, ()) for p in prompts]
    assert got == want
    assert all(len(g) == 8 for g in got)


def test_generation_stops_at_a_stop_token_per_row():
    model = tiny_llama(1)
    prompts = [[5, 6, 7], [9, 3]]
    free = generate(model, prompts, max_new_tokens=6, keep_stop=True)
    stop = free[0][2]  # make row 0 stop at its third token
    got = generate(model, prompts, max_new_tokens=6, stop_ids=(stop,), keep_stop=True)
    assert got == [naive_greedy(model, p, 6, (stop,)) for p in prompts]
    assert got[0] == free[0][: free[0].index(stop) + 1]
    assert generate(model, prompts, max_new_tokens=6, stop_ids=(stop,))[0] == got[0][:-1]


def test_sampling_is_seeded_and_follows_top_1():
    model = tiny_llama(2)
    prompts = [[4, 5, 6]]
    greedy = generate(model, prompts, max_new_tokens=5)
    assert generate(model, prompts, max_new_tokens=5, temperature=1.0, top_k=1, seed=3) == greedy
    a = generate(model, prompts, max_new_tokens=5, temperature=2.0, seed=7)
    assert a == generate(model, prompts, max_new_tokens=5, temperature=2.0, seed=7)
