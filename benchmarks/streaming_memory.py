"""Streaming vs the in-memory pipeline: peak host memory and time over one pass of a synthetic chat dataset.

    python benchmarks/streaming_memory.py [--rows 20000 80000] [--buffer 10000] [--tag NAME]

For each size, the fixture's chat rows (jsft.fixtures.make_rows("messages")) are written to a .jsonl file; then, each
in a fresh subprocess (so ru_maxrss is that mode's own peak):
- memory: prepare_dataset (tokenize everything, cache, pack bfd_stream) + batch_iterator, all steps of one epoch;
- stream: prepare_stream + stream_iterator (data.dataset_streaming), the same number of rows (one pass);
both at max_length 512, assistant-only loss, packing bfd_stream with --buffer examples, 8 rows a step, no shuffle.
Reported per mode: wall seconds, peak RSS (MiB), rows of max_length, tokens/s; for the stream also the JSON size of
its data state mid-pass and the seconds set_state takes to resume there (it reads the pass again from its start).
Writes benchmarks/results/streaming_memory-cpu-<date>[-<tag>].json (never over an existing file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
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

MAX_LENGTH = 512
ROWS_PER_STEP = 8


def config_for(data_file: Path, tokenizer_dir: Path, out: Path, buffer: int, streaming: bool):
    from jsft.config import SFTConfig

    config = SFTConfig()
    config.model.model_name_or_path = str(tokenizer_dir)
    config.data.dataset_name = str(data_file)
    config.data.max_length = MAX_LENGTH
    config.data.packing, config.data.packing_strategy, config.data.packing_buffer_size = True, "bfd_stream", buffer
    config.data.assistant_only_loss = True
    config.data.shuffle_dataset = False
    config.data.dataset_streaming = streaming
    config.training.max_steps = 1
    config.logging.output_dir = str(out)
    return config


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(mode: str, data_file: Path, tokenizer_dir: Path, out: Path, buffer: int, steps: int) -> dict:
    """One mode's pass, in this (fresh) process."""
    from jsft.data import load_tokenizer, streaming
    from jsft.data.pipeline import batch_iterator, prepare_dataset

    config = config_for(data_file, tokenizer_dir, out, buffer, mode == "stream")
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    base = peak_mib()
    started = time.perf_counter()
    result = {"mode": mode, "peak_rss_mib_after_imports": round(base, 1)}
    if mode == "memory":
        prepared = prepare_dataset(config, tokenizer)
        steps = -(-prepared.num_rows // ROWS_PER_STEP)
        it = batch_iterator(prepared, ROWS_PER_STEP, 1, 0, num_epochs=1, shuffle=False, drop_remainder=False)
        result["prepare_seconds"] = round(time.perf_counter() - started, 2)
        tokens = sum(int((step["segment_ids"] > 0).sum()) for step in it)
        result.update(rows=prepared.num_rows, steps=steps, tokens_in_rows=tokens)
    else:
        streamed = streaming.prepare_stream(config, tokenizer)
        it = streaming.stream_iterator(streamed, ROWS_PER_STEP, 1)
        tokens, state = 0, None
        for k in range(steps):
            tokens += int((next(it)["segment_ids"] > 0).sum())
            if k == steps // 2:
                state = json.loads(json.dumps(it.get_state()))
        result.update(rows=steps * ROWS_PER_STEP, steps=steps, tokens_in_rows=tokens)
        result["seconds"] = round(time.perf_counter() - started, 2)
        resumed = time.perf_counter()
        fresh = streaming.stream_iterator(streamed, ROWS_PER_STEP, 1)
        fresh.set_state(state)
        next(fresh)
        result["resume_mid_pass_seconds"] = round(time.perf_counter() - resumed, 2)
        result["state_json_bytes_mid_pass"] = len(json.dumps(state))
        result["held_examples_mid_pass"] = len(state["held"])
    result.setdefault("seconds", round(time.perf_counter() - started, 2))
    result["tokens_per_second"] = round(result["tokens_in_rows"] / result["seconds"])
    result["peak_rss_mib"] = round(peak_mib(), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 80_000])
    parser.add_argument("--buffer", type=int, default=10_000)
    parser.add_argument("--tag", default=None)
    parser.add_argument("--worker", nargs=6, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, data_file, tokenizer_dir, out, buffer, steps = args.worker
        print(json.dumps(worker(mode, Path(data_file), Path(tokenizer_dir), Path(out), int(buffer), int(steps))))
        return

    from jsft import fixtures

    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer_dir = fixtures.build_tokenizer(tmp / "tokenizer")
        for rows in args.rows:
            data_file = fixtures.write_jsonl(fixtures.make_rows("messages", rows, seed=0), tmp / f"chat-{rows}.jsonl")
            entry = {"dataset_rows": rows, "file_mib": round(data_file.stat().st_size / 2**20, 1)}
            steps = None
            for mode in ("memory", "stream"):
                command = [sys.executable, __file__, "--worker", mode, str(data_file), str(tokenizer_dir),
                           str(tmp / f"out-{rows}-{mode}"), str(args.buffer), str(steps or 0)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                entry[mode] = json.loads(done.stdout.strip().splitlines()[-1])
                steps = entry["memory"]["steps"]
                print(rows, mode, entry[mode], flush=True)
            results.append(entry)
    record = {
        "benchmark": "streaming_memory", "date": datetime.date.today().isoformat(), "commit": git_commit(),
        "command": "python benchmarks/streaming_memory.py " + " ".join(sys.argv[1:]), "machine": platform.processor()
        or platform.machine(), "cores": os.cpu_count(), "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "max_length": MAX_LENGTH, "rows_per_step": ROWS_PER_STEP,
        "packing_buffer_size": args.buffer, "results": results,
    }
    folder = Path(__file__).parent / "results"
    name = f"streaming_memory-cpu-{record['date']}{'-' + args.tag if args.tag else ''}"
    path, n = folder / f"{name}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{name}-{n}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
