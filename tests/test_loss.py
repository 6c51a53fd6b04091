"""The loss: chunked equals unchunked, equals TRL's compute_loss, is split-invariant, and stays small in memory."""

import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsft import loss as L


def _inputs(b=3, l=8, h=16, v=40, seed=0, trained=0.7):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(b, l, h)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(h, v)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(b, l)), jnp.int32)
    mask = jnp.asarray(rng.random((b, l)) < trained)
    return hidden, w, targets, mask


def _loss_and_grads(fn, hidden, w, targets, mask, loss_type, chunk_size, denom=None):
    """(step loss, sums, (d/d hidden, d/d W)) with the loss divided by `denom` (default: this batch's count)."""
    denom = mask.sum() if denom is None else denom
    return _jit_loss_and_grads(fn, hidden, w, targets, mask, loss_type, chunk_size, denom)


@jax.jit(static_argnums=(0, 5, 6))
def _jit_loss_and_grads(fn, hidden, w, targets, mask, loss_type, chunk_size, denom):
    def f(hidden, w):
        sums = fn(hidden, w, targets, mask, loss_type=loss_type, chunk_size=chunk_size)
        return L.normalize(sums, denom)["loss"], sums

    (value, sums), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hidden, w)
    return value, sums, grads


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("chunk_size", [5, 8, 1000])  # 5 does not divide B*L=24, 8 does; 1000 > B*L
def test_chunked_equals_unchunked_values_and_gradients(loss_type, chunk_size):
    args = _inputs()
    ref_value, ref_sums, ref_grads = _loss_and_grads(L.unchunked_loss, *args, loss_type, chunk_size)
    value, sums, grads = _loss_and_grads(L.chunked_loss, *args, loss_type, chunk_size)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6, atol=1e-6)
    for key in L.SUM_KEYS:
        np.testing.assert_allclose(sums[key], ref_sums[key], rtol=1e-6, atol=1e-6, err_msg=key)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=1e-6, atol=1e-6)
    assert float(sums["num_trained"]) == float(args[3].sum())


def test_bf16_inputs_accumulate_in_float32():
    """bf16 hidden and W: the chunk logits equal the float32 matmul of the same (bf16-representable) values."""
    hidden, w, targets, mask = _inputs(h=64)
    hb, wb = hidden.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    sums = L.chunked_loss(hb, wb, targets, mask, chunk_size=7)
    ref = L.unchunked_loss(hb.astype(jnp.float32), wb.astype(jnp.float32), targets, mask)
    assert sums["loss_sum"].dtype == jnp.float32
    np.testing.assert_allclose(sums["loss_sum"], ref["loss_sum"], rtol=1e-6)
    grad = jax.jit(jax.grad(lambda h, w: L.chunked_loss(h, w, targets, mask, chunk_size=7)["loss_sum"], (0, 1)))
    g = grad(hb, wb)
    assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.bfloat16


def test_bf16_lm_head_gradient_is_summed_in_float32_whatever_the_chunk_count():
    """With bf16 h and W, d W is the sum over chunks of h^T @ dlogits; summed in bf16 over 256 chunks it would be
    ~1.4 % off, summed in float32 it stays at one bf16 rounding (~0.2 %) for any chunk size."""
    hidden, w, targets, mask = _inputs(b=4, l=64, h=32, v=64, trained=1.0)
    hb, wb = hidden.astype(jnp.bfloat16), w.astype(jnp.bfloat16)

    def grads(fn, chunk_size, h, w):
        return jax.jit(jax.grad(lambda h, w: fn(h, w, targets, mask, chunk_size=chunk_size)["loss_sum"], (0, 1)))(h, w)

    ref = grads(L.unchunked_loss, 256, hb.astype(jnp.float32), wb.astype(jnp.float32))
    for chunk_size in (1, 256):
        gh, gw = grads(L.chunked_loss, chunk_size, hb, wb)
        assert gw.dtype == jnp.bfloat16
        for g, r in ((gw, ref[1]), (gh, ref[0])):
            rel = float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r))
            assert rel < 4e-3, (chunk_size, rel)


