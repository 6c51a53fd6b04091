"""Host memory and time of data preparation and of training at two dataset sizes: the token store vs the old path.

    python benchmarks/data_scale.py --tokens 5e6 2e7 5e7 --old /tmp/jsft-old   # writes benchmarks/results/data_scale-*.json

For each size a synthetic chat dataset (jsonl, words drawn from a fixed list, the fixture tokenizer of jsft.fixtures)
is written, then for each code path (this checkout, and `--old`: a checkout of the code before the store, e.g.
`mkdir /tmp/jsft-old && git archive 25679de jsft | tar -x -C /tmp/jsft-old`) two child processes run with that code
first on PYTHONPATH:
1. prepare: jsft.data.pipeline.prepare_dataset (tokenize, write the cache, pack with BFD) into an empty cache;
2. train: `python -m jsft.train` for a few steps of a tiny model from that cache (a cache hit: it reads the cache).
Each child's peak resident memory is os.wait4's ru_maxrss; the parent also samples /proc/<pid>/status every 20 ms for
the peak of RssAnon (the process's own memory) and RssFile (pages of mapped files, the store's among them: the
kernel can drop these, they are not memory the run holds). Times are wall seconds on a shared machine (load recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import git_commit  # noqa: E402

WORDS = [("".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=random.Random(-i).randint(2, 9))))
         for i in range(3000)]

PREPARE = """
import json, sys, time
from jsft.config import SFTConfig
from jsft.data import load_tokenizer
from jsft.data.pipeline import prepare_dataset
config = SFTConfig()
config.data.dataset_name, config.data.cache_dir = sys.argv[1], sys.argv[2]
config.data.max_length, config.data.packing = 512, True
tokenizer, _ = load_tokenizer(sys.argv[3], config.data)
start = time.perf_counter()
prepared = prepare_dataset(config, tokenizer)
seconds = time.perf_counter() - start
s = prepared.stats
print("RESULT " + json.dumps({"seconds": seconds, "tokens": s["tokens"], "examples": s["examples"], "rows": s["rows"],
                              "cache": s["cache"], "fill_rate": s["fill_rate"]}))
"""

TRAIN_CONFIG = """
from jsft.config import DataConfig, LoggingConfig, ModelConfig, SFTConfig, TrainingConfig
config = SFTConfig(
    model=ModelConfig(tokenizer_name_or_path={tokenizer!r}, dtype="float32", compute_dtype="float32",
                      init_from_scratch=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)),
    data=DataConfig(dataset_name={data!r}, cache_dir={cache!r}, max_length=512, packing=True),
    training=TrainingConfig(per_device_train_batch_size=8, max_steps={steps}, learning_rate=1e-3,
                            compilation_cache_dir="none"),
    logging=LoggingConfig(output_dir={output!r}, logging_steps=1, save_strategy="no", report_to=["jsonl"],
                          disable_tqdm=True, export_formats=[]),
)
"""


def write_chat_rows(path: Path, tokens: float, tokens_per_row: float, seed: int = 0) -> int:
    """About `tokens` tokens of chat rows (user question, assistant answer of random words); returns the row count."""
    rng = random.Random(seed)
    rows = int(tokens / tokens_per_row)
    with open(path, "w") as f:
        for _ in range(rows):
            question = " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(20, 160)))
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return rows


def tokens_per_row(tokenizer_dir: Path, sample: Path) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in open(sample)]
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) / len(rows)


def run_child(argv: list[str], code: Path, cwd: Path) -> dict:
    """Run a child with `code` first on PYTHONPATH; its peak memory (MiB), wall seconds and stdout."""
    env = dict(os.environ, PYTHONPATH=str(code), JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(cwd / "hf_datasets"), HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    out = open(cwd / "child.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    peak = {"RssAnon": 0, "RssFile": 0}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            for line in open(f"/proc/{proc.pid}/status"):
                key = line.split(":")[0]
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    out.close()
    log = (cwd / "child.log").read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{log[-3000:]}")
    result = next((json.loads(line[7:]) for line in log.splitlines() if line.startswith("RESULT ")), {})
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "peak_rss_anon_mib": peak["RssAnon"] / 1024,
            "peak_rss_file_mib": peak["RssFile"] / 1024, "wall_seconds": round(seconds, 2), **result}


def measure(code: Path, data: Path, tokenizer_dir: Path, work: Path, steps: int) -> dict:
    cache, output = work / "cache", work / "run"
    prepare = run_child([sys.executable, "-c", PREPARE, str(data), str(cache), str(tokenizer_dir)], code, work)
    config = work / "train_config.py"
    config.write_text(TRAIN_CONFIG.format(tokenizer=str(tokenizer_dir), data=str(data), cache=str(cache),
                                          output=str(output), steps=steps))
    train = run_child([sys.executable, "-m", "jsft.train", "--config", str(config)], code, work)
    metrics = [json.loads(line) for line in open(output / "metrics.jsonl")] if (output / "metrics.jsonl").exists() \
        else []
    train["steps"] = sum(1 for m in metrics if "loss" in m)
    cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    return {"prepare": prepare, "train": train, "cache_mib": cache_bytes / 2**20}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, nargs="+", default=[5e6, 2e7])
    parser.add_argument("--old", type=Path, help="a checkout of the code before the store (its jsft/ directory)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data_scale-cpu.json")
    args = parser.parse_args(argv)
    from jsft import fixtures

    load_before = os.getloadavg()
    paths = {"store": REPO, **({"old": args.old.resolve()} if args.old else {})}
    results = []
    with tempfile.TemporaryDirectory(prefix="jsft-data-scale-") as tmp:
        tmp = Path(tmp)
        tokenizer_dir = fixtures.build_tokenizer(tmp / "tokenizer")
        write_chat_rows(tmp / "sample.jsonl", 50_000, 100.0, seed=99)
        per_row = tokens_per_row(tokenizer_dir, tmp / "sample.jsonl")
        for target in args.tokens:
            data = tmp / f"chat-{int(target)}.jsonl"
            start = time.perf_counter()
            rows = write_chat_rows(data, target, per_row)
            written = time.perf_counter() - start
            for name, code in paths.items():
                work = tmp / f"{name}-{int(target)}"
                work.mkdir()
                result = measure(code, data, tokenizer_dir, work, args.steps)
                result.update(path=name, target_tokens=int(target), dataset_rows=rows,
                              dataset_mib=data.stat().st_size / 2**20, write_dataset_seconds=round(written, 2))
                print(json.dumps(result), flush=True)
                results.append(result)
    out = {"benchmark": "data_scale", "command": "python " + " ".join(sys.argv), "commit": git_commit(), "old_code": str(args.old) if args.old else None,
           "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
