"""Tokenization of a split: every row through `jsft.data.prepare_example` WITHOUT truncation, in chunks of 128 rows
batched by `jsft.data.examples` (one path; a conversation split into one document per turn gives one example per
document).

    examples = tokenize_rows(dataset, tokenizer, config.data, writer=store_writer)   # jsft.data.pipeline does this

In-process on one thread per core (the tokenizer's Rust batch call releases the GIL, so one thread encodes while
another renders templates), or in Grain worker processes when data.dataset_num_proc > 1 (row order kept either way;
each worker is a spawned process importing grain, jax and transformers, seconds each, so they pay off on large
datasets only). 2,000 fixture chat rows take ~0.25 s on 2 cores, 2,000 prompt/completion rows ~0.05 s. A bar shows
progress when it takes over 2 s. Rows that raise BadRowError stop the run, or with data.skip_bad_rows are counted
per reason (`bad_row_reason`) and skipped.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import partial

import numpy as np
from tqdm.auto import tqdm

from jsft.config import ConfigError, DataConfig
from jsft.data import store
from jsft.data.store import Examples

PREPARE_CHUNK_ROWS = 128


def bad_row_reason(error) -> str:
    """Group bad rows by field and problem, numbers elided: 'messages: expected a list, got str'."""
    return f"{error.field}: {re.sub(r'[0-9]+', 'N', error.problem)}"


def _prepare_chunk(chunk: tuple[int, int], dataset, tokenizer, data: DataConfig) -> dict:
    """prepare_example over rows [start, stop) (jsft.data.examples); runs in a Grain worker or in-process.
    Bad rows come back as BadRowError objects (they pickle), so the parent raises or counts them in row order.
    A conversation split into one document per turn gives one example per document, each of the same row."""
    from jsft.data import examples

    start, stop = chunk
    columns = dataset[start:stop]
    names = list(columns)
    rows = [dict(zip(names, values)) for values in zip(*(columns[n] for n in names))]
    ids, masks, kept, bad = [], [], [], []
    for k, example in enumerate(examples.prepare_examples(rows, tokenizer, data, first_index=start)):
        if isinstance(example, Exception):
            bad.append(example)
            if not data.skip_bad_rows:
                break
            continue
        bounds = [0, *np.cumsum(example.get("document_lengths", [len(example["input_ids"])])).tolist()]
        for a, b in zip(bounds, bounds[1:]):
            ids.append(example["input_ids"][a:b])
            masks.append(example["loss_mask"][a:b])
            kept.append(start + k)
    return {
        "tokens": np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32),
        "loss_mask": np.concatenate(masks).astype(bool) if masks else np.zeros(0, bool),
        "lengths": np.array([len(x) for x in ids], dtype=np.int64),
        "rows": np.array(kept, dtype=np.int64),
        "bad": bad,
        "size": stop - start,
    }


def _mark_flags_parsed(worker_index: int, worker_count: int) -> None:
    from absl import flags

    flags.FLAGS.mark_as_parsed()


def prepare_threads() -> int:
    """Threads preparing chunks in-process: one per core this process may use (at most 8)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


@contextmanager
def _tokenizer_threads_off():
    """TOKENIZERS_PARALLELISM=false while our threads run, unless the user set it: each of our threads' batch call
    then encodes on its own core instead of every call spreading over all cores (measured 25 % faster on 2 cores)."""
    user_set = "TOKENIZERS_PARALLELISM" in os.environ
    if not user_set:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if not user_set:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)


def tokenize_rows(dataset, tokenizer, data: DataConfig, desc: str = "tokenize",
                  writer: store.StoreWriter | None = None) -> Examples:
    """prepare_example over every row, untruncated, in row order. With a `writer` (jsft.data.store), each finished
    chunk's tokens and mask are appended to the store's files and dropped, so only the per-example offsets and
    source rows are held: the Examples returned then carry no tokens (empty arrays) until the store is opened.

    In-process, chunks are prepared by prepare_threads() threads: the tokenizer's batch call runs in Rust without the
    GIL, so one thread encodes while another renders templates and slices rows in Python (2,000 fixture chat rows:
    0.50 s on one thread, 0.30 s on two; benchmarks/data_prep.py). With data.dataset_num_proc > 1, Grain worker
    processes instead. A bar shows progress when it takes more than 2 s.
    """
    import grain

    n = len(dataset)
    untruncated = dataclasses.replace(data, max_length=None)
    chunks = [(a, min(a + PREPARE_CHUNK_ROWS, n)) for a in range(0, n, PREPARE_CHUNK_ROWS)]
    work = partial(_prepare_chunk, dataset=dataset, tokenizer=tokenizer, data=untruncated)
    pool = None
    if (data.dataset_num_proc or 1) > 1 and len(chunks) > 1:
        _mark_flags_parsed(0, 1)
        ds = grain.MapDataset.source(chunks).map(work).to_iter_dataset(grain.ReadOptions(num_threads=0))
        options = grain.MultiprocessingOptions(num_workers=min(data.dataset_num_proc, len(chunks)))
        results = iter(ds.mp_prefetch(options, worker_init_fn=_mark_flags_parsed))
    elif prepare_threads() > 1 and len(chunks) > 1:
        pool = ThreadPoolExecutor(prepare_threads(), thread_name_prefix="jsft-prepare")
        results = _ordered_map(pool, work, chunks, ahead=4 * prepare_threads())
    else:
        results = map(work, chunks)
    parts, lengths, source_rows, bad = [], [], [], Counter()
    bar = tqdm(total=n, desc=desc, unit="rows", delay=2, dynamic_ncols=True, leave=False)
    try:
        with _tokenizer_threads_off() if pool is not None else nullcontext():
            for part in results:
                for error in part["bad"]:
                    if not data.skip_bad_rows:
                        raise error
                    bad[bad_row_reason(error)] += 1
                if writer is None:
                    parts.append(part)
                else:
                    writer.append(part["tokens"], part["loss_mask"])
                lengths.append(part["lengths"])
                source_rows.append(part["rows"])
                bar.update(part["size"])
    except RuntimeError as e:
        if pool is not None or "terminated unexpectedly" not in str(e):
            raise
        raise ConfigError(
            f"a data worker process died (data.dataset_num_proc={data.dataset_num_proc}): {str(e).splitlines()[0]} "
            "Fix: if you call jsft from your own script, put its code under `if __name__ == \"__main__\":` (worker "
            "processes import the script again); if the machine ran out of memory, lower data.dataset_num_proc; "
            "or set data.dataset_num_proc=None (threads in this process)"
        ) from e
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # after an error: chunks not started are dropped
        getattr(results, "close", lambda: None)()  # stops Grain's workers and frees their shared memory
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    return Examples(
        tokens=np.concatenate([p["tokens"] for p in parts]) if parts else np.zeros(0, np.int32),
        loss_mask=np.concatenate([p["loss_mask"] for p in parts]) if parts else np.zeros(0, bool),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        source_rows=np.concatenate(source_rows) if source_rows else np.zeros(0, np.int64),
        rows_read=n,
        bad_rows=dict(sorted(bad.items())),
    )


def _ordered_map(pool: ThreadPoolExecutor, work, items: list, ahead: int):
    """pool.map(work, items) in order, with at most `ahead` items submitted and not yet consumed (Executor.map
    submits all at once, so finished chunks could pile up in memory; Python 3.14's buffersize does this)."""
    pending = deque()
    for item in items:
        pending.append(pool.submit(work, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
