"""Per-device memory of one jsft train step, LoRA vs QLoRA, by XLA's own memory analysis of the compiled step.

    python benchmarks/qlora_memory.py [--model Llama-3-8B] [--lengths 4096 8192] [--mesh 1,1,1]
    -> benchmarks/results/qlora_memory-cpu-<date>.json

Nothing is materialized: the model (bf16 base; QLoRA: NF4 + nested projections, embeddings/lm_head/norms bf16),
its LoRA adapters (r=16, all linear layers, float32) and AdamW state are abstract (jax.ShapeDtypeStruct with their
shardings), and jsft.step.train_step is lowered and compiled for one row of L tokens per device with remat "full".
The number is what the trainer's plan prints: arguments + outputs + temporaries - aliased (donated) buffers. It
is XLA:CPU's analysis: a GPU's differs in temporaries (its attention kernel, fusion), not in the weights.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent))
from benchmarks.common import git_commit  # noqa: E402
from jsft import sharding, step  # noqa: E402
from jsft.config import ShardingConfig, TrainingConfig  # noqa: E402
from jsft.model import quant  # noqa: E402
from jsft.model.llama import Llama, LlamaConfig  # noqa: E402
from jsft.model.lora import apply_lora  # noqa: E402
from jsft.optim import make_optimizer  # noqa: E402

MODELS = {
    "Llama-3-8B": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
GiB = 2**30


def abstract_model(hf: dict, quantization: dict | None, lora_r: int, remat: str):
    """An abstract bf16 Llama (quantized projections when asked) with real float32 LoRA adapters."""
    cfg = LlamaConfig.from_hf(hf)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16,
                                         compute_dtype=jnp.bfloat16, attention_impl="xla", remat_policy=remat))
    if quantization:
        quant.abstract_quantized(model, **quantization)  # what jsft.hf.load_model does before reading tensors
    return nnx.eval_shape(lambda m: apply_lora(m, r=lora_r, alpha=2 * lora_r, dropout=0.0), model)


def with_shardings(node, mesh):
    """Every Variable's value -> a ShapeDtypeStruct carrying its NamedSharding (the lowering's input)."""
    state = nnx.state(node)
    nnx.update(node, sharding.abstract_with_shardings(state, mesh))
    return node


def measure(hf: dict, quantization: dict | None, length: int, mesh, lora_r: int = 16, remat: str = "full") -> dict:
    model = abstract_model(hf, quantization, lora_r, remat)
    tx, _ = make_optimizer(TrainingConfig(), total_steps=1000)
    optimizer = nnx.eval_shape(lambda m: nnx.Optimizer(m, tx, wrt=nnx.LoRAParam), model)
    base = quant.bytes_by_dtype(model)
    with_shardings(model, mesh)
    with_shardings(optimizer, mesh)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]  # one row per device on the batch axes
    spec = jax.sharding.NamedSharding(mesh, sharding.batch_spec(3))
    batch = {k: jax.ShapeDtypeStruct((1, rows, length), dt, sharding=spec)
             for k, dt in (("input_ids", jnp.int32), ("segment_ids", jnp.int32), ("positions", jnp.int32),
                           ("targets", jnp.int32), ("loss_mask", jnp.float32))}
    started = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.train_step.lower(model, optimizer, batch, loss_type="nll", chunk_size=1024).compile()
    mem = compiled.memory_analysis()
    need = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return dict(per_device_bytes=int(need), arguments=int(mem.argument_size_in_bytes),
                temporaries=int(mem.temp_size_in_bytes), outputs=int(mem.output_size_in_bytes),
                aliased=int(mem.alias_size_in_bytes), base_bytes_by_dtype=base,
                compile_seconds=round(time.perf_counter() - started, 1))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Llama-3-8B", choices=list(MODELS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor")
    args = parser.parse_args(argv)
    shape = dict(zip(sharding.MESH_AXES, map(int, args.mesh.split(","))))
    devices = jax.devices()[:int(np.prod(list(shape.values())))]
    mesh = sharding.create_mesh(ShardingConfig(mesh_shape=shape), devices=devices)
    variants = {"LoRA (bf16 base)": None, "QLoRA (nf4 + nested)": {"quant_type": "nf4", "nested": True}}
    results = []
    for length in args.lengths:
        for name, q in variants.items():
            r = dict(model=args.model, variant=name, length=length, mesh=shape, lora_r=16, remat="full",
                     **measure(MODELS[args.model], q, length, mesh))
            results.append(r)
            print(f"{args.model} {name:22s} L={length}: {r['per_device_bytes'] / GiB:6.2f} GiB per device "
                  f"(arguments {r['arguments'] / GiB:.2f}, temporaries {r['temporaries'] / GiB:.2f}; base "
                  + ", ".join(f"{k} {v / GiB:.2f}" for k, v in r["base_bytes_by_dtype"].items())
                  + f" GiB; compiled in {r['compile_seconds']} s)", flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = Path(__file__).parent / "results" / f"qlora_memory-cpu-{args.model}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), date=date, commit=git_commit(),
                  jax=jax.__version__, devices=f"{len(devices)} x {jax.devices()[0].device_kind}", results=results)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
