"""A tiny causal LM with jsft's model interface, for tests of the step/train machinery.

It mixes tokens with a causal, segment-masked mean (so documents in a packed row cannot see each other) and has
the interface of jsft.model.llama.Llama that the step needs: hidden_states(...) and lm_head_weight().
"""

import jax.numpy as jnp
from flax import nnx


class StandinLM(nnx.Module):
    def __init__(self, vocab: int = 32, hidden: int = 16, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, hidden, rngs=rngs)
        self.pos = nnx.Embed(64, hidden, rngs=rngs)
        self.mix = nnx.Linear(2 * hidden, hidden, rngs=rngs)
        self.head = nnx.Param(nnx.initializers.normal(0.5)(rngs.params(), (hidden, vocab)))

    def hidden_states(self, input_ids, positions, segment_ids, embed_noise=None):
        x = self.embed(input_ids)
        if embed_noise is not None:
            x = x + embed_noise(x)
        x = x + self.pos(positions)
        L = input_ids.shape[-1]
        causal = jnp.tril(jnp.ones((L, L), bool))
        same = segment_ids[..., :, None] == segment_ids[..., None, :]
        w = (causal & same).astype(x.dtype)
        ctx = jnp.einsum("...qk,...kh->...qh", w, x) / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
        return jnp.tanh(self.mix(jnp.concatenate([x, ctx], -1)))

    def lm_head_weight(self):
        return self.head[...]

    def __call__(self, input_ids, positions, segment_ids):
        return self.hidden_states(input_ids, positions, segment_ids) @ self.lm_head_weight()
