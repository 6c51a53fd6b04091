"""One process of the multi-host test (tests/test_multihost.py), also importable to run in-process.

    python tests/multihost_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_JSON

Each process starts JAX distributed (gloo collectives on CPU), builds the same tiny model, and for each mesh
trains 3 steps on its own slice of one global batch; process 0 writes {mesh: {"loss": [...], ...}} to OUT_JSON.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

MESHES = [(2, 2, 2), (1, 8, 1)]  # (2,2,2): data crosses the hosts; (1,8,1): fsdp (parameter shards) does
TINY = dict(model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False)
A, B, L = 2, 8, 16


def global_batch(seed=0):
    """The same [A, B, L] batch on every process: 1-3 documents per row, ~70% of targets trained."""
    rng = np.random.default_rng(seed)
    cols = {k: np.zeros((A, B, L), np.int32) for k in ("input_ids", "segment_ids", "positions", "targets")}
    mask = np.zeros((A, B, L), bool)
    for i in range(A):
        for r in range(B):
            cuts = sorted(rng.choice(np.arange(3, L - 2), size=rng.integers(0, 3), replace=False))
            for seg, (s, e) in enumerate(zip([0, *cuts], [*cuts, L - int(rng.integers(0, 3))]), start=1):
                doc = rng.integers(2, 384, e - s)
                cols["input_ids"][i, r, s:e] = doc
                cols["segment_ids"][i, r, s:e] = seg
                cols["positions"][i, r, s:e] = np.arange(e - s)
                cols["targets"][i, r, s : e - 1] = doc[1:]
                mask[i, r, s : e - 1] = rng.random(e - s - 1) < 0.7
    return {**cols, "loss_mask": mask}


def local_slice(batch, index, count):
    """Rows of this process: block `index` of `count` along B (the data pipeline's per-process split)."""
    return {k: v.reshape(A, count, B // count, L)[:, index] for k, v in batch.items()}


def run(meshes=MESHES, steps=3):
    from jsft import sharding
    from jsft.config import ShardingConfig
    from jsft.model.llama import Llama, LlamaConfig
    from jsft.step import train_step

    @nnx.jit
    def pinned_step(model, optimizer, batch):
        metrics = train_step(model, optimizer, batch, loss_type="nll", chunk_size=64)
        sharding.constrain(model)
        sharding.constrain(optimizer)
        return metrics

    cfg = LlamaConfig.from_hf(TINY)
    results = {}
    for shape in meshes:
        mesh = sharding.create_mesh(ShardingConfig(mesh_shape=dict(zip(sharding.MESH_AXES, shape))))
        model = sharding.create_sharded_model(
            lambda: Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32, compute_dtype=jnp.float32,
                          attention_impl="xla"), mesh)
        optimizer = sharding.shard_model(nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param), mesh)
        index, count = sharding.data_process_split(mesh)
        batch = sharding.shard_batch(local_slice(global_batch(), index, count), mesh)
        assert batch["input_ids"].shape == (A, B, L)
        with jax.set_mesh(mesh):
            metrics = [pinned_step(model, optimizer, batch) for _ in range(steps)]
        kernel = model.layer(0).mlp.gate_proj.kernel[...]
        results["x".join(map(str, shape))] = {
            "loss": [float(m["loss"]) for m in metrics],
            "grad_norm": [float(m["grad_norm"]) for m in metrics],
            "split": [index, count],
            "kernel_shard": list(kernel.addressable_shards[0].data.shape),
            "kernel_sum": float(jax.jit(jnp.sum, out_shardings=jax.NamedSharding(mesh, jax.P()))(kernel)),
            "devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
        }
    return results


if __name__ == "__main__":
    port, process_id, num_processes, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jsft import sharding
    from jsft.config import ShardingConfig

    index, count = sharding.initialize_distributed(
        ShardingConfig(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id))
    assert (index, count) == (process_id, num_processes), (index, count)
    results = run()
    if process_id == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    jax.distributed.shutdown()