def test_chunked_loss_uses_less_memory_than_full_logits():
    """XLA's own accounting: temp memory of loss+grad at B*L=2048, V=4096 is several times smaller chunked."""
    b, l, h, v = 2, 1024, 64, 4096
    hidden = jax.ShapeDtypeStruct((b, l, h), jnp.float32)
    w = jax.ShapeDtypeStruct((h, v), jnp.float32)
    targets = jax.ShapeDtypeStruct((b, l), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, l), jnp.bool_)

    def temp_bytes(fn):
        grad = jax.grad(lambda hh, ww, t, m: fn(hh, ww, t, m, chunk_size=256)["loss_sum"], argnums=(0, 1))
        return jax.jit(grad).lower(hidden, w, targets, mask).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(L.unchunked_loss), temp_bytes(L.chunked_loss)
    logits_bytes = b * l * v * 4  # 32 MiB
    assert full >= logits_bytes
    chunk_bytes = 256 * v * 4  # one [chunk_size, V] float32 block: 4 MiB
    assert chunked <= 3 * chunk_bytes < logits_bytes, (chunked, full)
    assert chunked < full / 4


def test_argmax_tie_with_earlier_token_is_not_correct():
    """TRL's is_top1: the target counts as correct only if it is the FIRST maximum (argmax semantics)."""
    hidden = jnp.ones((1, 2, 1), jnp.float32)
    w = jnp.asarray([[1.0, 1.0, 0.0]])  # logits [1, 1, 0] for both tokens
    targets = jnp.asarray([[0, 1]], jnp.int32)
    mask = jnp.ones((1, 2), bool)
    for fn in (L.chunked_loss, L.unchunked_loss):
        assert float(fn(hidden, w, targets, mask, chunk_size=1)["num_correct"]) == 1.0


