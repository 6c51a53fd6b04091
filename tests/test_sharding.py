"""Data / FSDP / tensor parallelism on 8 CPU devices: the same numbers as one device, really sharded params,
checkpoints that move between meshes, HF weights loaded straight into shards."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jsft import sharding
from jsft.config import ShardingConfig, TrainingConfig
from jsft.model.llama import Llama, LlamaConfig
from jsft.model.lora import apply_lora
from jsft.optim import make_optimizer
from jsft.step import train_step

TINY = dict(model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False)
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
# Each mesh compiles the step once (~6 s on 2 free cores): plain data parallel and the single-axis LoRA runs are slow.
SLOW = pytest.mark.slow
FULL_MESHES = [pytest.param(MESHES[0], marks=SLOW), *MESHES[1:]]
LORA_MESHES = [pytest.param(m, marks=SLOW) for m in MESHES[:2]] + MESHES[2:]
A, B, L = 2, 8, 16


def make_model(hf=TINY):
    """The tiny fp32 Llama, initialized in one compiled call (eager init compiles every initializer separately)."""
    return nnx.jit(lambda: build_model(hf))()


def build_model(hf):
    return Llama(LlamaConfig.from_hf(hf), rngs=nnx.Rngs(0), param_dtype=jnp.float32, compute_dtype=jnp.float32,
                 attention_impl="xla")


def mesh_of(shape):
    n = int(np.prod(shape))
    return sharding.create_mesh(ShardingConfig(mesh_shape=dict(zip(sharding.MESH_AXES, shape))), jax.devices()[:n])


def packed_batch(seed=0, a=A, b=B, length=L, vocab=384):
    """[a, b, length] rows of 1-3 documents, targets shifted per document, ~70% of positions trained."""
    rng = np.random.default_rng(seed)
    cols = {k: np.zeros((a, b, length), np.int32) for k in ("input_ids", "segment_ids", "positions", "targets")}
    mask = np.zeros((a, b, length), bool)
    for i in range(a):
        for r in range(b):
            cuts = sorted(rng.choice(np.arange(3, length - 2), size=rng.integers(0, 3), replace=False))
            for seg, (s, e) in enumerate(zip([0, *cuts], [*cuts, length - int(rng.integers(0, 3))]), start=1):
                doc = rng.integers(2, vocab, e - s)
                cols["input_ids"][i, r, s:e] = doc
                cols["segment_ids"][i, r, s:e] = seg
                cols["positions"][i, r, s:e] = np.arange(e - s)
                cols["targets"][i, r, s : e - 1] = doc[1:]
                mask[i, r, s : e - 1] = rng.random(e - s - 1) < 0.7
    return {**cols, "loss_mask": mask}


@nnx.jit(static_argnames=("chunk_size",))
def pinned_step(model, optimizer, batch, chunk_size=64):
    """The real train step, with every output pinned to its sharding (one compile per mesh)."""
    metrics = train_step(model, optimizer, batch, loss_type="nll", chunk_size=chunk_size)
    sharding.constrain(model)
    sharding.constrain(optimizer)
    return metrics


@contextlib.contextmanager
def count_compiles():
    """Collects one entry per XLA compilation inside the block."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_count_compiles_sees_a_compile():
    with count_compiles() as compiles:
        jax.jit(lambda x: x * 3 + 1)(np.arange(7.0))
    assert len(compiles) == 1


@pytest.fixture(scope="module")
def base_model():
    return make_model()


def train(base_model, shape, lora, steps=3, lr=0.5):
    """(losses, grad norms, {path: trainable param after the steps} as numpy, model, optimizer)."""
    mesh = mesh_of(shape)
    model = nnx.clone(base_model)
    if lora:
        apply_lora(model, r=8, alpha=16, dropout=0.0, rngs=nnx.Rngs(1))
    sharding.shard_model(model, mesh)
    wrt = nnx.LoRAParam if lora else nnx.Param
    optimizer = sharding.shard_model(nnx.Optimizer(model, optax.sgd(lr), wrt=wrt), mesh)
    batch = sharding.shard_batch(packed_batch(), mesh)
    with jax.set_mesh(mesh):
        metrics = [pinned_step(model, optimizer, batch)]
        with count_compiles() as compiles:
            metrics += [pinned_step(model, optimizer, batch) for _ in range(steps - 1)]
    assert compiles == [], "the step compiled again: its outputs left their shardings"
    params = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, wrt))}
    return [float(m["loss"]) for m in metrics], [float(m["grad_norm"]) for m in metrics], params, model, optimizer


