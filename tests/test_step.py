"""The train step: TRL's loss normalizer over the whole step, compiled once, and refusing empty steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jsft import step as step_lib
from standin_model import StandinLM

VOCAB, L = 32, 24


def pack_rows(rng: np.random.Generator, num_rows: int, length: int = L) -> dict:
    """Rows of randomly many documents (1..4 per row), targets shifted per document, random trained spans."""
    cols = {k: np.zeros((num_rows, length), np.int32) for k in ("input_ids", "segment_ids", "positions", "targets")}
    mask = np.zeros((num_rows, length), bool)
    for r in range(num_rows):
        start, seg = 0, 0
        for _ in range(rng.integers(1, 5)):
            n = int(rng.integers(2, 10))
            if start + n > length:
                break
            seg += 1
            doc = rng.integers(2, VOCAB, n)
            sl = slice(start, start + n)
            cols["input_ids"][r, sl] = doc
            cols["segment_ids"][r, sl] = seg
            cols["positions"][r, sl] = np.arange(n)
            cols["targets"][r, start : start + n - 1] = doc[1:]
            mask[r, start : start + n - 1] = rng.random(n - 1) < 0.7
            start += n
    return {**cols, "loss_mask": mask}


def micro(batch: dict, accum: int) -> dict:
    """[rows, L] -> [accum, rows / accum, L]."""
    return {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}


def fresh(tx=None, seed=0):
    model = StandinLM(VOCAB, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, tx or optax.adamw(1e-2), wrt=nnx.Param)


def test_step_compiles_once_across_different_packings():
    rng = np.random.default_rng(0)
    model, optimizer = fresh()
    step_lib.train_step.jitted_fn.clear_cache()
    layouts = set()
    for i in range(4):
        batch = micro(pack_rows(rng, 4), 2)
        layouts.add(batch["segment_ids"].tobytes())
        step_lib.check_batch(batch, i)
        metrics = step_lib.train_step(model, optimizer, batch, loss_type="nll", chunk_size=16)
        assert np.isfinite(float(metrics["loss"]))
    assert len(layouts) == 4  # every step had a different packing
    assert step_lib.train_step.jitted_fn._cache_size() == 1
    assert int(optimizer.step[...]) == 4


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_micro_batch_split_gives_same_loss_and_grads(loss_type):
    """8 rows as 1x8, 2x4 and 8x1 micro-batches: the same loss and (with SGD lr=1, the update is -grad) grads."""
    batch = pack_rows(np.random.default_rng(1), 8)
    results = []
    for accum in (1, 2, 8):
        model, optimizer = fresh(optax.sgd(1.0))
        before = nnx.state(model, nnx.Param)
        before = {k: np.asarray(v) for k, v in nnx.to_flat_state(before)}
        metrics = step_lib.train_step(model, optimizer, micro(batch, accum), loss_type=loss_type, chunk_size=16)
        after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        grads = {k: before[k] - after[k] for k in before}
        results.append((accum, {k: float(v) for k, v in metrics.items()}, grads))
    _, m1, g1 = results[0]
    assert m1["num_trained"] == batch["loss_mask"].sum()
    assert m1["num_tokens"] == (batch["segment_ids"] > 0).sum()
    assert max(abs(v).max() for v in g1.values()) > 1e-4  # a real gradient
    for accum, m, g in results[1:]:
        for key in ("loss", "grad_norm", "mean_token_accuracy", "entropy", "num_trained"):
            np.testing.assert_allclose(m[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=f"{key} at accum={accum}")
        for k in g1:
            np.testing.assert_allclose(g[k], g1[k], atol=1e-5, err_msg=f"grad {k} at accum={accum}")


def test_step_loss_is_mean_over_all_trained_tokens_of_the_step():
    """Two micro-batches with 3 and 1 trained tokens: the loss is the mean of 4 token losses, not of 2 means."""
    rng = np.random.default_rng(2)
    batch = pack_rows(rng, 2)
    batch["loss_mask"][:] = False
    batch["loss_mask"][0, :3] = True
    batch["loss_mask"][1, 0] = True
    model, optimizer = fresh(optax.sgd(0.0))
    sums = step_lib.eval_step(model, {k: v[:, None] for k, v in batch.items()}, chunk_size=16)
    metrics = step_lib.train_step(model, optimizer, micro(batch, 2), loss_type="nll", chunk_size=16)
    assert float(sums["num_trained"]) == 4
    np.testing.assert_allclose(float(metrics["loss"]), float(sums["loss_sum"]) / 4, rtol=1e-6)


def test_zero_trained_tokens_is_refused_before_the_step():
    batch = micro(pack_rows(np.random.default_rng(3), 4), 2)
    batch["loss_mask"][:] = False
    with pytest.raises(ValueError, match="step 7: the batch has no trained tokens"):
        step_lib.check_batch(batch, 7)
    # padding only: one process's share of a partial last step (its real rows went to the other processes)
    step_lib.check_batch({k: np.zeros_like(v) for k, v in batch.items()}, 8)


def test_learning_rate_metric_follows_the_schedule():
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    model, optimizer = fresh(optax.sgd(schedule))
    batch = micro(pack_rows(np.random.default_rng(4), 2), 1)
    lrs = [float(step_lib.train_step(model, optimizer, batch, schedule=schedule)["learning_rate"]) for _ in range(3)]
    np.testing.assert_allclose(lrs, [1.0, 0.9, 0.8], rtol=1e-6)


def test_step_compiles_once_on_an_8_device_mesh():
    import jax

    from jsft import sharding

    mesh = sharding.create_mesh({"data": -1})
    rng = np.random.default_rng(5)
    model, optimizer = fresh()
    sharding.shard_model(model, mesh)
    sharding.shard_model(optimizer, mesh)
    step_lib.train_step.jitted_fn.clear_cache()
    with jax.set_mesh(mesh):
        for _ in range(3):
            batch = sharding.shard_batch(micro(pack_rows(rng, 16), 2), mesh)
            step_lib.train_step(model, optimizer, batch, chunk_size=16)
    assert step_lib.train_step.jitted_fn._cache_size() == 1


def lora_model(dropout: float):
    """A one-layer Llama with LoRA (B randomized, so LoRA changes the output) and the given dropout."""
    from jsft.model.llama import Llama, LlamaConfig
    from jsft.model.lora import apply_lora, lora_modules

    cfg = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    model = apply_lora(Llama(cfg, rngs=nnx.Rngs(0)), r=4, alpha=8, dropout=dropout)
    for i, module in enumerate(lora_modules(model).values()):
        module.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(i), module.lora_b.shape, jnp.float32)
    return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)


def test_lora_dropout_trains_through_the_step_with_fresh_masks_each_step():
    batch = micro(pack_rows(np.random.default_rng(3), 4), 2)

    def losses(dropout, steps=3):
        model, optimizer = lora_model(dropout)
        return [float(step_lib.train_step(model, optimizer, batch, chunk_size=8)["loss"]) for _ in range(steps)], model

    no_dropout, _ = losses(0.0)
    with_dropout, model = losses(0.5)
    again, _ = losses(0.5)
    assert with_dropout == again  # deterministic for a seed
    assert with_dropout[0] != no_dropout[0]  # dropout is active in the step
    # the RNG advanced across steps (the step returns the stream's new state): a fourth step's masks differ
    counts = [int(c) for c in jax.tree.leaves(nnx.state(model, nnx.RngCount))]
    assert counts and all(c > 0 for c in counts)


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_eval_step_runs_with_remat(remat):
    """TRL's gradient_checkpointing=True (remat) with an eval split: eval_step gives the no-remat sums."""
    from jsft.model.llama import Llama, LlamaConfig

    cfg = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    batch = pack_rows(np.random.default_rng(5), 2)
    sums = [step_lib.eval_step(Llama(cfg, rngs=nnx.Rngs(0), remat_policy=r), batch, chunk_size=16)
            for r in ("none", remat)]
    for k in sums[0]:
        np.testing.assert_allclose(float(sums[1][k]), float(sums[0][k]), rtol=1e-6, err_msg=k)


