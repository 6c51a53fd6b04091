"""Throughput of the trainer's own step on random-init Llama models with real shapes: tokens/s, MFU, HFU, memory.

    python benchmarks/gpu.py                                  # 1b-full and 8b-lora (CONFIGS), each in its own process
    python benchmarks/gpu.py --configs 1b-full --set attention=xla steps=3 --out /tmp/x.json
    python benchmarks/gpu.py --smoke --peak-tflops 0.001      # smoke-full and smoke-lora on CPU (the test runs this)

One configuration = one entry of CONFIGS (model, mode full|lora, L, micro-batch B, remat, attention impl), with
`--set field=value` applied to each. It runs exactly what `python -m jsft.train` runs per step: `jsft.step.train_step`
with `jsft.optim.make_optimizer` (AdamW, fp32 moments, gradient clipping at 1.0, TrainingConfig's defaults) on a
one-device mesh (`jax.set_mesh`), with the model and optimizer placed by jsft.sharding, on synthetic packed rows
(documents of random length, tail padding, positions restarting per document) and the data's documents-per-row bound
(`model.set_max_segments`). The attention is resolved (probed) first, as the train plan does. Reported per run:

    probe_s          resolving the attention (the probes of auto's candidates; cached per process)
    first_call_s     the first step: trace, compile and one run; compile_s = first_call_s - step time
    step_ms          median step time over `steps` timed steps (after the first)
    tokens_per_s     non-padding tokens per second (padded_tokens_per_s counts every slot of [B, L])
    mfu, hfu         tokens_per_s * FLOPs per token / peak: MFU with jsft.flops.flops_per_token (model FLOPs: 6N
                     for full fine-tuning, 4N + 6A for LoRA), HFU with hardware_flops_per_token (+ remat recompute)
    peak_bytes       device.memory_stats()["peak_bytes_in_use"] (None on CPU); each run is its own process on a GPU
                     (--isolate, the default there) so the peak is that run's alone
    attention_impl   what ran, and attention_choice: why (jsft.model.attention.Choice.describe)

The JSON (command, git commit, device, versions) is rewritten after every configuration, so a run cut short keeps
what it measured. Results go to benchmarks/results/<device>-<date>.json (or --out). Imports no grain or datasets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common import git_commit  # noqa: E402
from jsft import flops as jsft_flops  # noqa: E402
from jsft import sharding, step  # noqa: E402
from jsft.config import TrainingConfig  # noqa: E402
from jsft.model import attention  # noqa: E402
from jsft.model.llama import Llama, LlamaConfig  # noqa: E402
from jsft.optim import make_optimizer, trainable_filter  # noqa: E402

# HF config.json fields of the real models (no download). Llama-3.2-1B ties its embeddings; Llama-3-8B does not.
MODELS = {
    "1b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=131072,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500000.0,
    ),
    "smoke": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=384, hidden_size=64,
        intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0,
    ),
}

# The configurations worth a GPU's minutes. Full fine-tuning of the 8B model needs FSDP over several GPUs (bf16
# params + fp32 gradients and moments are ~110 GB before activations), so one device runs it as LoRA.
CONFIGS = {
    "1b-full": dict(model="1b", mode="full", L=8192, micro_batch=4, remat="full"),
    "1b-full-xla": dict(model="1b", mode="full", L=8192, micro_batch=4, remat="full", attention="xla"),
    "1b-lora": dict(model="1b", mode="lora", L=8192, micro_batch=4, remat="full"),
    "8b-lora": dict(model="8b", mode="lora", L=8192, micro_batch=1, remat="full"),
    "8b-lora-16k": dict(model="8b", mode="lora", L=16384, micro_batch=1, remat="full"),
    "smoke-full": dict(model="smoke", mode="full", L=32, micro_batch=1, remat="none", steps=2),
    "smoke-lora": dict(model="smoke", mode="lora", L=32, micro_batch=2, remat="full", steps=2),
}
DEFAULT_CONFIGS, SMOKE_CONFIGS = ("1b-full", "8b-lora"), ("smoke-full", "smoke-lora")
DEFAULTS = dict(attention="auto", steps=5, mean_doc=None, lora_rank=16, chunk_size=1024, learning_rate=1e-5,
                peak_tflops=None)  # mean_doc None: L / 8 (about 8 documents a row)


# ----------------------------------------------------------------------------------------------- data


def packed_batch(batch: int, length: int, vocab: int, mean_doc: int, seed: int = 0) -> dict:
    """Synthetic packed rows following the batch contract: documents of random length (mean `mean_doc`) fill
    each row up to the last one that fits; the rest is tail padding. Targets are shifted per document and the
    last token of each document is not trained."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    for b in range(batch):
        start, doc = 0, 1
        while True:
            n = int(np.clip(rng.exponential(mean_doc), 2, length))
            if start + n > length:
                break
            seg[b, start : start + n], pos[b, start : start + n] = doc, np.arange(n)
            start, doc = start + n, doc + 1
        if doc == 1:  # not even one document fitted: one document fills the row
            seg[b], pos[b] = 1, np.arange(length)
    ids = rng.integers(0, vocab, (batch, length), dtype=np.int32)
    same_doc_next = np.zeros_like(seg, bool)
    same_doc_next[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    targets = np.where(same_doc_next, np.roll(ids, -1, axis=1), 0).astype(np.int32)
    return dict(input_ids=ids, segment_ids=seg, positions=pos, targets=targets, loss_mask=same_doc_next)


# ----------------------------------------------------------------------------------------------- one run


def build(spec: dict, mesh):
    """(model config, model placed on the mesh, trainable filter): random init in the real dtype, LoRA applied."""
    cfg = LlamaConfig.from_hf(MODELS[spec["model"]])
    dtype = jnp.float32 if spec["model"] == "smoke" else jnp.bfloat16

    def make():
        model = Llama(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, compute_dtype=dtype,
                      attention_impl=spec["attention"], remat_policy=spec["remat"])
        if spec["mode"] == "lora":
            from jsft.model.lora import apply_lora

            apply_lora(model, r=spec["lora_rank"], alpha=2.0 * spec["lora_rank"], dropout=0.0, rngs=nnx.Rngs(1))
        return model

    return cfg, sharding.create_sharded_model(make, mesh), trainable_filter(lora=spec["mode"] == "lora")


def run_one(spec: dict) -> dict:
    """Build, compile and time one configuration with jsft's own step; errors (out of memory, an attention that
    cannot run, ...) are recorded, not raised."""
    record = dict(spec)
    try:
        mesh = sharding.create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
        cfg, model, wrt = build(spec, mesh)
        rows = packed_batch(spec["micro_batch"], spec["L"], cfg.vocab_size, spec["mean_doc"] or max(2, spec["L"] // 8))
        max_segments = int(rows["segment_ids"].max())  # ids are 1..n per row: the data's documents-per-row bound
        model.set_max_segments(max_segments)
        start = time.perf_counter()
        choice = attention.resolve(spec["attention"], model.compute_dtype, spec["L"], cfg.head_dim,
                                   q_heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, max_segments=max_segments)
        record.update(attention_impl=choice.impl, attention_choice=choice.describe(),
                      probe_s=round(time.perf_counter() - start, 2))
        training = TrainingConfig(learning_rate=spec["learning_rate"], lr_scheduler_type="constant")
        tx, schedule = make_optimizer(training, total_steps=spec["steps"] + 1)
        optimizer = sharding.create_sharded_optimizer(model, tx, wrt, mesh)
        batch = sharding.shard_batch({k: v[None] for k, v in rows.items()}, mesh)  # one micro-batch: [1, B, L]
        options = dict(loss_type="nll", chunk_size=min(spec["chunk_size"], spec["micro_batch"] * spec["L"]),
                       schedule=schedule)
        losses, times = [], []
        with jax.set_mesh(mesh):
            for i in range(spec["steps"] + 1):  # the first call traces and compiles
                start = time.perf_counter()
                metrics = step.train_step(model, optimizer, batch, **options)
                losses.append(float(jax.block_until_ready(metrics["loss"])))
                times.append(time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - an out-of-memory run is a result
        return dict(record, status="error", error=f"{type(e).__name__}: {e}"[:1500])

    first_call_s, times = times[0], times[1:]
    step_s = statistics.median(times)
    real_tokens = int((rows["segment_ids"] > 0).sum())
    tokens_per_s = real_tokens / step_s
    seq_len = jsft_flops.effective_seq_len(rows["segment_ids"])
    hf = MODELS[spec["model"]]
    adapters = _count(nnx.state(model, nnx.LoRAParam))
    counts = {}  # LoRA: no gradient for the frozen weights (jsft.flops.flops_per_token)
    if spec["mode"] == "lora":
        counts = dict(lora_params=adapters, frozen_params=jsft_flops.lora_frozen_params(hf))
    model_flops = jsft_flops.flops_per_token(hf, seq_len, **counts)
    hardware_flops = jsft_flops.hardware_flops_per_token(hf, seq_len, remat=spec["remat"], **counts)
    peak = jsft_flops.peak_tflops(override=spec["peak_tflops"])
    def utilization(flops):
        return None if peak is None else round(jsft_flops.mfu(tokens_per_s, flops, peak=peak), 4)

    return dict(
        record,
        status="ok",
        params=_count(nnx.state(model, nnx.Param)),
        trainable_params=_count(nnx.state(model, wrt)),
        max_documents_per_row=max_segments,
        documents_per_row=round(float(np.mean([len(set(r[r > 0].tolist())) for r in rows["segment_ids"]])), 2),
        effective_seq_len=round(seq_len, 1),
        first_call_s=round(first_call_s, 2),
        compile_s=round(first_call_s - step_s, 2),
        step_ms=round(step_s * 1e3, 3),
        step_ms_all=[round(t * 1e3, 3) for t in times],
        tokens_per_s=round(tokens_per_s, 1),
        padded_tokens_per_s=round(rows["segment_ids"].size / step_s, 1),
        flops_per_token=model_flops,
        hardware_flops_per_token=hardware_flops,
        peak_tflops=peak,
        mfu=utilization(model_flops),
        hfu=utilization(hardware_flops),
        peak_bytes=_peak_bytes(),
        losses=[round(x, 4) for x in losses],
    )


def _count(state) -> int:
    return int(sum(x.size for x in jax.tree.leaves(state)))


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def run_isolated(spec: dict, timeout: int) -> dict:
    """run_one in a fresh process: its own peak memory, and an out-of-memory crash cannot take the others down."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=CHILD_ENV)
    except subprocess.TimeoutExpired:
        return dict(spec, status="error", error=f"timed out after {timeout} s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return dict(spec, status="error", error=f"exit {done.returncode}: {done.stderr[-1500:]}")


# ----------------------------------------------------------------------------------------------- the list


def device_name() -> str:
    kind = "cpu" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="*", default=None, choices=sorted(CONFIGS),
                   help=f"configurations to run, in order (default {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--smoke", action="store_true", help=f"tiny model on CPU, in-process: {' '.join(SMOKE_CONFIGS)}")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override a field of every configuration: L, micro_batch, remat, mode, "
                        + ", ".join(DEFAULTS))
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s (default: the table)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each run in its own process (default: on for GPU, off for --smoke)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per isolated run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory or .json file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one JSON spec, print RESULT
    return p.parse_args(argv)


def specs(args) -> list[dict]:
    """The configurations to run: CONFIGS entries with DEFAULTS filled in, then --set and --peak-tflops applied.

    specs(parse_args(["--configs", "8b-lora", "--set", "L=16384", "attention=xla"]))[0]["L"] -> 16384
    """
    names = args.configs or (SMOKE_CONFIGS if args.smoke else DEFAULT_CONFIGS)
    overrides = {}
    for item in args.set:
        field, _, value = item.partition("=")
        if field not in {**DEFAULTS, **CONFIGS["1b-full"]} or not value:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(sorted({**DEFAULTS, **CONFIGS['1b-full']}))}")
        overrides[field] = _number(value)
    return [{**DEFAULTS, **CONFIGS[name], **overrides, "name": name, "peak_tflops": args.peak_tflops} for name in names]


def _number(text: str):
    """'16384' -> 16384, '1e-4' -> 0.0001, 'xla' -> 'xla'."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


CHILD_ENV = dict(os.environ)  # isolated runs get the environment as it was (GPU memory preallocation included)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return {}
    runs = specs(args)
    # The driver only asks what the device is; without this, starting its GPU client would preallocate most of the
    # device memory and leave the isolated runs the rest. (No effect once a backend is already running.)
    if not args.smoke and args.isolate is not False:
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    isolate = args.isolate if args.isolate is not None else (not args.smoke and jax.default_backend() == "gpu")
    result = dict(
        command="python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        git_commit=git_commit(),
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions={name: _version(name) for name in ("jax", "jaxlib", "flax", "optax", "tokamax")},
        machine=dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count(),
                     load_average_1m_at_start=os.getloadavg()[0]),
        peak_tflops=jsft_flops.peak_tflops(override=args.peak_tflops),
        isolated=isolate,
        runs=[],
    )
    out = Path(args.out)
    if out.suffix != ".json":
        day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        out = out / f"{device_name()}-{day}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for spec in runs:
        record = run_isolated(spec, args.timeout) if isolate else run_one(spec)
        result["runs"].append(record)
        keys = ("name", "model", "mode", "L", "micro_batch", "remat", "attention_impl", "status", "step_ms",
                "tokens_per_s", "mfu", "hfu", "peak_bytes", "compile_s", "error")
        print({k: record[k] for k in keys if k in record}, flush=True)
        out.write_text(json.dumps(result, indent=1) + "\n")  # after every run: a crash keeps what was measured
    print(f"wrote {out}")
    result["path"] = str(out)
    return result


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return None


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise SystemExit(1)
