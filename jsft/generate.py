"""Greedy and sampled decoding with a KV cache, for eval generations, the demo's held-out accuracy and `jsft.chat`.

One compiled function does a whole batch: a prefill of the left-padded prompts fills the model's KV cache
(Llama.init_cache / Llama.decode), then a `lax.while_loop` runs one decode step per token (one new token per row
against the cache) until every row has given a stop token or max_new_tokens are out. Shapes are bucketed (prompt
slots P and new-token slots N to multiples of 32) and the sampling settings are traced values, so other prompts,
another max_new_tokens or other settings in the same bucket reuse the compiled code: one compile per (batch, P, N).
The model runs in eval mode (LoRA dropout off) whatever mode it is in; its mode is left as it was.

Each row keeps its own RoPE positions; padding slots are never attended. After a row's stop token come pad ids:

    cache slots     prompt (P = 8, left-padded)   generated (N = 4)
    row 0           .  .  .  .  .  a  b  c        x  y  <stop>  pad      positions 0 1 2 | 3 4 5
    row 1           .  .  d  e  f  g  h  i        u  v  w       z        positions 0 .. 5 | 6 7 8 9
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<|end|>")
BUCKET = 32  # prompt slots and new-token slots are rounded up to a multiple of this


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """EOS plus the end-of-turn tokens a chat template closes an assistant turn with (those in the vocab)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab)
    return tuple(sorted(ids))


def sample(logits, key, temperature, top_k=0, top_p=1.0):
    """Next tokens [B] from logits [B, V]: argmax when temperature <= 0 (first maximum on ties); else a draw from
    softmax(logits / temperature) kept to the top_k most likely tokens (0: all), then to the fewest most likely
    tokens whose probability reaches top_p (transformers' order: temperature, top-k, top-p). The settings may be
    traced values: one compiled function serves every setting, and greedy decoding never sorts the vocabulary.

        probs [0.5, 0.3, 0.15, 0.05], top_p 0.7 -> draws token 0 or 1, with probabilities 0.625 and 0.375
    """

    def draw(logits):
        logits = logits.astype(jnp.float32) / temperature
        ordered = -jnp.sort(-logits, axis=-1)  # most likely first
        rank = jnp.arange(logits.shape[-1])
        ordered = jnp.where((top_k <= 0) | (rank < top_k), ordered, -jnp.inf)
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above this one
        kept = (rank == 0) | (((before < top_p) | (top_p >= 1.0)) & (ordered > -jnp.inf))
        cutoff = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
        return jax.random.categorical(key, jnp.where(logits < cutoff, -jnp.inf, logits), axis=-1).astype(jnp.int32)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, greedy, logits)


@partial(jax.jit, static_argnames=("graphdef", "new_slots"))
def _decode(graphdef, state, prompts, mask, max_new_tokens, stops, pad_id, key, temperature, top_k, top_p, *,
            new_slots: int):
    """prompts, mask [B, P] (left-padded) -> (new tokens [B, new_slots], pad after a stop; count [B], stop included).

    Prefill, then a while_loop of decode steps: step i feeds token i - 1 of each row (slot P + i - 1, position
    length + i - 1) and picks token i. Rows that are done get pad_id and stop counting.
    """
    model = nnx.merge(graphdef, state)
    B, P = prompts.shape
    choose = partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
    lengths = mask.sum(axis=1, dtype=jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)

    def emit(i, token, out, done, count):
        token = jnp.where(done, pad_id, token)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        return out, done | jnp.isin(token, stops), count + (~done).astype(jnp.int32)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, out, done, count, key = carry
        key, sub = jax.random.split(key)
        previous = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
        logits, cache = model.decode(previous, (lengths + i - 1)[:, None], jnp.ones((B, 1), bool), cache)
        out, done, count = emit(i, choose(logits[:, 0], sub), out, done, count)
        return i + 1, cache, out, done, count, key

    key, sub = jax.random.split(key)
    logits, cache = model.decode(prompts, positions, mask, model.init_cache(B, P + new_slots), last_only=True)
    out = jnp.full((B, new_slots), pad_id, jnp.int32)
    out, done, count = emit(0, choose(logits[:, 0], sub), out, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))
    carry = (jnp.asarray(1, jnp.int32), cache, out, done, count, key)
    _, _, out, _, count, _ = jax.lax.while_loop(cond, body, carry)
    return out, count


def _eval_split(model):
    """nnx.split of an eval-mode view of the model (dropout off), leaving the model itself in its own mode."""
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)  # new module objects over the same arrays
    view.eval()
    return nnx.split(view)


def _round_up(n: int, multiple: int = BUCKET) -> int:
    return multiple * max(1, math.ceil(n / multiple))


def decode_batch(model, prompts: list[list[int]], *, max_new_tokens: int, stop_ids=(), pad_id: int = 0,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, key=None,
                 rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One batch of prompts (lists of token ids) -> (tokens [len(prompts), max_new_tokens] int32, counts [len]).

    Row b's new tokens are tokens[b, :counts[b]] (its stop token last, if it gave one), pad_id after. `rows` pads
    the batch with dummy prompts to that many rows, so batches of different sizes share one compiled shape.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: must be >= 1 (or None for no top-k)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1] (or None for no top-p)")
    for b, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {b} is empty: generation needs at least one token")
    B = max(rows or 0, len(prompts))
    P = _round_up(max(len(p) for p in prompts))
    tokens = np.full((B, P), pad_id, np.int32)
    mask = np.zeros((B, P), bool)
    mask[len(prompts):, -1] = True  # dummy rows: one pad token
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = p
        mask[b, P - len(p):] = True
    stops = np.full(_round_up(len(stop_ids), 8), -1, np.int32)  # -1 never matches; a fixed shape per 8 ids
    stops[: len(stop_ids)] = stop_ids
    graphdef, state = _eval_split(model)
    key = jax.random.key(0) if key is None else key
    settings = jnp.float32(temperature), jnp.int32(top_k or 0), jnp.float32(1.0 if top_p is None else top_p)
    out, count = _decode(graphdef, state, tokens, mask, jnp.int32(max_new_tokens), stops, jnp.int32(pad_id), key,
                         *settings, new_slots=_round_up(max_new_tokens))
    return np.asarray(out)[: len(prompts), :max_new_tokens], np.asarray(count)[: len(prompts)]


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, stop_ids=(), pad_id: int = 0,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             batch_size: int = 64, keep_stop: bool = False) -> list[list[int]]:
    """Continue each prompt (a list of token ids); returns the new tokens of each (without the stop token unless
    keep_stop). temperature 0 = greedy (argmax, first maximum on ties); otherwise sampling, with optional top-k and
    top-p. Prompts go in batches of batch_size (all of one shape); the same seed gives the same tokens."""
    stop_ids = tuple(int(s) for s in stop_ids)
    rows = batch_size if len(prompts) > batch_size else None
    key = jax.random.key(seed)
    out = []
    for start in range(0, len(prompts), batch_size):
        key, sub = jax.random.split(key)
        tokens, counts = decode_batch(model, prompts[start : start + batch_size], max_new_tokens=max_new_tokens,
                                      stop_ids=stop_ids, pad_id=pad_id, temperature=temperature, top_k=top_k,
                                      top_p=top_p, key=sub, rows=rows)
        for row, n in zip(tokens, counts):
            gen = row[:n].tolist()
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
