"""StableHLO size and lowering / CPU compile time of jsft's train step, scanned vs unrolled layers.

    python benchmarks/compile_size.py [--layers 4 32] [--compile-layers 4] [--length 512] [--variants scan] [--tag T]
    # writes benchmarks/results/compile_size-cpu-<date>.json

Llama-3-8B shapes, abstract (nnx.eval_shape: no weights anywhere), bf16 params, remat "full", one device, the step
users run (jsft.step.train_step with jsft's AdamW): full fine-tuning and LoRA r=16 on all linear layers. "unrolled"
is the same stacked model with Llama(scan_layers=False): its N layers in a Python loop, as the model was before the
scan. Compiles on this CPU are slow for 32 unrolled 8B layers, so only the --compile-layers counts are compiled.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent))
from benchmarks.common import git_commit  # noqa: E402
from jsft import step  # noqa: E402
from jsft.config import TrainingConfig  # noqa: E402
from jsft.model.llama import Llama, LlamaConfig  # noqa: E402
from jsft.model.lora import apply_lora  # noqa: E402
from jsft.optim import make_optimizer  # noqa: E402

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def abstract_step(layers: int, scan: bool, lora: bool):
    cfg = LlamaConfig.from_hf(dict(LLAMA3_8B, num_hidden_layers=layers))

    def build():
        model = Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16,
                      attention_impl="xla", remat_policy="full", scan_layers=scan)
        return apply_lora(model, r=16, alpha=32, dropout=0.0) if lora else model

    model = nnx.eval_shape(build)
    tx, schedule = make_optimizer(TrainingConfig(), total_steps=1000)
    wrt = nnx.LoRAParam if lora else nnx.Param
    optimizer = nnx.eval_shape(lambda m: nnx.Optimizer(m, tx, wrt=wrt), model)
    return model, optimizer, schedule


def measure(layers: int, scan: bool, lora: bool, length: int, compile_it: bool) -> dict:
    model, optimizer, schedule = abstract_step(layers, scan, lora)
    batch = {k: jax.ShapeDtypeStruct((1, 1, length), jnp.int32) for k in step.BATCH_KEYS}
    step.train_step.jitted_fn.clear_cache()
    start = time.perf_counter()
    lowered = step.train_step.lower(model, optimizer, batch, loss_type="nll", chunk_size=1024, schedule=schedule)
    text = lowered.as_text()
    row = dict(layers=layers, scan=scan, lora=lora, lower_s=round(time.perf_counter() - start, 2),
               stablehlo_chars=len(text), stablehlo_lines=text.count("\n"))
    if compile_it:
        start = time.perf_counter()
        lowered.compile()
        row["compile_s"] = round(time.perf_counter() - start, 2)
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--compile-layers", type=int, nargs="*", default=[4])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--variants", nargs="+", default=["unrolled", "scan"], choices=["unrolled", "scan"])
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = [measure(n, scan, lora, args.length, n in args.compile_layers)
            for lora in (True, False) for scan in (False, True) for n in args.layers
            if ("scan" if scan else "unrolled") in args.variants]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = Path(__file__).parent / "results" / f"compile_size-cpu-{date}{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), date=date, commit=git_commit(),
                  jax=jax.__version__, device=jax.devices()[0].device_kind, cpus=os.cpu_count(),
                  load_average_before=load_before, load_average_after=os.getloadavg(), model="Llama-3-8B shapes",
                  length=args.length, remat="full", rows=rows)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
