"""Data preparation speed: jsft (tokenize + pack) against TRL's SFTTrainer preparation, same rows, same settings.

    python benchmarks/data_prep.py [--rows 2000] [--repeats 3] [--format messages|prompt_completion] [--unmarked]
                                   [--tag NAME]

Both sides read the fixture's rows from a .jsonl file with `datasets` and pack with BFD at max_length 512, in one
process (--num-proc N: N worker processes on both sides: Grain workers for jsft, datasets' num_proc for TRL).
`messages` (default): rendered with the fixture's chat template, assistant-only masks. `prompt_completion`: strings,
completion-only masks (both sides' default for that format). jsft starts from an empty cache (its warm-cache time is
reported separately); TRL runs `SFTTrainer._prepare_dataset` with datasets' caching off; the two alternate
`--repeats` times. Reported: examples/s and tokens/s (tokens = all tokens of all rows before truncation) from the
best of the repeats, the CPU seconds of each side (all its threads; their ratio depends less on a busy machine than
the wall-clock ratio, which also counts jsft's threads running side by side), and the load average before and after
(the machine may be shared: compare runs with that in mind). In one process jsft still uses every core: it prepares chunks on one thread per core. TOKENIZERS_PARALLELISM
defaults to false here (what jsft sets while its threads run; TRL's one-row calls gain nothing from the tokenizer's
threads). Writes benchmarks/results/data_prep-cpu-<date>[-<format>][-proc<N>][-<tag>].json
(never over an existing file: a -2, -3 ... suffix is added).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import git_commit  # benchmarks/common.py (this script's folder is on sys.path)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MAX_LENGTH = 512


def jsft_run(data_file: Path, tokenizer_dir: Path, cache_dir: Path, num_proc: int | None, fmt: str = "messages",
             template: Path | None = None):
    from jsft.config import SFTConfig
    from jsft.data import load_tokenizer
    from jsft.data.pipeline import prepare_dataset

    config = SFTConfig()
    config.data.dataset_name = str(data_file)
    config.data.max_length, config.data.packing, config.data.packing_strategy = MAX_LENGTH, True, "bfd"
    config.data.assistant_only_loss, config.data.dataset_num_proc = fmt == "messages", num_proc
    config.data.cache_dir = str(cache_dir)
    config.data.chat_template_path = str(template) if template else None
    start, cpu_start = time.perf_counter(), time.process_time()
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    prepared = prepare_dataset(config, tokenizer)
    return time.perf_counter() - start, time.process_time() - cpu_start, prepared


def trl_trainer(tokenizer_dir: Path, checkpoint_dir: Path, out_dir: Path, num_proc: int | None,
                fmt: str = "messages"):
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from jsft import fixtures

    args = SFTConfig(output_dir=str(out_dir), max_length=MAX_LENGTH, packing=True, packing_strategy="bfd",
                     assistant_only_loss=fmt == "messages", report_to=[], use_cpu=True, bf16=False,
                     dataset_num_proc=num_proc)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    small = datasets.Dataset.from_list(fixtures.make_rows(fmt, 4, 1))  # SFTTrainer decides completion-only from it
    trainer = SFTTrainer(model=str(checkpoint_dir), args=args, train_dataset=small, processing_class=tokenizer)
    return trainer, tokenizer


def trl_run(trainer, tokenizer, data_file: Path):
    import datasets

    start, cpu_start = time.perf_counter(), time.process_time()
    rows = datasets.load_dataset("json", data_files=str(data_file), split="train")
    prepared = trainer._prepare_dataset(rows, tokenizer, trainer.args, True, None, "train")
    return time.perf_counter() - start, time.process_time() - cpu_start, prepared


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-proc", type=int, default=None, help="worker processes on both sides (default: none)")
    parser.add_argument("--format", default="messages", choices=["messages", "prompt_completion"])
    parser.add_argument("--unmarked", action="store_true",
                        help="jsft renders with the fixture template minus its {% generation %} markers, so it infers "
                             "the assistant masks (the same masks: tests/test_templates.py); TRL keeps the "
                             "markers (it cannot infer them)")
    parser.add_argument("--tag", default="", help="appended to the result file name")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    import datasets

    from jsft import fixtures

    load_before = os.getloadavg()[0]
    datasets.disable_caching()
    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="jsft-data-prep-"))
    try:
        tokenizer_dir = fixtures.build_tokenizer(work / "tokenizer")
        data_file = fixtures.write_jsonl(fixtures.make_rows(args.format, args.rows, 0), work / f"{args.format}.jsonl")
        checkpoint_dir = fixtures.build_hf_checkpoint(work / "checkpoint")
        template = None
        if args.unmarked:
            template = work / "unmarked.jinja"
            unmarked = fixtures.CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
            template.write_text(unmarked)

        trainer, tokenizer = trl_trainer(tokenizer_dir, checkpoint_dir, work / "trl", args.num_proc, args.format)
        jsft_times, trl_times, jsft_cpu, trl_cpu = [], [], [], []
        for k in range(args.repeats):  # alternate, so a busy machine slows both sides alike
            seconds, cpu, prepared = jsft_run(data_file, tokenizer_dir, work / f"cache{k}", args.num_proc,
                                              args.format, template)
            jsft_times.append(seconds)
            jsft_cpu.append(cpu)
            seconds, cpu, trl_prepared = trl_run(trainer, tokenizer, data_file)
            trl_times.append(seconds)
            trl_cpu.append(cpu)
        warm, _, _ = jsft_run(data_file, tokenizer_dir, work / "cache0", None, args.format, template)
        assert prepared.stats["cache"] == "miss"
        stats = prepared.stats
        trl_tokens = sum(len(ids) for ids in trl_prepared["input_ids"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tokens = stats["tokens"]
    best_jsft, best_trl = min(jsft_times), min(trl_times)
    result = {
        "benchmark": "data_prep",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m_at_start": load_before, "load_average_1m_at_end": os.getloadavg()[0],
                    "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM")},
        "git_commit": git_commit(),
        "setup": {"rows": args.rows, "format": args.format, "assistant_only_loss": args.format == "messages",
                  "jsft_template": "fixture ChatML without {% generation %} (masks inferred)" if args.unmarked
                  else "fixture ChatML with {% generation %}",
                  "completion_only_loss": "default (on for prompt_completion)", "max_length": MAX_LENGTH,
                  "packing_strategy": "bfd", "processes": args.num_proc or 1, "repeats": args.repeats,
                  "timing": "best of repeats"},
        "jsft": {
            "seconds": jsft_times, "cpu_seconds": jsft_cpu, "seconds_cache_hit": warm,
            "examples_per_s": args.rows / best_jsft, "tokens_per_s": tokens / best_jsft,
            "packed_rows": stats["rows"], "row_tokens": stats["row_tokens"], "fill_rate": stats["fill_rate"],
            "dropped_no_trained_token": stats["dropped_no_trained_token"],
        },
        "trl": {
            "seconds": trl_times, "cpu_seconds": trl_cpu, "examples_per_s": args.rows / best_trl, "tokens_per_s": tokens / best_trl,
            "packed_rows": len(trl_prepared), "row_tokens": trl_tokens,
            "fill_rate": trl_tokens / (len(trl_prepared) * MAX_LENGTH),
        },
        "speedup_jsft_over_trl": best_trl / best_jsft,
        "cpu_ratio_trl_over_jsft": min(trl_cpu) / min(jsft_cpu),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = (f"-{args.format}" if args.format != "messages" else "") + (f"-proc{args.num_proc}" if args.num_proc else "")
    tag += "-unmarked" if args.unmarked else ""
    tag += f"-{args.tag}" if args.tag else ""
    path = out / f"data_prep-cpu-{datetime.date.today().isoformat()}{tag}.json"
    suffix = 2
    while path.exists():
        path = path.with_name(f"data_prep-cpu-{datetime.date.today().isoformat()}{tag}-{suffix}.json")
        suffix += 1
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"jsft: {result['jsft']['examples_per_s']:,.0f} examples/s, {result['jsft']['tokens_per_s']:,.0f} tokens/s "
          f"({best_jsft:.2f} s; cache hit {warm:.2f} s), {stats['rows']} rows, fill {stats['fill_rate']:.3f}")
    print(f"TRL:  {result['trl']['examples_per_s']:,.0f} examples/s, {result['trl']['tokens_per_s']:,.0f} tokens/s "
          f"({best_trl:.2f} s), {len(trl_prepared)} rows, fill {result['trl']['fill_rate']:.3f}")
    print(f"jsft / TRL speed: {result['speedup_jsft_over_trl']:.2f}x (CPU time: TRL / jsft "
          f"{result['cpu_ratio_trl_over_jsft']:.2f}x; load {load_before:.1f} -> {os.getloadavg()[0]:.1f})   -> {path}")
    return result


if __name__ == "__main__":
    main()
