"""The optimizer equals transformers' Trainer: schedules, AdamW with its decay mask, clipping; plus the trainable filter."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jsft import optim
from jsft.config import ConfigError, TrainingConfig

torch = pytest.importorskip("torch")


# ----------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", ["linear", "cosine", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("warmup", [dict(warmup_steps=4), dict(warmup_ratio=0.15), dict()])
def test_schedule_equals_transformers_get_scheduler(name, warmup):
    from transformers import TrainingArguments, get_scheduler

    total = 20
    training = TrainingConfig(learning_rate=3e-4, lr_scheduler_type=name, **warmup)
    expected_warmup = TrainingArguments.get_warmup_steps(
        types.SimpleNamespace(warmup_steps=warmup.get("warmup_steps", warmup.get("warmup_ratio", 0))), total
    )
    assert optim.num_warmup_steps(training, total) == expected_warmup
    _, schedule = optim.make_optimizer(training, total)

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=training.learning_rate)
    sched = get_scheduler(name, opt, num_warmup_steps=expected_warmup, num_training_steps=total)
    for step in range(total + 2):
        np.testing.assert_allclose(float(schedule(step)), opt.param_groups[0]["lr"], rtol=1e-5, atol=1e-12)
        opt.step()
        sched.step()
    assert float(jax.jit(schedule)(jnp.asarray(3))) == pytest.approx(float(schedule(3)))


@pytest.mark.parametrize("name, kwargs", [
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 3e-5, "num_cycles": 0.75}),
    ("cosine", {"num_cycles": 1.5}),
    ("cosine_with_restarts", {}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {}),
    ("polynomial", {"lr_end": 1e-5, "power": 2.0}),
    ("inverse_sqrt", {}),
    ("inverse_sqrt", {"timescale": 7}),
    ("warmup_stable_decay", {"num_decay_steps": 10}),
    ("warmup_stable_decay", {"num_decay_steps": 8, "num_stable_steps": 12, "warmup_type": "cosine",
                             "decay_type": "linear", "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 8, "warmup_type": "1-sqrt", "decay_type": "1-sqrt",
                             "min_lr_ratio": 0.05}),
    ("warmup_stable_decay", {"num_decay_steps": 8, "num_stable_steps": 5}),  # ends before total: min_lr_ratio
])
def test_scheduler_kwargs_equal_transformers(name, kwargs):
    from transformers import get_scheduler

    total, warmup = 30, 3
    training = TrainingConfig(learning_rate=3e-4, lr_scheduler_type=name, lr_scheduler_kwargs=kwargs,
                              warmup_steps=warmup)
    _, schedule = optim.make_optimizer(training, total)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=training.learning_rate)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                          scheduler_specific_kwargs=kwargs)
    for step in range(total + 2):
        np.testing.assert_allclose(float(schedule(step)), opt.param_groups[0]["lr"], rtol=1e-5, atol=1e-12)
        opt.step()
        sched.step()


@pytest.mark.parametrize("name, kwargs, message", [
    ("cosine_with_min_lr", {}, "exactly one of min_lr"),
    ("cosine_with_min_lr", {"min_lr": 1e-6, "min_lr_rate": 0.1}, "exactly one of min_lr"),
    ("linear", {"num_cycles": 2}, "num_cycles is not an option of lr_scheduler_type='linear'"),
    ("warmup_stable_decay", {}, "needs num_decay_steps"),
    ("warmup_stable_decay", {"num_decay_steps": 3, "decay_type": "exp"}, "decay_type must be one of"),
])
def test_scheduler_kwargs_are_checked_before_any_compute(name, kwargs, message):
    from jsft.config import SFTConfig, validate

    config = SFTConfig()
    config.model.model_name_or_path, config.data.dataset_name = "ckpt", "d.jsonl"
    config.training.lr_scheduler_type, config.training.lr_scheduler_kwargs = name, kwargs
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_unknown_schedule_and_no_steps_are_errors():
    with pytest.raises(ConfigError, match="lr_scheduler_type"):
        optim.make_optimizer(TrainingConfig(lr_scheduler_type="reduce_lr_on_plateau"), 10)
    with pytest.raises(ConfigError, match="lr_end"):
        optim.make_optimizer(TrainingConfig(lr_scheduler_type="polynomial", learning_rate=1e-8), 10)
    with pytest.raises(ConfigError, match="total_steps"):
        optim.make_optimizer(TrainingConfig(), 0)


# ----------------------------------------------------------------------------------------------- AdamW vs torch


def test_decay_mask_equals_transformers_decay_parameter_names():
    """The no-decay rule on HF names (biases, every norm) is transformers' own, for a model with biases (Qwen2)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer

    cfg = Qwen2Config(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = Qwen2ForCausalLM(cfg)
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    names = [n for n, _ in model.named_parameters()]
    assert any("bias" in n for n in names) and any("norm" in n for n in names)
    for name in names:
        assert optim.decays(name) == (name in decayed), name
    # and on jsft's own paths
    assert optim.decays("layers.0.mlp.up_proj.kernel") and optim.decays("embed_tokens.embedding")
    assert not optim.decays("layers.0.input_layernorm.scale") and not optim.decays("norm.scale")
    assert not optim.decays("layers.3.self_attn.q_norm.scale") and not optim.decays("layers.0.self_attn.k_proj.bias")
    # the stacked layers' paths (jsft.model.llama: one path for all N layers)
    assert optim.decays("layers.mlp.up_proj.kernel") and not optim.decays("layers.input_layernorm.scale")
    assert not optim.decays("layers.self_attn.k_norm.scale") and not optim.decays("layers.self_attn.q_proj.bias")


class Tiny(nnx.Module):
    """Param names like jsft.model.llama: a kernel and bias (decayed / not), and a norm scale (not decayed)."""

    def __init__(self, dtype=jnp.float32):
        rng = np.random.default_rng(0)
        self.up_proj = nnx.Linear(4, 3, rngs=nnx.Rngs(0), param_dtype=dtype)
        self.up_proj.kernel[...] = jnp.asarray(rng.normal(size=(4, 3)), dtype)
        self.up_proj.bias[...] = jnp.asarray(rng.normal(size=(3,)), dtype)
        self.input_layernorm = nnx.RMSNorm(3, rngs=nnx.Rngs(0), param_dtype=dtype)
        self.input_layernorm.scale[...] = jnp.asarray(rng.normal(size=(3,)), dtype)


def _grads(step):
    rng = np.random.default_rng(100 + step)
    return {"up_proj.kernel": rng.normal(size=(4, 3)) * 3, "up_proj.bias": rng.normal(size=(3,)) * 3,
            "input_layernorm.scale": rng.normal(size=(3,)) * 3}


def _run_jsft(training, steps=3, dtype=jnp.float32):
    model = Tiny(dtype)
    tx, _ = optim.make_optimizer(training, total_steps=10)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for step in range(steps):
        g = {k: jnp.asarray(v, dtype) for k, v in _grads(step).items()}

        def linear_loss(m):  # its gradient is exactly g
            return (jnp.sum(m.up_proj.kernel[...] * g["up_proj.kernel"]) + jnp.sum(m.up_proj.bias[...] * g["up_proj.bias"])
                    + jnp.sum(m.input_layernorm.scale[...] * g["input_layernorm.scale"]))

        optimizer.update(model, nnx.grad(linear_loss)(model))
    return model, optimizer


def _torch_adamw(groups, training):
    return torch.optim.AdamW(groups, lr=training.learning_rate, betas=(training.adam_beta1, training.adam_beta2),
                             eps=training.adam_epsilon)


def _run_torch(training, steps=3, make_optimizer=_torch_adamw):
    """What HF's Trainer does: two param groups (decay / no decay), clip_grad_norm_, optimizer.step, scheduler.step."""
    from transformers import get_scheduler

    init = Tiny()
    params = {
        "up_proj.kernel": torch.nn.Parameter(torch.tensor(np.asarray(init.up_proj.kernel[...]), dtype=torch.float64)),
        "up_proj.bias": torch.nn.Parameter(torch.tensor(np.asarray(init.up_proj.bias[...]), dtype=torch.float64)),
        "input_layernorm.scale": torch.nn.Parameter(
            torch.tensor(np.asarray(init.input_layernorm.scale[...]), dtype=torch.float64)),
    }
    groups = [
        {"params": [p for n, p in params.items() if optim.decays(n)], "weight_decay": training.weight_decay},
        {"params": [p for n, p in params.items() if not optim.decays(n)], "weight_decay": 0.0},
    ]
    assert len(groups[0]["params"]) == 1  # only the kernel decays
    opt = make_optimizer(groups, training)
    warmup = optim.num_warmup_steps(training, 10)
    sched = get_scheduler(training.lr_scheduler_type, opt, num_warmup_steps=warmup, num_training_steps=10)
    for step in range(steps):
        for name, g in _grads(step).items():
            params[name].grad = torch.tensor(g, dtype=torch.float64)
        if training.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), training.max_grad_norm)
        opt.step()
        sched.step()
    return {n: p.detach().numpy() for n, p in params.items()}


