"""Time of one jsft train step, DoRA vs LoRA on the same model, on this machine.

    python benchmarks/dora_speed.py [--dtype float32] [--steps 5] [--rows 2] [--length 256]
    -> benchmarks/results/dora_speed-<device>-<date>.json

The model, rows and optimizer of benchmarks/qlora_speed.py (a ~60M-parameter Llama: H=512, F=1536, 8 layers), LoRA
r=16 on all linear layers, remat "full", single device. DoRA's extra work, as in PEFT: per projection and layer,
W + s B A and its column norm (no gradient), the magnitude scaling, and with dropout active a second base matmul
on the dropped input (here dropout 0.05, training mode, as a run trains). Reported: median step seconds of each,
the ratio DoRA / LoRA, and the load average (the machine may be shared).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent))
from benchmarks.common import git_commit  # noqa: E402
from benchmarks.qlora_speed import HF, time_steps  # noqa: E402
from jsft import sharding  # noqa: E402
from jsft.config import ShardingConfig  # noqa: E402
from jsft.model.lora import apply_lora  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    mesh = sharding.create_mesh(ShardingConfig(mesh_shape={"data": 1, "fsdp": 1, "tensor": 1}),
                                devices=jax.devices()[:1])
    load_before = os.getloadavg()
    results = {}
    for name, use_dora in (("lora", False), ("dora", True)):
        adapt = functools.partial(apply_lora, r=16, alpha=32, dropout=0.05, use_dora=use_dora)
        times = time_steps(adapt, dtype, args.rows, args.length, args.steps, mesh)
        results[name] = dict(step_seconds=times, median=float(np.median(times)))
        print(f"{name:5s} median step {results[name]['median']:.3f} s ({len(times)} steps)", flush=True)
    ratio = results["dora"]["median"] / results["lora"]["median"]
    print(f"DoRA / LoRA step time: {ratio:.2f}; load average before {load_before}, after {os.getloadavg()}")
    device = jax.devices()[0]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = Path(__file__).parent / "results" / f"dora_speed-{device.platform}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), date=date, commit=git_commit(),
                  jax=jax.__version__, device=device.device_kind, cpu_count=os.cpu_count(), dtype=args.dtype,
                  rows=args.rows, length=args.length, hf_config=HF, results=results, ratio=ratio,
                  load_average_before=load_before, load_average_after=os.getloadavg())
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
