"""Training-step throughput of random-init Llama models with real shapes on packed rows: tokens/s, MFU, memory.

    python benchmarks/gpu.py                                   # Llama-3.2-1B and Llama-3-8B, L = 4096/8192/16384
    python benchmarks/gpu.py --models 1b --lengths 8192 --remat full save_dots --micro-batch 1 2 --modes full lora
    python benchmarks/gpu.py --smoke --out /tmp/bench          # tiny config on CPU (the test runs this)

One run = one (model, L, micro-batch B, remat policy, mode full|lora, attention impl): a plain jitted train step
(forward, jsft.loss.chunked_loss, backward, optax.adamw update) on synthetic packed rows (documents of random
length, tail padding, positions restarting per document). Reported per run:

    compile_s        lower + compile of the step
    step_ms          median step time over --steps timed steps (after one warm-up step)
    tokens_per_s     non-padding tokens per second (padded_tokens_per_s counts every slot of [B, L])
    mfu              tokens_per_s * flops_per_token / peak; flops_per_token = 6 * matmul params + attention
                     (jsft.loss.flops_per_token, the trainer's own definition, with the rows' effective length)
    peak_bytes       device.memory_stats()["peak_bytes_in_use"] (None on CPU); each run is its own process on a
                     GPU (--isolate, the default there) so the peak is that run's alone
    temp_bytes       the compiled step's temporary buffers (XLA memory analysis)
    attention_impl   what impl="auto" (or --attention) resolved to

Full fine-tuning keeps params and Adam moments in bf16 (the real models are random-init in bf16), so an 8B model
needs 4 x 16 GB for params, grads and moments before activations; an out-of-memory run is recorded as an error.
Peak TFLOP/s comes from jsft.loss.peak_tflops (H100/H200 989 bf16 dense, A100 312), or --peak-tflops.
Results go to benchmarks/results/<device>-<date>.json (or --out) with the command that made them.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jsft import loss as jsft_loss  # noqa: E402
from jsft.model import attention  # noqa: E402
from jsft.model.llama import Llama, LlamaConfig  # noqa: E402

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


def build(model_name: str, mode: str, remat: str, attention_impl: str, lora_rank: int):
    """Random-init model (eager: each param is created on the default device, never the host) and the filter of
    the trainable params."""
    cfg = LlamaConfig.from_hf(MODELS[model_name])
    dtype = jnp.float32 if model_name == "smoke" else jnp.bfloat16

    def make():
        model = Llama(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, compute_dtype=dtype,
                      attention_impl=attention_impl, remat_policy=remat)
        if mode == "lora":
            from jsft.model.lora import apply_lora

            apply_lora(model, r=lora_rank, alpha=2.0 * lora_rank, dropout=0.0, rngs=nnx.Rngs(1))
        return model

    return cfg, make(), (nnx.LoRAParam if mode == "lora" else nnx.Param)


def make_step(graphdef, trainable_filter, tx, chunk_size: int):
    """jit(step): (trainable, frozen, opt_state, batch) -> (trainable, opt_state, loss). nnx.value_and_grad with a
    DiffState differentiates only the trainable params (all Params, or the LoRA params)."""

    def loss_fn(model, batch):
        hidden = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"])
        sums = jsft_loss.chunked_loss(hidden, model.lm_head_weight(), batch["targets"], batch["loss_mask"], "nll",
                                      chunk_size)
        return sums["loss_sum"] / jnp.maximum(sums["num_trained"], 1.0)

    def step(trainable, frozen, opt_state, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable_filter))
        loss, grads = grad_fn(model, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 2))


def run_one(spec: dict) -> dict:
    """Build, compile and time one configuration; errors (out of memory, ...) are recorded, not raised."""
    record = dict(spec)
    try:
        cfg, model, trainable_filter = build(spec["model"], spec["mode"], spec["remat"], spec["attention"],
                                             spec["lora_rank"])
        batch_np = packed_batch(spec["micro_batch"], spec["L"], cfg.vocab_size, spec["mean_doc"])
        max_segments = int(batch_np["segment_ids"].max())  # as jsft.train does: the data's documents-per-row bound
        model.set_max_segments(max_segments)
        graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
        del model
        tx = optax.adamw(spec["learning_rate"], weight_decay=0.0)
        opt_state = tx.init(trainable)
        batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
        step = make_step(graphdef, trainable_filter, tx, spec["chunk_size"])

        start = time.perf_counter()
        compiled = step.lower(trainable, frozen, opt_state, batch).compile()
        record["compile_s"] = round(time.perf_counter() - start, 3)
        record["temp_bytes"] = _temp_bytes(compiled)

        losses, times = [], []
        for i in range(spec["steps"] + 1):  # step 0 is the warm-up
            start = time.perf_counter()
            trainable, opt_state, loss = compiled(trainable, frozen, opt_state, batch)
            losses.append(float(jax.block_until_ready(loss)))
            if i:
                times.append(time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - an out-of-memory run is a result
        return dict(record, status="error", error=f"{type(e).__name__}: {e}"[:1500])

    step_s = statistics.median(times)
    real_tokens = int((batch_np["segment_ids"] > 0).sum())
    tokens_per_s = real_tokens / step_s
    seq_len = jsft_loss.effective_seq_len(batch_np["segment_ids"])
    flops = jsft_loss.flops_per_token(MODELS[spec["model"]], seq_len)
    peak = jsft_loss.peak_tflops(override=spec["peak_tflops"])
    used = attention.choose_impl(jnp.bfloat16 if spec["model"] != "smoke" else jnp.float32, spec["L"],
                                 cfg.head_dim, max_segments) if spec["attention"] == "auto" else spec["attention"]
    return dict(
        record,
        status="ok",
        attention_impl=used,
        params=_count(trainable) + _count(nnx.filter_state(frozen, nnx.Param)),
        trainable_params=_count(trainable),
        documents_per_row=round(float(np.mean([len(set(r[r > 0].tolist())) for r in batch_np["segment_ids"]])), 2),
        effective_seq_len=round(seq_len, 1),
        step_ms=round(step_s * 1e3, 3),
        step_ms_all=[round(t * 1e3, 3) for t in times],
        tokens_per_s=round(tokens_per_s, 1),
        padded_tokens_per_s=round(batch_np["segment_ids"].size / step_s, 1),
        flops_per_token=flops,
        peak_tflops=peak,
        mfu=None if peak is None else round(jsft_loss.mfu(tokens_per_s, flops, peak=peak), 4),
        peak_bytes=_peak_bytes(),
        losses=[round(x, 4) for x in losses],
    )


def _count(state) -> int:
    return int(sum(x.size for x in jax.tree.leaves(state)))


def _temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001
        return None


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def run_isolated(spec: dict, timeout: int) -> dict:
    """run_one in a fresh process: its own peak memory, and an out-of-memory crash cannot take the sweep down."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=CHILD_ENV)
    except subprocess.TimeoutExpired:
        return dict(spec, status="error", error=f"timed out after {timeout} s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return dict(spec, status="error", error=f"exit {done.returncode}: {done.stderr[-1500:]}")


# ----------------------------------------------------------------------------------------------- the sweep


def device_name() -> str:
    kind = "cpu" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, L=32, a few runs in-process")
    p.add_argument("--models", nargs="*", default=None, choices=sorted(MODELS))
    p.add_argument("--lengths", type=int, nargs="*", default=None)
    p.add_argument("--micro-batch", type=int, nargs="*", default=None)
    p.add_argument("--remat", nargs="*", default=None, choices=["none", "full", "save_dots", "offload"])
    p.add_argument("--modes", nargs="*", default=None, choices=["full", "lora"])
    p.add_argument("--attention", nargs="*", default=["auto"], choices=list(attention.IMPLEMENTATIONS))
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (after one warm-up)")
    p.add_argument("--mean-doc", type=int, default=None, help="mean document length in tokens (default L/8)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the lm_head + loss")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s (default: the table)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each run in its own process (default: on for GPU, off for --smoke)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per isolated run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory or .json file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one JSON spec, print RESULT
    return p.parse_args(argv)


def specs(args) -> list[dict]:
    """The sweep: every combination of the lists (the smoke sweep: two runs covering both modes and remats)."""
    smoke = args.smoke
    models = args.models or (["smoke"] if smoke else ["1b", "8b"])
    lengths = args.lengths or ([32] if smoke else [4096, 8192, 16384])
    micro = args.micro_batch or [1, 2]
    remats = args.remat or (["none", "full"] if smoke else ["full", "save_dots"])
    modes = args.modes or ["full", "lora"]
    combos = list(itertools.product(models, lengths, micro, remats, modes, args.attention))
    if smoke and not (args.micro_batch or args.remat or args.modes):
        model, length = models[0], lengths[0]
        combos = [(model, length, 1, "none", "full", "auto"), (model, length, 2, "full", "lora", "auto")]
    steps = args.steps or (2 if smoke else 5)
    return [
        dict(model=model, L=length, micro_batch=b, remat=remat, mode=mode, attention=impl, steps=steps,
             mean_doc=args.mean_doc or max(2, length // 8), lora_rank=args.lora_rank,
             chunk_size=min(args.chunk_size, b * length), learning_rate=args.learning_rate,
             peak_tflops=args.peak_tflops)
        for model, length, b, remat, mode, impl in combos
    ]


CHILD_ENV = dict(os.environ)  # isolated runs get the environment as it was (GPU memory preallocation included)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return {}
    # The driver only asks what the device is; without this, starting its GPU client would preallocate 75% of the
    # device memory and leave the isolated runs a quarter of it. (No effect once a backend is already running.)
    if not args.smoke and args.isolate is not False:
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    isolate = args.isolate if args.isolate is not None else (not args.smoke and jax.default_backend() == "gpu")
    result = dict(
        command="python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        jax_version=jax.__version__,
        peak_tflops=jsft_loss.peak_tflops(override=args.peak_tflops),
        isolated=isolate,
        runs=[],
    )
    out = Path(args.out)
    if out.suffix != ".json":
        day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        out = out / f"{device_name()}-{day}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in specs(args):
        record = run_isolated(spec, args.timeout) if isolate else run_one(spec)
        result["runs"].append(record)
        keys = ("model", "L", "micro_batch", "remat", "mode", "attention_impl", "status", "step_ms", "tokens_per_s",
                "mfu", "peak_bytes", "compile_s", "error")
        print({k: record[k] for k in keys if k in record}, flush=True)
        out.write_text(json.dumps(result, indent=1) + "\n")  # after every run: a crash keeps what was measured
    print(f"wrote {out}")
    result["path"] = str(out)
    return result


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise SystemExit(1)