@pytest.fixture(scope="module")
def reference(base_model):
    """The single-device run, full fine-tuning and LoRA."""
    return {lora: train(base_model, (1, 1, 1), lora)[:3] for lora in (False, True)}


def assert_same_run(run, ref, base_params):
    losses, norms, params = run[:3]
    ref_losses, ref_norms, ref_params = ref
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5, atol=1e-6)
    assert ref_losses[2] < ref_losses[0] - 0.05  # the run really trained
    assert params.keys() == ref_params.keys()
    for k in params:  # SGD: (param after 3 steps - initial) / -lr = sum of the 3 gradients
        np.testing.assert_allclose(params[k] - base_params[k], ref_params[k] - base_params[k], rtol=1e-5,
                                   atol=1e-5 * 0.5, err_msg=str(k))


@pytest.mark.parametrize("shape", FULL_MESHES, ids=lambda s: "x".join(map(str, s)))
def test_full_finetune_equals_single_device(base_model, reference, shape):
    init = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(base_model, nnx.Param))}
    run = train(base_model, shape, lora=False)
    assert_same_run(run, reference[False], init)
    gate = run[3].layer(0).mlp.gate_proj.kernel[...]
    assert gate.sharding.is_equivalent_to(jax.NamedSharding(mesh_of(shape), P("fsdp", "tensor")), 2)


@pytest.mark.parametrize("shape", LORA_MESHES, ids=lambda s: "x".join(map(str, s)))
def test_lora_equals_single_device(base_model, reference, shape):
    ref = reference[True]
    run = train(base_model, shape, lora=True)
    init_model = nnx.clone(base_model)
    apply_lora(init_model, r=8, alpha=16, dropout=0.0, rngs=nnx.Rngs(1))
    init = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(init_model, nnx.LoRAParam))}
    assert_same_run(run, ref, init)
    model = run[3]
    lora_b = model.layer(0).mlp.down_proj.lora_b[...]  # [r, embed]: ("lora_rank", "embed")
    assert lora_b.sharding.is_equivalent_to(jax.NamedSharding(mesh_of(shape), P(None, "fsdp")), 2)


# ----------------------------------------------------------------------------------------------- placement

# Per-device shard shapes of every kind of weight (hidden 64, 4 heads x 16, 2 kv heads, mlp 128, vocab 384).
SHARD_SHAPES = {
    (1, 8, 1): {"embed_tokens.embedding": (384, 8), "q_proj.kernel": (8, 64), "k_proj.kernel": (8, 32),
                "o_proj.kernel": (64, 8), "gate_proj.kernel": (8, 128), "down_proj.kernel": (128, 8),
                "input_layernorm.scale": (64,), "norm.scale": (64,), "lm_head.kernel": (8, 384)},
    (1, 1, 8): {"embed_tokens.embedding": (48, 64), "q_proj.kernel": (64, 8), "k_proj.kernel": (64, 4),
                "o_proj.kernel": (8, 64), "gate_proj.kernel": (64, 16), "down_proj.kernel": (16, 64),
                "input_layernorm.scale": (64,), "norm.scale": (64,), "lm_head.kernel": (64, 48)},
    (1, 4, 2): {"embed_tokens.embedding": (192, 16), "q_proj.kernel": (16, 32), "k_proj.kernel": (16, 16),
                "o_proj.kernel": (32, 16), "gate_proj.kernel": (16, 64), "down_proj.kernel": (64, 16),
                "input_layernorm.scale": (64,), "norm.scale": (64,), "lm_head.kernel": (16, 192)},
}
SPECS = {"embed_tokens.embedding": P("tensor", "fsdp"), "q_proj.kernel": P("fsdp", "tensor"),
         "k_proj.kernel": P("fsdp", "tensor"), "o_proj.kernel": P("tensor", "fsdp"),
         "gate_proj.kernel": P("fsdp", "tensor"), "down_proj.kernel": P("tensor", "fsdp"),
         "input_layernorm.scale": P(), "norm.scale": P(), "lm_head.kernel": P("fsdp", "tensor")}


