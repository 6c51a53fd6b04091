"""Time of one jsft train step, QLoRA (NF4 + nested base) vs LoRA (the same base in bf16/fp32), on this machine.

    python benchmarks/qlora_speed.py [--dtype float32] [--steps 5]
    -> benchmarks/results/qlora_speed-<device>-<date>.json

The same random model (a ~60M-parameter Llama: H=512, F=1536, 8 layers, vocab 8192), LoRA r=16 on all linear
layers, rows of 512 tokens, remat "full", jsft.step.train_step with jsft's AdamW, single device. QLoRA's extra work
is the dequantization of each projection in the forward pass and again in the backward pass (it is rematerialized,
so the bf16 weight is never kept). Reported: median step seconds of each and the ratio QLoRA / LoRA.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
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

HF = dict(model_type="llama", vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
          num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)


def batch(rows: int, length: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(2, vocab, size=(1, rows, length), dtype=np.int32)
    segments = np.ones_like(ids)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()
    return {"input_ids": ids, "segment_ids": segments, "positions": positions,
            "targets": np.roll(ids, -1, axis=-1), "loss_mask": np.ones(ids.shape, np.float32)}


def time_steps(adapt, dtype, rows, length, steps, mesh) -> list[float]:
    """Seconds of each of `steps` LoRA train steps (after 2 warm-up steps) of the HF model, `adapt(model)` having
    added the adapters (and quantized the base, if it does)."""
    cfg = LlamaConfig.from_hf(HF)
    model = Llama(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, compute_dtype=dtype, attention_impl="xla",
                  remat_policy="full")
    adapt(model)
    tx, _ = make_optimizer(TrainingConfig(learning_rate=1e-4), total_steps=1000)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    data = sharding.shard_batch(batch(rows, length, cfg.vocab_size), mesh)
    times = []
    with jax.set_mesh(mesh):
        for i in range(steps + 2):  # 2 warm-up steps (the first compiles)
            started = time.perf_counter()
            metrics = step.train_step(model, optimizer, data, loss_type="nll", chunk_size=1024)
            jax.block_until_ready(metrics["loss"])
            if i >= 2:
                times.append(time.perf_counter() - started)
    return times


def _qlora(quantization, model):
    if quantization:
        quant.quantize_model(model, **quantization)
    apply_lora(model, r=16, alpha=32, dropout=0.0)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    mesh = sharding.create_mesh(ShardingConfig(mesh_shape={"data": 1, "fsdp": 1, "tensor": 1}),
                                devices=jax.devices()[:1])
    results = {}
    for name, q in (("lora", None), ("qlora_nf4_nested", {"quant_type": "nf4", "nested": True})):
        times = time_steps(functools.partial(_qlora, q), dtype, args.rows, args.length, args.steps, mesh)
        results[name] = dict(step_seconds=times, median=float(np.median(times)))
        print(f"{name:18s} median step {results[name]['median']:.3f} s ({len(times)} steps)", flush=True)
    ratio = results["qlora_nf4_nested"]["median"] / results["lora"]["median"]
    print(f"QLoRA / LoRA step time: {ratio:.2f}")
    device = jax.devices()[0]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = Path(__file__).parent / "results" / f"qlora_speed-{device.platform}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), date=date, commit=git_commit(),
                  jax=jax.__version__, device=device.device_kind, cpu_count=os.cpu_count(), dtype=args.dtype,
                  rows=args.rows, length=args.length, hf_config=HF, results=results, ratio=ratio)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
