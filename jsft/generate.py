"""Greedy and sampled decoding, for eval generations, the demo's held-out accuracy and `jsft.chat`.

No KV cache: the model has none, so each new token re-runs the model over a fixed-size buffer [B, T] holding the
prompts and what has been generated so far. The buffer shape is static (T is rounded up to a multiple of 64), so
the whole decode loop is one compiled `lax.while_loop` per (B, T). That costs O(T) forward passes of T tokens: fine
for short evaluation answers and small models, not for long generations with big ones.

Rows are right-padded: row b holds its prompt in [0, len_b) and writes its next token at len_b. Causal attention
means the padding after len_b never influences the token chosen there.

    tokens  [[p p p g g . . .],      lens [5, 3]   next tokens go to columns 5 and 3
             [p p g . . . . .]]
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<|end|>")


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """EOS plus the end-of-turn tokens a chat template closes an assistant turn with (those in the vocab)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab)
    return tuple(sorted(ids))


@partial(nnx.jit, static_argnames=("max_new_tokens", "stop_ids", "temperature", "top_k"))
def _decode(model, tokens, lens, key, *, max_new_tokens: int, stop_ids: tuple, temperature: float, top_k: int | None):
    """tokens [B, T] int32, lens [B] int32 -> (tokens with generations written in, lens after generation)."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    rows = jnp.arange(B)
    stops = jnp.asarray(stop_ids, jnp.int32)
    graphdef, params = nnx.split(model)  # read-only inside the loop

    def choose(logits, key):
        if temperature <= 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / temperature
        if top_k is not None:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    def cond(state):
        i, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tokens, lens, done, key = state
        key, sub = jax.random.split(key)
        segment_ids = (jnp.arange(T)[None, :] < lens[:, None]).astype(jnp.int32)
        logits = nnx.merge(graphdef, params)(tokens, positions, segment_ids)[rows, lens - 1]
        nxt = choose(logits.astype(jnp.float32), sub)
        write = ~done & (lens < T)
        at = jnp.minimum(lens, T - 1)
        tokens = tokens.at[rows, at].set(jnp.where(write, nxt, tokens[rows, at]))
        lens = lens + write.astype(jnp.int32)
        done = done | ~write | jnp.isin(nxt, stops)
        return i + 1, tokens, lens, done, key

    done = jnp.zeros((B,), bool)
    _, tokens, lens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), tokens, lens, done, key))
    return tokens, lens


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, stop_ids=(), pad_id: int = 0,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0, batch_size: int = 64,
             keep_stop: bool = False) -> list[list[int]]:
    """Continue each prompt (a list of token ids); returns the new tokens of each (without the stop token unless
    keep_stop). temperature 0 = greedy (argmax, first maximum on ties); otherwise sampling, optionally top-k."""
    out = []
    longest = max(len(p) for p in prompts) if prompts else 0
    T = 64 * math.ceil((longest + max_new_tokens) / 64)
    key = jax.random.key(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        B = batch_size if len(prompts) > batch_size else len(chunk)  # one shape for every chunk
        tokens = np.full((B, T), pad_id, np.int32)
        lens = np.ones((B,), np.int32)
        for b, p in enumerate(chunk):
            if not p:
                raise ValueError(f"prompt {start + b} is empty: generation needs at least one token")
            tokens[b, : len(p)] = p
            lens[b] = len(p)
        key, sub = jax.random.split(key)
        new_tokens, new_lens = _decode(model, jnp.asarray(tokens), jnp.asarray(lens), sub,
                                       max_new_tokens=max_new_tokens, stop_ids=tuple(int(s) for s in stop_ids),
                                       temperature=float(temperature), top_k=top_k)
        new_tokens, new_lens = np.asarray(new_tokens), np.asarray(new_lens)
        for b, p in enumerate(chunk):
            gen = new_tokens[b, len(p) : new_lens[b]].tolist()
            if gen and gen[-1] in stop_ids and not keep_stop:
                gen = gen[:-1]
            out.append(gen)
    return out


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of a conversation rendered with the generation prompt (ready for the assistant's turn)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def chat_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64, **kwargs) -> list[str]:
    """Greedy (by default) assistant replies to conversations that end with a user turn."""
    prompts = [chat_prompt_ids(tokenizer, c) for c in conversations]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gens = generate(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(tokenizer), pad_id=pad,
                    **kwargs)
    return [tokenizer.decode(g, skip_special_tokens=True).strip() for g in gens]