def spec_of(path, suffix):
    """SPECS[suffix], with the stacked layers' leading axis (never sharded) for parameters under layers."""
    spec = (None, *SPECS[suffix]) if path.startswith("layers.") else tuple(SPECS[suffix])
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return P(*spec)


def shard_shape_of(path, shard_shape, layers=TINY["num_hidden_layers"]):
    return (layers, *shard_shape) if path.startswith("layers.") else shard_shape


def _flat_params(node, kind=nnx.Param):
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(node, kind))}


@pytest.mark.parametrize("shape", list(SHARD_SHAPES), ids=lambda s: "x".join(map(str, s)))
def test_params_and_optimizer_state_are_really_sharded(base_model, shape):
    mesh = mesh_of(shape)
    model = sharding.shard_model(nnx.clone(base_model), mesh)
    optimizer = sharding.shard_model(nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param), mesh)
    params = _flat_params(model)
    checked = set()
    for path, array in params.items():
        for suffix, shard_shape in SHARD_SHAPES[shape].items():
            if path == suffix or path.endswith("." + suffix):
                assert array.sharding.is_equivalent_to(jax.NamedSharding(mesh, spec_of(path, suffix)), array.ndim), path
                if shape == (1, 4, 2):  # no axis of size 1: the spec is literally the table's
                    assert array.sharding.spec == spec_of(path, suffix), path
                assert {s.data.shape for s in array.addressable_shards} == {shard_shape_of(path, shard_shape)}, path
                assert len(array.addressable_shards) == 8
                checked.add(suffix)
    assert checked == set(SHARD_SHAPES[shape])
    # adam moments inherit the params' placement
    mu = optimizer.opt_state[0].mu["layers"]["mlp"]["gate_proj"]["kernel"][...]
    assert mu.sharding.spec == params["layers.mlp.gate_proj.kernel"].sharding.spec
    assert mu.addressable_shards[0].data.shape == (TINY["num_hidden_layers"], *SHARD_SHAPES[shape]["gate_proj.kernel"])
    # per-device bytes: everything but the norms is split 8 ways
    total = sum(a.nbytes for a in params.values())
    norms = sum(a.nbytes for p, a in params.items() if p.endswith("scale"))
    per_device = sum(a.addressable_shards[0].data.nbytes for a in params.values())
    assert per_device == (total - norms) // 8 + norms


def test_optimizer_state_is_built_in_its_shards(base_model):
    """jsft's Adam (fp32 moments made with jnp.zeros) lands whole on one device unless built sharded."""
    from jsft.config import TrainingConfig
    from jsft.optim import make_optimizer

    mesh = mesh_of((1, 8, 1))
    model = sharding.shard_model(nnx.clone(base_model), mesh)
    tx, _ = make_optimizer(TrainingConfig(), total_steps=10)
    optimizer = sharding.create_sharded_optimizer(model, tx, nnx.Param, mesh)
    moments = {k: v.get_value() for k, v in nnx.to_flat_state(nnx.state(optimizer))
               if "embedding" in map(str, k) and v.get_value().ndim == 2}
    assert len(moments) == 2  # mu, nu
    for key, m in moments.items():
        assert m.dtype == jnp.float32 and m.sharding.spec == P(None, "fsdp"), key
        assert m.addressable_shards[0].data.shape == (384, 8) and not np.any(np.asarray(m))
    plain = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for k, v in nnx.to_flat_state(nnx.state(plain)):
        if "embedding" in map(str, k) and v.get_value().ndim == 2:
            assert len(v.get_value().sharding.device_set) == 1, k


