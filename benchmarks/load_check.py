"""What the NaN/inf check of loaded weights (jsft.hf.check_finite) costs, on a mid-size checkpoint.

    python benchmarks/load_check.py [--layers 16]   # writes benchmarks/results/load_check-cpu-<date>.json

Writes a random ~0.9B-parameter Llama checkpoint (bf16 safetensors, 2 shards) to a temporary directory, then times
jsft.hf.load_model with the check and with it replaced by a no-op, alternating (page cache warm, so the file read is
memory speed: the check's share is the largest it can be), and the check alone over every tensor.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import git_commit  # noqa: E402

from jsft import hf  # noqa: E402

MID = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=2048,
           intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
           max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def write_checkpoint(out: Path, config: dict) -> int:
    """Random bf16 tensors of an HF Llama checkpoint in two shards; returns the parameter count."""
    H, F, V, L = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]
    D = H // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * D
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, H),
                       p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                       p + "mlp.down_proj.weight": (H, F), p + "input_layernorm.weight": (H,),
                       p + "post_attention_layernorm.weight": (H,)})
    rng = np.random.default_rng(0)
    names = sorted(shapes)
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        tensors = {n: (0.02 * rng.standard_normal(shapes[n], dtype=np.float32)).astype(ml_dtypes.bfloat16)
                   for n in part}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config))
    return sum(int(np.prod(s)) for s in shapes.values())


def time_load(path: Path, dtype: str, check: bool) -> float:
    original = hf.check_finite
    if not check:
        hf.check_finite = lambda *args: None
    try:
        started = time.perf_counter()
        model, _ = hf.load_model(path, dtype=dtype)
        jax.block_until_ready(jax.tree.leaves(model))
        return time.perf_counter() - started
    finally:
        hf.check_finite = original


def time_check_alone(path: Path, dtype) -> float:
    """check_finite over every tensor, as load_model calls it (after the cast to `dtype`), excluding the read."""
    total = 0.0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "np") as f:
            for name in f.keys():
                block = np.ascontiguousarray(f.get_tensor(name).astype(dtype))
                started = time.perf_counter()
                hf.check_finite(block, name, file)
                total += time.perf_counter() - started
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = dict(MID, num_hidden_layers=args.layers)
    results = {}
    with tempfile.TemporaryDirectory(prefix="jsft-load-check-") as tmp:
        path = Path(tmp)
        params = write_checkpoint(path, config)
        print(f"checkpoint: {params / 1e9:.3f} B parameters, "
              f"{sum(f.stat().st_size for f in path.glob('*.safetensors')) / 2**30:.2f} GiB bf16")
        for dtype in ("bfloat16", "float32"):
            time_load(path, dtype, True)  # warm: page cache, jit of nothing, imports
            on, off = [], []
            for _ in range(args.repeats):
                on.append(time_load(path, dtype, True))
                off.append(time_load(path, dtype, False))
            alone = time_check_alone(path, ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
            row = dict(load_with_check_s=statistics.median(on), load_without_check_s=statistics.median(off),
                       runs_with_check_s=on, runs_without_check_s=off, check_alone_s=alone,
                       check_ns_per_param=alone / params * 1e9)
            row["overhead"] = row["load_with_check_s"] / row["load_without_check_s"] - 1
            results[dtype] = row
            print(f"load as {dtype}: {row['load_with_check_s']:.2f} s with the check, "
                  f"{row['load_without_check_s']:.2f} s without ({row['overhead']:+.1%}); the check alone "
                  f"{alone:.2f} s ({row['check_ns_per_param']:.2f} ns/param)")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = Path(__file__).parent / "results" / f"load_check-cpu-{date}.json"
    load = os.getloadavg()
    record = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), date=date, git_commit=git_commit(),
                  machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_average=load),
                  params=params, hf_config=config, results=results)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
