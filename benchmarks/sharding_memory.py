"""Per-device memory of parameters, gradients and Adam state for each mesh shape, on 8 simulated devices.

    python benchmarks/sharding_memory.py   # prints a table; writes benchmarks/results/sharding_memory-cpu8-<date>.json

Nothing is materialized: the model and its optimizer are built with nnx.eval_shape, jsft.sharding gives each
array its NamedSharding, and a device's bytes are the sum of its shard shapes. So Llama-3-8B costs nothing here.
Params are bfloat16 (jsft's default; LoRA adapters float32), gradients are accumulated in float32 (jsft.step),
Adam's mu and nu are float32 (jsft.optim.make_optimizer, optimizer_state_dtype="float32"). Activations are not
counted (they depend on batch, length, remat), nor are XLA's temporary all-gather buffers under FSDP.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jsft import sharding  # noqa: E402
from jsft.config import ShardingConfig, TrainingConfig  # noqa: E402
from jsft.model.llama import Llama, LlamaConfig  # noqa: E402
from jsft.model.lora import apply_lora  # noqa: E402
from jsft.optim import make_optimizer  # noqa: E402

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 4, 2)]
CONFIGS = {
    "mid-0.9B (random)": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                            num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                            tie_word_embeddings=False),
    "Llama-3-8B": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
}
GiB = 2**30


def device_bytes(abstract_state, mesh) -> int:
    """Bytes one device holds (every shard has the same shape under an even split, so device 0 is any device)."""
    shardings = sharding.model_shardings(abstract_state, mesh)
    total = 0
    for x, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def measure(hf: dict, lora_r: int = 0) -> dict:
    """Per-device bytes on each mesh; with lora_r, LoRA on all linear layers (only adapters get grads/Adam)."""
    cfg = LlamaConfig.from_hf(hf)
    tx, _ = make_optimizer(TrainingConfig(), total_steps=1000)  # jsft's Adam: fp32 mu and nu
    wrt = nnx.LoRAParam if lora_r else nnx.Param

    def build():
        model = Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
        return apply_lora(model, r=lora_r, alpha=2 * lora_r, dropout=0.0) if lora_r else model

    model = nnx.eval_shape(build)
    optimizer = nnx.eval_shape(lambda m: nnx.Optimizer(m, tx, wrt=wrt), model)
    params = nnx.state(model, nnx.Param)  # LoRAParam is a Param: adapters included
    grads = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), nnx.state(model, wrt))
    rows = {}
    for shape in MESHES:
        mesh = sharding.create_mesh(ShardingConfig(mesh_shape=dict(zip(sharding.MESH_AXES, shape))))
        p, g, o = device_bytes(params, mesh), device_bytes(grads, mesh), device_bytes(nnx.state(optimizer), mesh)
        rows["x".join(map(str, shape))] = dict(params=p, grads=g, adam=o, total=p + g + o)
    return dict(num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
                num_trained=sum(math.prod(x.shape) for x in jax.tree.leaves(grads)), lora_r=lora_r,
                hf_config=hf, per_device_bytes=rows)


def main():
    assert jax.device_count() == 8, f"needs 8 devices, got {jax.device_count()} (XLA_FLAGS)"
    results = {name: measure(hf) for name, hf in CONFIGS.items()}
    results["Llama-3-8B LoRA r16"] = measure(CONFIGS["Llama-3-8B"], lora_r=16)
    print("per-device memory, GiB (params bf16 | grads fp32 | Adam mu+nu fp32 | total); activations not counted")
    print(f"{'model':20s} {'mesh (d,f,t)':>12s} {'params':>8s} {'grads':>8s} {'adam':>8s} {'total':>8s}")
    for name, r in results.items():
        for mesh, b in r["per_device_bytes"].items():
            print(f"{name:20s} {mesh:>12s} " + " ".join(f"{b[k] / GiB:8.3f}" for k in ("params", "grads", "adam",
                                                                                         "total")))
        print(f"{'':20s} {r['num_params'] / 1e9:.3f} B parameters, {r['num_trained'] / 1e6:.1f} M trained")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = Path(__file__).parent / "results" / f"sharding_memory-cpu8-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), date=date, jax=jax.__version__,
                  devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}", rules=dict(sharding.RULES),
                  results=results)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
