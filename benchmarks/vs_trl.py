"""Training speed and memory on CPU: jsft against TRL's SFTTrainer (torch), same model, data and settings.

    python benchmarks/vs_trl.py [--steps 8] [--max-length 512] [--batch 8] [--cases nopack,bfd,wrapped,lora]
                                [--tag NAME]

Both sides start from the same random HF Llama checkpoint (about 4M params: hidden 256, 4 layers, vocab 384), the
fixture's 2,000 `messages` chat rows with assistant-only loss, float32 everywhere, no gradient checkpointing,
AdamW at a constant learning rate, gradient clipping 1.0, one micro-batch of `--batch` rows per step. Cases:

    nopack   packing=False (TRL pads each batch to its longest row; jsft pads to max_length)
    grouped  packing=False, train_sampling_strategy="group_by_length" on both sides (jsft: each step from one of 8
             length buckets, one compile per bucket; TRL: its length-grouped sampler, each batch padded to its
             longest row)
    nopack64 packing=False, pad_to_multiple_of=64 on both sides (each batch padded to its longest row rounded up to
             64; jsft compiles once per length: steps that compiled are left out of the rates and counted)
    bfd      packing=True, bfd, padding_free=True (TRL: one flattened row per batch; jsft: [B, L] rows)
    wrapped  packing=True, wrapped
    lora     bfd + padding-free, LoRA r=16, alpha=32, dropout 0.05 (TRL's ModelConfig default), all-linear

Each run is its own process (so its peak RSS is its own), timed step by step: jsft's `step.train_step` is wrapped
and blocked until its results are ready, TRL's steps are timed by a TrainerCallback. The first `--warmup` steps
(jsft: compilation) are left out of the rates. Reported per run: trained tokens/s (tokens with a loss), real
tokens/s (non-padding input tokens), mean and fastest step time, process CPU seconds per step (all threads), peak
host RSS, fill rate (real tokens / positions computed), the loss of the last steps, the 1-minute load average at the
run's start and end; and jsft / TRL ratios.

On a shared machine, compare CPU seconds per step and the fastest step, not only the mean: both sides use every
core, so another process holding one of 2 cores stretches a step's wall time up to 2x while its CPU seconds stay.
(jsft's step has static shapes; its cost does not depend on the packing: the same compiled step takes 1.22-1.25 s
on a quiet 2-core machine for nopack, bfd and wrapped batches.)
Writes benchmarks/results/vs_trl-cpu-<date>[-<tag>].json (never over an existing file: a -2, -3 ... suffix is added).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import git_commit  # benchmarks/common.py (this script's folder is on sys.path)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CASES = {
    "nopack": dict(packing=False, packing_strategy="bfd", padding_free=False, lora=False),
    "grouped": dict(packing=False, packing_strategy="bfd", padding_free=False, lora=False,
                    train_sampling_strategy="group_by_length"),
    "nopack64": dict(packing=False, packing_strategy="bfd", padding_free=False, lora=False, pad_to_multiple_of=64),
    "bfd": dict(packing=True, packing_strategy="bfd", padding_free=True, lora=False),
    "wrapped": dict(packing=True, packing_strategy="wrapped", padding_free=False, lora=False),
    "lora": dict(packing=True, packing_strategy="bfd", padding_free=True, lora=True),
}
MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
LORA = dict(r=16, alpha=32, dropout=0.05)  # both sides the same; TRL's ModelConfig default (PEFT's is 0.0)


# ----------------------------------------------------------------------------------------------- the two sides


def run_jsft(case: dict, args, work: Path) -> dict:
    import jax

    from jsft import plan, step, train
    from jsft.config import DataConfig, LoggingConfig, LoraConfig, ModelConfig, SFTConfig, TrainingConfig

    config = SFTConfig(
        model=ModelConfig(model_name_or_path=str(work / "checkpoint"), tokenizer_name_or_path=str(work / "tokenizer"),
                          dtype="float32", compute_dtype="float32", remat_policy="none"),
        data=DataConfig(dataset_name=str(work / "messages.jsonl"), max_length=args.max_length,
                        packing=case["packing"], packing_strategy=case["packing_strategy"],
                        padding_free=case["padding_free"], assistant_only_loss=True, shuffle_dataset=True,
                        pad_to_multiple_of=case.get("pad_to_multiple_of"),
                        train_sampling_strategy=case.get("train_sampling_strategy", "random"),
                        cache_dir=str(work / f"jsft-cache-{args.case}")),
        training=TrainingConfig(learning_rate=args.lr, per_device_train_batch_size=args.batch, max_steps=args.steps,
                                lr_scheduler_type="constant", max_grad_norm=1.0, seed=0),
        lora=LoraConfig(use_peft=case["lora"], lora_r=LORA["r"], lora_alpha=LORA["alpha"],
                        lora_dropout=LORA["dropout"], lora_target_modules="all-linear"),
        logging=LoggingConfig(output_dir=str(work / f"jsft-{args.case}"), logging_steps=args.steps,
                              save_steps=10 * args.steps, report_to=["jsonl"], resume_from_checkpoint=False,
                              export_formats=[], disable_tqdm=True, num_eval_generations=0),
    )
    config.sharding.mesh_shape = {"data": 1, "fsdp": 1, "tensor": 1}
    records = []
    original = plan.PlannedStep.__call__  # the loop runs the plan's AOT-compiled step (step.train_step for others)

    def timed(self, model, optimizer, batch):
        compiled_before = step.train_step.jitted_fn._cache_size()
        start, cpu = time.perf_counter(), time.process_time()
        metrics = jax.block_until_ready(original(self, model, optimizer, batch))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        positions = int(batch["input_ids"].size)
        records.append(dict(seconds=seconds, cpu_seconds=cpu_seconds, loss=float(metrics["loss"]),
                            trained=float(metrics["num_trained"]), real=float(metrics["num_tokens"]),
                            positions=positions, compiled=step.train_step.jitted_fn._cache_size() > compiled_before))
        return metrics

    plan.PlannedStep.__call__ = timed
    try:
        train.run(config)
    finally:
        plan.PlannedStep.__call__ = original
    return {"steps": records}


def run_trl(case: dict, args, work: Path) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    records, clock = [], {}

    class Trainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            clock["trained"] = float((labels[:, 1:] != -100).sum())
            mask = inputs.get("attention_mask")
            clock["real"] = float(mask.sum()) if mask is not None else float(inputs["input_ids"].numel())
            clock["positions"] = int(inputs["input_ids"].numel())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock["start"], clock["cpu"] = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            seconds, cpu_seconds = time.perf_counter() - clock["start"], time.process_time() - clock["cpu"]
            records.append(dict(seconds=seconds, cpu_seconds=cpu_seconds, trained=clock["trained"],
                                real=clock["real"], positions=clock["positions"]))

    sft = SFTConfig(
        output_dir=str(work / f"trl-{args.case}"), max_length=args.max_length, packing=case["packing"],
        packing_strategy=case["packing_strategy"], padding_free=case["padding_free"], assistant_only_loss=True,
        shuffle_dataset=True, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, seed=0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        gradient_checkpointing=False, disable_tqdm=True, dataloader_num_workers=0,
        pad_to_multiple_of=case.get("pad_to_multiple_of"),
        train_sampling_strategy=case.get("train_sampling_strategy", "random"),
    )
    peft_config = None
    if case["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(work / "checkpoint", dtype=torch.float32)
    rows = datasets.load_dataset("json", data_files=str(work / "messages.jsonl"), split="train")
    trainer = Trainer(model=model, args=sft, train_dataset=rows, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=[Timer()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    for record, loss in zip(records, losses):
        record["loss"] = float(loss)
    return {"steps": records}


# ----------------------------------------------------------------------------------------------- summary


def summarize(result: dict, warmup: int) -> dict:
    steps = result["steps"]
    timed = [s for s in steps[warmup:] if not s.get("compiled")] or steps
    seconds = sum(s["seconds"] for s in timed)
    last = [s["loss"] for s in steps[-3:] if "loss" in s]
    return {
        "steps": len(steps),
        "timed_steps": len(timed),
        "compiling_steps": sum(bool(s.get("compiled")) for s in steps),
        "step_time_s": seconds / len(timed),
        "step_time_min_s": min(s["seconds"] for s in timed),
        "step_times_s": [round(s["seconds"], 3) for s in steps],
        "cpu_s_per_step": sum(s["cpu_seconds"] for s in timed) / len(timed),
        "first_step_s": steps[0]["seconds"],
        "trained_tokens_per_s": sum(s["trained"] for s in timed) / seconds,
        "real_tokens_per_s": sum(s["real"] for s in timed) / seconds,
        "fill_rate": sum(s["real"] for s in timed) / sum(s["positions"] for s in timed),
        "final_loss": steps[-1].get("loss"),
        "loss_last3_mean": sum(last) / len(last) if last else None,
        "peak_rss_mib": result["peak_rss_mib"],
        "wall_s": result["wall_s"],
        "load_average_1m_start_end": result["load_average_1m_start_end"],
    }


def spawn(side: str, case: str, args, work: Path) -> dict:
    """Run one side of one case in a fresh process; returns its step records + peak RSS (os.wait4)."""
    out = work / f"result-{side}-{case}.json"
    cmd = [sys.executable, __file__, "--child", side, "--case", case, "--work", str(work), "--steps", str(args.steps),
           "--max-length", str(args.max_length), "--batch", str(args.batch), "--lr", str(args.lr)]
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL if args.quiet else None)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} {case} failed (exit {proc.returncode}): {' '.join(cmd)}")
    result = json.loads(out.read_text())
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    result["wall_s"] = time.perf_counter() - start
    result["load_average_1m_start_end"] = [load_start, os.getloadavg()[0]]
    return result


def build_fixtures(work: Path, rows: int) -> None:
    from jsft import fixtures

    fixtures.build_tokenizer(work / "tokenizer")
    fixtures.write_jsonl(fixtures.make_rows("messages", rows, 0), work / "messages.jsonl")
    fixtures.build_hf_checkpoint(work / "checkpoint", **MODEL)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the rates")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quiet", action="store_true", help="hide the runs' own output")
    parser.add_argument("--tag", default="", help="appended to the result file name")
    parser.add_argument("--child", choices=["jsft", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # one run, in its own process
        work = Path(args.work)
        result = (run_jsft if args.child == "jsft" else run_trl)(CASES[args.case], args, work)
        (work / f"result-{args.child}-{args.case}.json").write_text(json.dumps(result))
        return None

    cases = args.cases.split(",")
    work = Path(tempfile.mkdtemp(prefix="jsft-vs-trl-"))
    build_fixtures(work, args.rows)
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(work / "checkpoint").model_type
    n_params = None
    try:
        from transformers import AutoModelForCausalLM

        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(work / "checkpoint").parameters())
    except Exception:  # noqa: BLE001 - only informative
        pass
    results = {}
    try:
        _run_cases(cases, args, work, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _report(results, cases, args, n_params, model_type, argv)


def _run_cases(cases, args, work: Path, results: dict) -> None:
    for case in cases:
        results[case] = {}
        for side in ("jsft", "trl"):
            print(f"--- {case}: {side}", flush=True)
            try:
                results[case][side] = summarize(spawn(side, case, args, work), args.warmup)
            except RuntimeError as e:  # record the failure, go on with the other runs
                print(e, flush=True)
                results[case][side] = {"error": str(e)}
        j, t = results[case]["jsft"], results[case]["trl"]
        if "error" in j or "error" in t:
            continue
        results[case]["ratio_jsft_over_trl"] = {
            "trained_tokens_per_s": j["trained_tokens_per_s"] / t["trained_tokens_per_s"],
            "real_tokens_per_s": j["real_tokens_per_s"] / t["real_tokens_per_s"],
            "step_time": j["step_time_s"] / t["step_time_s"],
            "cpu_s_per_step": j["cpu_s_per_step"] / t["cpu_s_per_step"],
            "peak_rss": j["peak_rss_mib"] / t["peak_rss_mib"],
        }


def _report(results: dict, cases, args, n_params, model_type, argv) -> dict:
    import torch

    result = {
        "benchmark": "vs_trl",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch_threads": torch.get_num_threads(),
                    "load_average_1_5_15_min_at_end": os.getloadavg()},
        "setup": {"model": {**MODEL, "vocab_size": 384, "params": n_params,
                            "config": model_type},
                  "data": f"fixture messages x{args.rows}, assistant_only_loss", "max_length": args.max_length,
                  "per_device_train_batch_size": args.batch, "steps": args.steps, "warmup_steps_excluded": args.warmup,
                  "learning_rate": args.lr, "dtype": "float32", "lora": LORA, "cases": {c: CASES[c] for c in cases}},
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"vs_trl-cpu-{datetime.date.today().isoformat()}" + (f"-{args.tag}" if args.tag else "")
    path, suffix = out / f"{stem}.json", 2
    while path.exists():
        path, suffix = out / f"{stem}-{suffix}.json", suffix + 1
    path.write_text(json.dumps(result, indent=2) + "\n")

    head = f"{'case':8} {'side':5} {'trained tok/s':>13} {'real tok/s':>10} {'step s':>7} {'min s':>6} {'cpu s':>6} " \
           f"{'RSS MiB':>8} {'fill':>5} {'loss':>6} {'load':>9}"
    print(head)
    for case in cases:
        if "ratio_jsft_over_trl" not in results[case]:
            print(f"{case:8} failed: " + "; ".join(r["error"] for r in results[case].values() if "error" in r))
            continue
        for side in ("jsft", "trl"):
            r = results[case][side]
            loss = f"{r['loss_last3_mean']:.3f}" if r["loss_last3_mean"] is not None else "-"
            load = "{:.1f}-{:.1f}".format(*r["load_average_1m_start_end"])
            print(f"{case:8} {side:5} {r['trained_tokens_per_s']:13,.0f} {r['real_tokens_per_s']:10,.0f} "
                  f"{r['step_time_s']:7.3f} {r['step_time_min_s']:6.3f} {r['cpu_s_per_step']:6.2f} "
                  f"{r['peak_rss_mib']:8,.0f} {r['fill_rate']:5.3f} {loss:>6} {load:>9}")
        q = results[case]["ratio_jsft_over_trl"]
        print(f"{case:8} ratio jsft/TRL: trained tok/s {q['trained_tokens_per_s']:.2f}x, "
              f"real tok/s {q['real_tokens_per_s']:.2f}x, CPU s/step {q['cpu_s_per_step']:.2f}x, "
              f"RSS {q['peak_rss']:.2f}x")
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