def test_no_trained_tokens_is_a_clear_error():
    hidden, w, targets, _ = _inputs()
    sums = L.chunked_loss(hidden, w, targets, jnp.zeros(targets.shape, bool))
    assert float(sums["num_trained"]) == 0.0 and float(L.normalize(sums, 0)["loss"]) == 0.0
    with pytest.raises(ValueError) as err:
        L.check_trained_tokens(sums["num_trained"], step=7)
    for needle in ("step 7", "completion_only_loss", "assistant_only_loss", "truncation"):
        assert needle in str(err.value)
    L.check_trained_tokens(1, step=0)  # no error


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_loss_and_gradients_invariant_to_micro_batch_split(loss_type):
    """8 rows as 1x8, 2x4, 8x1 micro-batches: the summed per-micro-batch gradients of loss_sum / step_total agree."""
    hidden, w, targets, mask = _inputs(b=8, l=6, seed=3, trained=0.5)
    total = mask.sum()

    def step(num_micro):
        value, grads_w, grads_h = 0.0, 0.0, []
        for i in range(num_micro):
            rows = slice(i * 8 // num_micro, (i + 1) * 8 // num_micro)
            v, _, (gh, gw) = _loss_and_grads(
                L.chunked_loss, hidden[rows], w, targets[rows], mask[rows], loss_type, 4, denom=total
            )
            value, grads_w = value + v, grads_w + gw
            grads_h.append(gh)
        return value, grads_w, jnp.concatenate(grads_h)

    ref = step(1)
    for num_micro in (2, 8):
        got = step(num_micro)
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # and it is NOT the mean of micro-batch means (which weighs short micro-batches more)
    means = [
        _loss_and_grads(L.chunked_loss, hidden[i : i + 1], w, targets[i : i + 1], mask[i : i + 1], loss_type, 4)[0]
        for i in range(8)
    ]
    assert abs(float(np.mean(means)) - float(ref[0])) > 1e-4


# ----------------------------------------------------------------------------------------------- against TRL


def _trl_compute_loss(model, inputs, loss_type, num_items_in_batch):
    """Run TRL's own SFTTrainer.compute_loss on `model` (patched with TRL's fused LM head), without a Trainer."""
    from trl import SFTTrainer

    fake = types.SimpleNamespace(
        model=model,
        aux_loss_enabled=False,
        compute_loss_func=None,
        label_smoother=None,
        args=types.SimpleNamespace(loss_type=loss_type, average_tokens_across_devices=False, max_length=None),
        accelerator=types.SimpleNamespace(parallelism_config=None, gather_for_metrics=lambda x: x),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    loss = SFTTrainer.compute_loss(fake, model, inputs, num_items_in_batch=num_items_in_batch)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_loss_entropy_accuracy_and_gradients_equal_trl(loss_type):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).train()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper distributions: non-trivial accuracy and entropy
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))

    b, l = 3, 10
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 48, (b, l), generator=g)
    with torch.no_grad():  # labels need not equal input_ids: make about half of them the model's argmax
        top1 = model(input_ids=input_ids).logits.argmax(-1)
    labels = input_ids.clone()
    labels[:, 1:] = torch.where(torch.rand(b, l - 1, generator=g) < 0.5, top1[:, :-1], labels[:, 1:])
    labels[0, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 7:] = 0
    num_items = int((labels[:, 1:] != -100).sum()) + 5  # as if another micro-batch held 5 more trained tokens

    captured = {}
    hook = model.model.norm.register_forward_hook(lambda m, i, o: captured.update(h=o) or o.retain_grad())
    inputs = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    loss, metrics = _trl_compute_loss(model, inputs, loss_type, torch.tensor(num_items))
    loss.backward()
    hook.remove()

    hidden = jnp.asarray(captured["h"].detach().numpy())
    w = jnp.asarray(model.lm_head.weight.detach().numpy().T)
    # jsft's batch contract: targets shifted in the data stage, the last position untrained
    targets = jnp.asarray(np.concatenate([labels[:, 1:].numpy(), np.zeros((b, 1), np.int64)], 1).clip(min=0))
    mask = jnp.asarray(np.concatenate([(labels[:, 1:] != -100).numpy(), np.zeros((b, 1), bool)], 1))

    def f(hidden, w):
        sums = L.chunked_loss(hidden, w, targets, mask, loss_type=loss_type, chunk_size=7)
        return L.normalize(sums, num_items)["loss"], sums

    (value, sums), (gh, gw) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hidden, w)
    np.testing.assert_allclose(float(value), loss.item(), rtol=1e-4)
    metrics_jsft = L.normalize(sums, sums["num_trained"])
    np.testing.assert_allclose(float(metrics_jsft["entropy"]), metrics["entropy"], rtol=1e-4)
    assert float(metrics_jsft["mean_token_accuracy"]) == pytest.approx(metrics["mean_token_accuracy"], abs=1e-6)
    assert 0.0 < metrics["mean_token_accuracy"] < 1.0
    np.testing.assert_allclose(gw, model.lm_head.weight.grad.numpy().T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gh, captured["h"].grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_equals_transformers_label_smoother(smoothing):
    """transformers' LabelSmoother (what TRL's SFTTrainer uses for nll with label_smoothing_factor), on the same
    logits, labels -100 where untrained; and the chunked loss's gradient equals autodiff of the unchunked one."""
    import torch
    from transformers.trainer_pt_utils import LabelSmoother

    hidden, w, targets, mask = _inputs()
    logits = np.asarray(jnp.einsum("blh,hv->blv", hidden, w))
    # LabelSmoother shifts: logits[:, :-1] predict labels[:, 1:]; build labels so that label[t+1] = target[t].
    labels = np.full((hidden.shape[0], hidden.shape[1] + 1), -100)
    labels[:, 1:] = np.where(np.asarray(mask), np.asarray(targets), -100)
    padded = np.concatenate([logits, np.zeros_like(logits[:, :1])], axis=1)
    expected = LabelSmoother(epsilon=smoothing)({"logits": torch.tensor(padded, dtype=torch.float64)},
                                                torch.tensor(labels), shift_labels=True)
    for fn in (L.unchunked_loss, L.chunked_loss):
        sums = fn(hidden, w, targets, mask, chunk_size=5, smoothing=smoothing)
        np.testing.assert_allclose(float(L.normalize(sums, sums["num_trained"])["loss"]), float(expected),
                                   rtol=1e-5)
    plain = L.chunked_loss(hidden, w, targets, mask, chunk_size=5)
    assert abs(float(plain["loss_sum"]) - float(sums["loss_sum"])) > 1e-3  # smoothing changed the loss

    def loss_of(fn):
        return lambda h, w: fn(h, w, targets, mask, chunk_size=5, smoothing=smoothing)["loss_sum"]

    for got, ref in zip(jax.grad(loss_of(L.chunked_loss), argnums=(0, 1))(hidden, w),
                        jax.grad(loss_of(L.unchunked_loss), argnums=(0, 1))(hidden, w)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_label_smoothing_with_dft_is_refused():
    with pytest.raises(ValueError, match="nll only"):
        L.chunked_loss(*_inputs(), loss_type="dft", smoothing=0.1)