def test_neftune_noise_is_transformers_uniform_and_only_in_training():
    """NEFTune: noise uniform in +-alpha/sqrt(L*H) (transformers' neftune_post_forward_hook) on the input
    embeddings in train_step (eval_step has no such option); the same noise for the same optimizer step (exact resume), other noise at the
    next step."""
    noise = step_lib.neftune_noise(jax.random.key(1), (4, 16, 32), 5.0)
    bound = 5.0 / np.sqrt(16 * 32)
    assert float(jnp.max(jnp.abs(noise))) <= bound and float(jnp.max(jnp.abs(noise))) > 0.95 * bound
    assert abs(float(jnp.mean(noise))) < 0.05 * bound

    batch = micro(pack_rows(np.random.default_rng(0), 4), 2)
    losses = {}
    for alpha in (None, 50.0):
        for run in range(2):
            model, optimizer = fresh(optax.sgd(0.0))
            losses[alpha, run] = float(step_lib.train_step(model, optimizer, batch, neftune_noise_alpha=alpha)["loss"])
            second = float(step_lib.train_step(model, optimizer, batch, neftune_noise_alpha=alpha)["loss"])
    assert losses[50.0, 0] == losses[50.0, 1]  # deterministic per step
    assert losses[50.0, 0] != losses[None, 0]  # the noise reached the embeddings
    assert second != losses[50.0, 0]  # a new draw at the next optimizer step (lr 0: same params)