def _assert_same(model, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(model.up_proj.kernel[...], expected["up_proj.kernel"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(model.up_proj.bias[...], expected["up_proj.bias"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(model.input_layernorm.scale[...], expected["input_layernorm.scale"],
                               rtol=rtol, atol=atol)


ADAMW = dict(learning_rate=0.05, weight_decay=0.3, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
             lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=0.0)


def test_adamw_steps_equal_torch_adamw_with_weight_decay_mask():
    training = TrainingConfig(**ADAMW)
    model, _ = _run_jsft(training)
    expected = _run_torch(training)
    _assert_same(model, expected)
    assert not np.allclose(model.up_proj.kernel[...], Tiny().up_proj.kernel[...])  # it did train


class _TorchLion(torch.optim.Optimizer):
    """bitsandbytes' Lion (32-bit), which transformers' lion_32bit builds: decoupled decay, sign of the
    interpolated momentum, then the momentum update with beta2."""

    def __init__(self, params, lr, betas, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


@pytest.mark.parametrize("optim_name, optim_args, make_torch", [
    ("sgd", {}, lambda groups, t: torch.optim.SGD(groups, lr=t.learning_rate)),
    ("sgd", {"momentum": "0.9"}, lambda groups, t: torch.optim.SGD(groups, lr=t.learning_rate, momentum=0.9)),
    ("sgd", {"momentum": "0.8", "nesterov": "True"},
     lambda groups, t: torch.optim.SGD(groups, lr=t.learning_rate, momentum=0.8, nesterov=True)),
    ("adafactor", {}, lambda groups, t: __import__("transformers").Adafactor(
        groups, lr=t.learning_rate, scale_parameter=False, relative_step=False)),
    ("lion_32bit", {}, lambda groups, t: _TorchLion(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2))),
])
def test_other_optimizers_equal_their_torch_versions(optim_name, optim_args, make_torch):
    """transformers' Trainer with optim=<name> (and optim_args) vs training.optim: same params after 4 steps of a
    linear schedule with warmup, with weight decay on the kernel only."""
    training = TrainingConfig(**{**ADAMW, "optim": optim_name, "optim_args": optim_args, "learning_rate": 0.01})
    model, _ = _run_jsft(training, steps=4)
    _assert_same(model, _run_torch(training, steps=4, make_optimizer=make_torch))
    adamw, _ = _run_jsft(TrainingConfig(**{**ADAMW, "learning_rate": 0.01}), steps=4)
    assert not np.allclose(adamw.up_proj.kernel[...], model.up_proj.kernel[...], rtol=1e-4)


def test_muon_orthogonalizes_matrix_updates_and_adams_the_rest():
    """optax's Muon: a matrix's first update (no decay, lr 1) has its singular values pushed towards one (Newton-
    Schulz, about 0.7-1.2 after 5 steps); vectors get its (Nesterov) Adam's first update, which is
    -lr * sign(g) * (1 + b1 (1 - b1) / (1 - b1^2))."""
    training = TrainingConfig(optim="muon", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0)
    model, _ = _run_jsft(training, steps=1)
    start = Tiny()
    update = np.asarray(model.up_proj.kernel[...] - start.up_proj.kernel[...])
    singular = np.linalg.svd(update, compute_uv=False)
    assert singular.min() > 0.5 and singular.max() < 1.5, singular
    b1 = training.adam_beta1
    np.testing.assert_allclose(np.asarray(model.up_proj.bias[...] - start.up_proj.bias[...]),
                               -np.sign(_grads(0)["up_proj.bias"]) * (1 + b1 * (1 - b1) / (1 - b1**2)), rtol=1e-4)


def test_muon_treats_stacked_vectors_as_vectors():
    """Stacked layers' norms and DoRA magnitudes are [N, size]: a vector per layer, for Muon's Adam."""
    params = {"layers": {"input_layernorm": {"scale": jnp.zeros((2, 8))},
                         "mlp": {"up_proj": {"kernel": jnp.zeros((2, 8, 4)), "lora_magnitude": jnp.zeros((2, 4))}}},
              "lm_head": {"kernel": jnp.zeros((8, 16))}, "norm": {"scale": jnp.zeros(8)}}
    dims = optim._muon_dimensions(params)
    assert dims["layers"]["input_layernorm"]["scale"] is None and dims["norm"]["scale"] is None
    assert dims["layers"]["mlp"]["up_proj"]["lora_magnitude"] is None
    assert (dims["layers"]["mlp"]["up_proj"]["kernel"].reduction_axis, dims["lm_head"]["kernel"].output_axis) == (1, 1)


def test_optimizer_names_and_arguments_are_checked():
    from jsft.config import SFTConfig, validate

    config = SFTConfig()
    config.model.model_name_or_path, config.data.dataset_name = "ckpt", "d.jsonl"
    config.training.optim = "adamw_8bit"
    with pytest.raises(ConfigError, match="training.optim"):
        validate(config)
    config.training.optim, config.training.optim_args = "adafactor", {"momentum": "0.9"}
    with pytest.raises(ConfigError, match="momentum is not an argument of optim='adafactor'"):
        validate(config)


def test_gradient_clipping_equals_torch_clip_grad_norm():
    """A large Adam eps makes the update depend on the gradient scale, so clipping changes the result."""
    clipped = TrainingConfig(**{**ADAMW, "adam_epsilon": 1.0, "max_grad_norm": 0.5})
    model, _ = _run_jsft(clipped)
    _assert_same(model, _run_torch(clipped))
    unclipped, _ = _run_jsft(TrainingConfig(**{**ADAMW, "adam_epsilon": 1.0, "max_grad_norm": 0.0}))
    assert not np.allclose(unclipped.up_proj.kernel[...], model.up_proj.kernel[...], rtol=1e-3)


def test_bfloat16_optimizer_state_keeps_second_moment_float32():
    training = TrainingConfig(**{**ADAMW, "optimizer_state_dtype": "bfloat16"})
    model, optimizer = _run_jsft(training)
    leaves = jax.tree.leaves(nnx.as_pure(optimizer.opt_state))
    dtypes = {str(x.dtype) for x in leaves if x.ndim > 0}
    assert dtypes == {"bfloat16", "float32"}, dtypes  # mu bf16, nu f32
    _assert_same(model, _run_torch(training), rtol=2e-2, atol=2e-2)


def test_fp32_master_weights_keep_updates_bf16_would_lose():
    """lr * update far below bf16 resolution: plain bf16 params never move; with master weights the tiny updates
    accumulate in float32 and the bf16 param is always the rounded master."""
    training = TrainingConfig(learning_rate=1e-4, lr_scheduler_type="constant", max_grad_norm=0.0)
    plain, _ = _run_jsft(training, steps=30, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(plain.up_proj.kernel[...], Tiny(jnp.bfloat16).up_proj.kernel[...])

    master_cfg = TrainingConfig(learning_rate=1e-4, lr_scheduler_type="constant", max_grad_norm=0.0,
                                master_weights_fp32=True)
    model, optimizer = _run_jsft(master_cfg, steps=30, dtype=jnp.bfloat16)
    state = nnx.as_pure(optimizer.opt_state)
    master = state.master["up_proj"]["kernel"]
    assert master.dtype == jnp.float32 and model.up_proj.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(model.up_proj.kernel[...], master.astype(jnp.bfloat16))
    start = Tiny(jnp.bfloat16).up_proj.kernel[...].astype(jnp.float32)
    assert float(jnp.max(jnp.abs(master - start))) > 5e-4  # up to 30 steps of 1e-4
    # the master moves like a float32 run (up to the bf16 rounding of the gradients)
    ref, _ = _run_jsft(training, steps=30, dtype=jnp.float32)
    ref_delta = ref.up_proj.kernel[...] - Tiny().up_proj.kernel[...]
    np.testing.assert_allclose(master - start, ref_delta, rtol=1e-2, atol=3e-6)


# ----------------------------------------------------------------------------------------------- trainable filter


def _small_llama(lora: bool):
    from jsft.model.llama import Llama, LlamaConfig
    from jsft.model.lora import apply_lora

    cfg = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=32, hidden_size=8, intermediate_size=16,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   tie_word_embeddings=False))
    model = Llama(cfg, rngs=nnx.Rngs(0))
    return apply_lora(model, r=2, alpha=4, dropout=0.0) if lora else model


def _paths(model, filt):
    return {optim.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.as_pure(nnx.state(model, filt)))}


def test_trainable_filter_selects_full_lora_and_new_token_rows():
    full = _small_llama(lora=False)
    every = _paths(full, optim.trainable_filter(lora=False, new_token_rows=False))
    assert "embed_tokens.embedding" in every and "lm_head.kernel" in every and "norm.scale" in every

    model = _small_llama(lora=True)
    lora_only = _paths(model, optim.trainable_filter(lora=True, new_token_rows=False))
    assert lora_only and all(p.endswith(("lora_a", "lora_b")) for p in lora_only)
    assert len(lora_only) == 2 * 7  # every linear of the one layer

    with_rows = _paths(model, optim.trainable_filter(lora=True, new_token_rows=True))
    assert with_rows == lora_only | {"embed_tokens.embedding", "lm_head.kernel"}


def test_adafactor_treats_each_stacked_layer_as_its_own_matrix():
    """The decoder layers are stacked ([N, in, out] under `layers`): Adafactor's factored moments and RMS clipping
    must see each layer's matrix, as transformers' Adafactor does on the unstacked model."""
    from jsft.optim import make_optimizer

    training = TrainingConfig(optim="adafactor", learning_rate=0.01, lr_scheduler_type="constant", max_grad_norm=0.0)
    tx, _ = make_optimizer(training, total_steps=10)
    rng = np.random.RandomState(0)
    kernel = jnp.asarray(rng.normal(size=(3, 4, 6)) * np.array([1.0, 10.0, 100.0])[:, None, None], jnp.float32)
    grads = jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32) * jnp.array([1.0, 1e-3, 1e3])[:, None, None]
    stacked = {"layers": {"k": kernel}}
    updates, _ = tx.update({"layers": {"k": grads}}, tx.init(stacked), stacked)
    for i in range(3):
        one = {"w": kernel[i]}
        want, _ = tx.update({"w": grads[i]}, tx.init(one), one)
        np.testing.assert_allclose(np.asarray(updates["layers"]["k"][i]), np.asarray(want["w"]), rtol=1e-5)