def test_data_parallel_replicates_params_and_splits_batch(base_model):
    mesh = mesh_of((8, 1, 1))
    model = sharding.shard_model(nnx.clone(base_model), mesh)
    kernel = model.layer(0).mlp.gate_proj.kernel[...]
    assert kernel.is_fully_replicated
    batch = sharding.shard_batch(packed_batch(), mesh)
    ids = batch["input_ids"]
    assert ids.shape == (A, B, L) and ids.sharding.spec == P(None, ("data", "fsdp"), None)
    assert {s.data.shape for s in ids.addressable_shards} == {(A, 1, L)}
    np.testing.assert_array_equal(np.asarray(ids), packed_batch()["input_ids"])


def test_create_sharded_model_builds_straight_into_shards():
    mesh = mesh_of((1, 4, 2))
    model = sharding.create_sharded_model(lambda: build_model(TINY), mesh)
    reference = _flat_params(make_model())
    for path, array in _flat_params(model).items():
        suffix = next((s for s in SPECS if path == s or path.endswith("." + s)), None)
        if suffix:
            assert array.sharding.spec == spec_of(path, suffix), path
        np.testing.assert_allclose(np.asarray(array), np.asarray(reference[path]), rtol=1e-6, err_msg=path)


def test_model_shardings_work_on_abstract_llama_8b():
    hf = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
              num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8)
    abstract = nnx.eval_shape(lambda: Llama(LlamaConfig.from_hf(hf), rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    targets = sharding.abstract_with_shardings(abstract, mesh_of((1, 4, 2)))
    flat = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(targets)}
    k_proj = flat["layers.self_attn.k_proj.kernel"]
    assert isinstance(k_proj, jax.ShapeDtypeStruct) and k_proj.shape == (2, 4096, 1024)
    assert k_proj.sharding.shard_shape(k_proj.shape) == (2, 1024, 512)  # every device holds every layer
    assert flat["embed_tokens.embedding"].sharding.shard_shape((128256, 4096)) == (64128, 1024)


# ----------------------------------------------------------------------------------------------- rules and errors


def test_mesh_axis_sizes_and_errors():
    assert sharding.mesh_axis_sizes({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    assert sharding.mesh_axis_sizes({"tensor": 8}, 8) == (1, 1, 8)
    assert dict(mesh_of((2, 2, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.create_mesh(ShardingConfig()).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(sharding.ShardingError, match="uses 4 devices but 8 are present"):
        sharding.create_mesh(ShardingConfig(mesh_shape={"data": 2, "fsdp": 2, "tensor": 1}))
    with pytest.raises(sharding.ShardingError, match="does not divide the 8 devices"):
        sharding.create_mesh(ShardingConfig(mesh_shape={"data": -1, "fsdp": 3, "tensor": 1}))
    with pytest.raises(sharding.ShardingError, match="at most one axis may be -1"):
        sharding.mesh_axis_sizes({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(sharding.ShardingError, match="unknown axes"):
        sharding.mesh_axis_sizes({"pipeline": 2}, 8)


def test_indivisible_dim_is_replicated_with_a_warning():
    mesh = mesh_of((1, 2, 4))
    with pytest.warns(UserWarning, match=r"layers.0.k_proj.kernel shape \(64, 6\): dim 'kv_heads'=6 .*tensor"):
        spec = sharding.logical_to_spec(("embed", "kv_heads"), (64, 6), mesh, "layers.0.k_proj.kernel")
    assert spec == P("fsdp")
    assert sharding.logical_to_spec(("batch", "length"), (8, 16), mesh_of((2, 2, 2))) == P(("data", "fsdp"))
    assert sharding.logical_to_spec(("batch", "length"), (8, 16), mesh) == P("fsdp")  # size-1 axes left out


def test_unknown_logical_axis_names_the_param():
    with pytest.raises(sharding.ShardingError, match=r"w\.kernel: logical axis 'experts'.*not in jsft.sharding.RULES"):
        sharding.logical_to_spec(("experts", "embed"), (4, 64), mesh_of((1, 8, 1)), "w.kernel")


def test_shard_batch_refuses_a_batch_that_does_not_divide():
    with pytest.raises(sharding.ShardingError, match="B_local=6 must be a multiple of the 4 batch shards"):
        sharding.shard_batch(packed_batch(b=6), mesh_of((2, 2, 2)))


def test_constrain_is_a_no_op_without_a_mesh(base_model):
    @nnx.jit
    def touch(model):
        sharding.constrain(model)
        return model.norm.scale[...].sum()

    np.testing.assert_allclose(float(touch(nnx.clone(base_model))), float(base_model.norm.scale[...].sum()))


def test_shard_activation_keeps_batch_split_and_hidden_whole():
    mesh = mesh_of((2, 2, 2))
    x = np.ones((8, 16, 64), np.float32)

    @jax.jit
    def f(x):
        return sharding.shard_activation(x * 2, ("batch", "length", "embed"))

    @jax.jit
    def g(x):
        return sharding.shard_activation(x * 2, ("batch", "length", "q_heads"))

    assert np.asarray(f(x)).sum() == 2 * x.size  # no mesh: unchanged, runs
    with jax.set_mesh(mesh):
        assert f(x).sharding.spec == P(("data", "fsdp"))
        assert g(x).sharding.spec == P(("data", "fsdp"), None, "tensor")


def test_data_process_split_single_process():
    assert sharding.data_process_split(mesh_of((2, 2, 2))) == (0, 1)


def test_batch_split_of_processes_on_the_mesh():
    """Which slice of the global batch each host loads, for mesh layouts over 2 or 4 hosts."""
    data_across = np.array([0, 0, 0, 0, 1, 1, 1, 1]).reshape(2, 2, 2)  # data=2 crosses the 2 hosts
    assert [sharding.batch_split(data_across, p) for p in (0, 1)] == [(0, 2), (1, 2)]
    fsdp_across = np.array([0, 0, 0, 0, 1, 1, 1, 1]).reshape(1, 8, 1)
    assert [sharding.batch_split(fsdp_across, p) for p in (0, 1)] == [(0, 2), (1, 2)]
    tensor_across = np.array([0, 0, 1, 1, 2, 2, 3, 3]).reshape(2, 1, 4)  # tensor=4 spans 2 hosts
    assert [sharding.batch_split(tensor_across, p) for p in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    uneven = np.array([0, 0, 0, 1]).reshape(1, 4, 1)
    with pytest.raises(sharding.ShardingError, match="overlapping or uneven batch shards"):
        sharding.batch_split(uneven, 0)


def test_initialize_distributed_explicit_and_auto_detected(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_GPUS_ON_NODE",
                "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    sharding.initialize_distributed(ShardingConfig(coordinator_address="10.0.0.1:1234", num_processes=4,
                                                   process_id=3))
    assert calls[-1] == (("10.0.0.1:1234", 4, 3), {})
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "16")  # srun, one task per GPU: JAX reads everything itself
    sharding.initialize_distributed(ShardingConfig())
    assert calls[-1] == ((), {"local_device_ids": None})
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")  # one task per node sees all its GPUs
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    sharding.initialize_distributed(ShardingConfig())
    assert calls[-1] == ((), {"local_device_ids": list(range(8))})
    with pytest.raises(sharding.ShardingError, match=r"process_id=4 must be in \[0, num_processes=4\)"):
        sharding.initialize_distributed(ShardingConfig(coordinator_address="h:1", num_processes=4, process_id=4))
    assert len(calls) == 3


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "1")  # an allocation with a single task is still one process
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert sharding.initialize_distributed(ShardingConfig()) == (0, 1)
    with pytest.raises(sharding.ShardingError, match="also set sharding.num_processes"):
        sharding.initialize_distributed(ShardingConfig(coordinator_address="127.0.0.1:1234"))
    assert not jax.distributed.is_initialized()


# ----------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_saved_on_8_devices_restores_on_2(base_model, tmp_path):
    """Train a step on a (2, 2, 2) mesh, save with Orbax, restore onto a 2-device mesh (targets carry the small
    mesh's shardings): the next step gives the same loss and gradient norm, params and Adam moments came back."""
    big = mesh_of((2, 2, 2))
    model = sharding.shard_model(nnx.clone(base_model), big)
    optimizer = sharding.create_sharded_optimizer(model, optax.adamw(1e-2), nnx.Param, big)
    batches = [sharding.shard_batch(packed_batch(seed), big) for seed in (1, 2)]
    with jax.set_mesh(big):
        pinned_step(model, optimizer, batches[0])
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "ckpt", {"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
    ckptr.wait_until_finished()
    with jax.set_mesh(big):
        expected = pinned_step(model, optimizer, batches[1])

    small = sharding.create_mesh(ShardingConfig(mesh_shape={"data": 1, "fsdp": 2, "tensor": 1}), jax.devices()[:2])
    model2 = nnx.eval_shape(lambda: build_model(TINY))
    optimizer2 = nnx.eval_shape(lambda: nnx.Optimizer(build_model(TINY), optax.adamw(1e-2), wrt=nnx.Param))
    target = {"model": sharding.abstract_with_shardings(model2, small),
              "optimizer": sharding.abstract_with_shardings(optimizer2, small)}
    restored = ckptr.restore(tmp_path / "ckpt", target)
    model2 = make_model()  # a real module to receive the arrays
    optimizer2 = nnx.Optimizer(model2, optax.adamw(1e-2), wrt=nnx.Param)
    nnx.update(model2, restored["model"])
    nnx.update(optimizer2, restored["optimizer"])
    kernel = model2.layer(0).mlp.gate_proj.kernel[...]
    assert kernel.sharding.device_set == set(jax.devices()[:2]) and kernel.addressable_shards[0].data.shape == (32, 128)
    assert int(optimizer2.step[...]) == 1
    with jax.set_mesh(small):
        got = pinned_step(model2, optimizer2, sharding.shard_batch(packed_batch(2), small))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(got[key]), float(expected[key]), rtol=1e-5, err_msg=key)


def test_hf_weights_load_straight_into_shards(base_model, tmp_path):
    """An HF safetensors checkpoint (written by jsft.hf, in several files) read slice by slice into shards."""
    from jsft.hf import load_model, save_model

    save_model(base_model, tmp_path / "hf", max_shard_bytes=100_000)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    plain, cfg = load_model(tmp_path / "hf", dtype=jnp.float32, attention_impl="xla")
    mesh = mesh_of((1, 4, 2))
    shardings = sharding.model_shardings(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))), mesh)
    sharded, _ = load_model(tmp_path / "hf", dtype=jnp.float32, attention_impl="xla", shardings=shardings)
    plain_params, sharded_params = _flat_params(plain), _flat_params(sharded)
    assert plain_params.keys() == sharded_params.keys() == _flat_params(base_model).keys()
    for path, array in sharded_params.items():
        suffix = next((s for s in SPECS if path == s or path.endswith("." + s)), None)
        if suffix:
            assert array.sharding.spec == spec_of(path, suffix), path
        assert len(array.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(array), np.asarray(plain_params[path]), err_msg=path)


def test_adafactor_factored_state_is_replicated_on_an_fsdp_mesh():
    """Adafactor keeps a row and a column vector per matrix (and a (1,) placeholder per vector): shapes that are
    not their param's, so they are replicated instead of failing the param's logical axes (ShardingError before)."""
    mesh = sharding.create_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    tx, _ = make_optimizer(TrainingConfig(optim="adafactor"), total_steps=10)  # each stacked layer on its own
    model = make_model()
    optimizer = sharding.create_sharded_optimizer(model, tx, nnx.Param, mesh)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(optimizer.opt_state))[0]
    rows = [v for path, v in leaves if "v_row" in jax.tree_util.keystr(path)]
    layers = model.cfg.num_layers
    assert rows and all(v.sharding.spec == P() and len(v.sharding.device_set) == 8 for v in rows)
    assert any(v.shape[0] == layers and v.ndim == 2 for v in rows)  # [layers, rows]: one statistic per layer
