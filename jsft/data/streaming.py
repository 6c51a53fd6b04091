"""Streaming (data.dataset_streaming): the train split read lazily, tokenized and packed while training runs.

    streamed = prepare_stream(config, tokenizer)      # opens the stream, checks the first row; tokenizes nothing
    print(format_stats(streamed.stats))                # "streamed": counts are not known up front
    it = stream_iterator(streamed, rows_per_micro_batch=8, accum_steps=4, process_index=0, process_count=1)
    batch = next(it)          # {key: [accum_steps, rows_per_micro_batch, max_length]}: pipeline.batch_iterator's
    state = it.get_state()    # JSON-able; stream_iterator(...).set_state(state) gives the identical next batches

The Grain IterDataset pipeline:
1. Rows: a `datasets.IterableDataset` (datasets.load_dataset(..., streaming=True): a local .jsonl/.json/.parquet/
   .arrow/.csv file or a directory read lazily, shard by shard; a hub name; a save_to_disk directory through
   to_iterable_dataset). With data.shuffle_dataset: `IterableDataset.shuffle(seed=training.seed,
   buffer_size=SHUFFLE_BUFFER)`, reseeded each pass with set_epoch (datasets' semantics: shards in a seeded order,
   rows drawn at random from a buffer of SHUFFLE_BUFFER rows); otherwise the stream's own order.
2. Examples: chunks of CHUNK_ROWS rows through jsft.data.examples.prepare_examples (the in-memory path's code),
   untruncated; a conversation split into documents gives one example per document. Bad rows raise, or with
   data.skip_bad_rows are counted and skipped.
3. Truncation and the drop rule, per example, as pipeline.build_rows: packing keeps the first max_length tokens
   (bfd_split: fragments of max_length), no packing truncates by data.truncation_mode; a piece with no trained target
   is dropped and counted.
4. Rows: with packing, best fit over a buffer of data.packing_buffer_size examples (jsft.data.packing.StreamPacker,
   the code of `bfd_stream`): on the same examples in the same order the rows are exactly bfd_stream's, in the same
   order. `bfd` (global, longest first) cannot run on a stream, so `bfd` and `bfd_stream` both pack this way;
   `bfd_split` packs its fragments this way. Without packing each example is its own row of max_length slots.
   Grain's BestFitPackIterDataset is not used: it fills a group of num_packing_bins rows and flushes the whole group
   as soon as one example fits none of them (other, less full rows than bfd_stream's), and refuses an example longer
   than a row instead of truncating it.
5. Steps of accum_steps * rows_per_micro_batch * process_count rows (Grain's batch), each process assembling its
   own rows as batch_iterator does (pipeline.assemble_rows: the batch contract). Every process reads and packs the
   whole stream (the same rows everywhere) and keeps its part: no coordination, at the price of redundant reading.

Epochs and steps, as transformers for a dataset without a length: training.max_steps is required and ends the
run; the stream is read again (pass 2, 3, ..., reshuffled by set_epoch) as often as max_steps needs, so
num_train_epochs has no effect. A pass's last rows are packed when it ends and steps run on across passes.

Resume. The iterator's state (get_state, saved in checkpoints as batch_iterator's is) holds the pass, the rows read
in it, the packer (StreamPacker.state) and, for every example the packer still holds or a row ready to go, where it
came from (pass, row, document, token range). set_state reads the pass again from its start, tokenizes only the rows
still held, and continues: the next batches are identical. The cost of a resume is reading (not tokenizing) the
stream up to where it was; the state grows with the buffer (a few ints per held example).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grain
import numpy as np

from jsft.config import ConfigError, DataConfig, SFTConfig, check_data_compatibility
from jsft.data import examples as examples_lib
from jsft.data.formats import BadRowError
from jsft.data.packing import Packed, StreamPacker
from jsft.data.pipeline import Examples, PreparedDataset, assemble_rows, bad_row_reason, prepare_threads
from jsft.data.sources import COMPRESSED, DATA_FILE_TYPES, _saved_to_disk, in_token_cache
from jsft.hub import looks_local, no_such_path

CHUNK_ROWS = 128  # rows tokenized together (prepare_examples batches them by format)
AHEAD_CHUNKS = 2  # chunks read ahead per tokenizing thread (pipeline.prepare_threads())
SHUFFLE_BUFFER = 1000  # datasets' IterableDataset.shuffle default buffer_size
STATE_VERSION = 1
# the running counts an iterator keeps (its state's "counts"; build_rows' stats of the same names for what is read)
COUNTS = ("passes", "rows_read", "examples", "tokens", "truncated_examples", "truncated_tokens",
          "dropped_no_trained_token", "dropped_tokens", "rows", "row_tokens")


@dataclass
class StreamedDataset:
    """A streamed split: what train.py asks of a PreparedDataset that a stream can answer (no rows, no lengths)."""

    data: DataConfig
    tokenizer: object
    seed: int
    max_length: int
    pad_id: int
    stats: dict
    source: dict  # the rows' identity (files, sizes, mtimes; or the hub name): fingerprint()
    buckets = None  # no group_by_length
    pad_to_multiple_of = None  # rows of max_length

    def lengths(self) -> list[int]:
        return [self.max_length]

    def fingerprint(self) -> dict:
        """The data identity a checkpoint keeps (checkpoint.check_data_fingerprint compares the hash): the source's
        files, sizes and mtimes (a stream's tokens are not known up front; changed data settings are warned about
        on their own)."""
        blob = json.dumps(self.source, sort_keys=True, default=str)
        return {"streamed": True, "source": self.source, "hash": hashlib.sha256(blob.encode()).hexdigest()}

    def read_pass(self, epoch: int):
        """The rows of pass `epoch` (0, 1, ...) as dicts, in stream order (shuffled as the module doc says)."""
        dataset = open_stream(self.data, "train")
        if self.data.shuffle_dataset:
            dataset = dataset.shuffle(seed=self.seed % 2**32, buffer_size=SHUFFLE_BUFFER)
            dataset.set_epoch(epoch)
        return iter(dataset)


# ----------------------------------------------------------------------------------------------- the source


def stream_file(data: DataConfig, split: str = "train") -> Path | None:
    """The one data file a split is read from, or None (a directory or a hub dataset)."""
    name = data.dataset_train_split if split == "train" else data.dataset_test_split
    return next((Path(p) for p in (name, data.dataset_name) if p and Path(p).is_file()), None)


def open_stream(data: DataConfig, split: str = "train"):
    """A datasets.IterableDataset of the split's rows, read lazily (module doc, step 1)."""
    import datasets

    name = data.dataset_train_split if split == "train" else data.dataset_test_split
    file = stream_file(data, split)
    if file is not None:
        inner = DATA_FILE_TYPES.get(Path(file.stem).suffix) if file.suffix in COMPRESSED else None
        kind = inner or DATA_FILE_TYPES.get(file.suffix)
        if kind is None:
            raise ConfigError(f"data.dataset_name={str(file)!r}: unknown data file type; use one of "
                              f"{', '.join(DATA_FILE_TYPES)} (or one of them compressed: {', '.join(COMPRESSED)})")
        return datasets.load_dataset(kind, data_files=str(file), split="train", streaming=True)
    path = Path(data.dataset_name)
    if path.is_dir() and _saved_to_disk(path):
        loaded = datasets.load_from_disk(str(path))
        loaded = loaded if isinstance(loaded, datasets.Dataset) else loaded[name]
        return loaded.to_iterable_dataset()
    if path.is_dir():
        return datasets.load_dataset(str(path), data.dataset_config, split=name, streaming=True)
    if looks_local(data.dataset_name):
        raise no_such_path(data.dataset_name, "data.dataset_name")
    return datasets.load_dataset(data.dataset_name, data.dataset_config, split=name, streaming=True)


def read_rows(source, count: int, where: str, rows_read: int, epoch: int) -> list[dict]:
    """The next `count` rows of a stream (fewer at its end); a row datasets cannot read is a ConfigError naming
    where the stream stopped (a malformed JSON line: datasets' streaming reader gives no line number)."""
    chunk = []
    try:
        for row in source:
            chunk.append(row)
            if len(chunk) == count:
                break
    except (ConfigError, BadRowError):
        raise
    except Exception as e:  # noqa: BLE001 (pyarrow's ArrowInvalid, datasets' errors: one message naming the place)
        raise ConfigError(
            f"the streamed train split ({where}) cannot be read after row {rows_read + len(chunk)} of pass "
            f"{epoch + 1}: {type(e).__name__}: {' '.join(str(e).split())[:300]}. Fix: repair the data (a malformed "
            "JSON line? data.dataset_streaming=False names the line); skip_bad_rows cannot skip a row the stream "
            "cannot read") from e
    return chunk


def source_identity(data: DataConfig, split: str = "train") -> dict:
    """Every local file's path, size and mtime, else the hub name (what a checkpoint compares on resume)."""
    name = data.dataset_train_split if split == "train" else data.dataset_test_split
    file, path = stream_file(data, split), Path(data.dataset_name)
    if file is None and not path.is_dir():
        return {"hub": data.dataset_name, "config": data.dataset_config, "split": name}
    files = [file] if file is not None else sorted(
        p for p in path.rglob("*") if p.is_file() and not in_token_cache(p, path))
    return {"split": name, "files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]}


def prepare_stream(config: SFTConfig, tokenizer, split: str = "train") -> StreamedDataset:
    """Open the split as a stream and check its first row against the loss settings; tokenizes nothing."""
    data = config.data
    if split != "train":
        raise ValueError("only the train split streams (the eval split is prepared whole: pipeline.prepare_dataset)")
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token: load it with jsft.data.load_tokenizer (sets one)")
    first = next(iter(read_rows(iter(open_stream(data, split)), 1, data.dataset_name, 0, 0)), None)
    if first is None:
        raise ConfigError(f"data.dataset_streaming=True: the train split of data.dataset_name={data.dataset_name!r} "
                          "has no rows")
    check_data_compatibility(config, list(first), first)
    strategy = data.packing_strategy if data.packing else None
    stats = {
        "split": split, "streamed": True, "source": str(stream_file(data, split) or data.dataset_name),
        "row_length": data.max_length, "max_length": data.max_length, "packing": strategy or "none",
        "packing_buffer_size": data.packing_buffer_size if strategy else None,
        "shuffle_buffer": SHUFFLE_BUFFER if data.shuffle_dataset else None, "seed": config.training.seed,
        # not known up front (its only bound, max_length / 2, would make cuDNN's packed attention hold B * L / 2
        # sequences): None, so attention_impl="auto" picks another kernel (jsft.model.attention)
        "max_documents_per_row": None if strategy else 1,
    }
    return StreamedDataset(data, tokenizer, config.training.seed, data.max_length, int(tokenizer.pad_token_id),
                           stats, source_identity(data, split))


# ----------------------------------------------------------------------------------------------- examples -> pieces


def pieces(ids: np.ndarray, mask: np.ndarray, data: DataConfig) -> tuple[list[tuple[int, int]], bool]:
    """The token ranges (start, stop) of one document that become row documents, before the drop rule, and whether
    it was truncated (pipeline.build_rows' step 3)."""
    n, L = len(ids), data.max_length
    if data.packing and data.packing_strategy == "bfd_split":
        return [(a, min(a + L, n)) for a in range(0, n, L)], False
    if not data.packing and data.truncation_mode == "keep_end":
        return [(max(n - L, 0), n)], n > L
    return [(0, min(n, L))], n > L


def trains(mask: np.ndarray, start: int, stop: int) -> bool:
    """Does the piece train a target (a trained token after its first)?"""
    return bool(mask[start + 1:stop].any())


# ----------------------------------------------------------------------------------------------- the iterator


class StreamRowsIterator(grain.DatasetIterator):
    """Packed rows of a stream, one at a time: each a list of documents (ids, loss mask); get_state / set_state as
    the module doc says (a grain.DatasetIterator without a parent: it reads the stream itself)."""

    def __init__(self, streamed: StreamedDataset):
        super().__init__()
        self.streamed = streamed
        self.data = dataclasses.replace(streamed.data, max_length=None)  # untruncated examples (step 2)
        self.counts = Counter(dict.fromkeys(COUNTS, 0))  # running counts (the report)
        self.bad = Counter()  # bad rows skipped, by reason
        self.ready: deque[list[tuple[int, int]]] = deque()  # rows to go: lists of (pass, item)
        self.held: dict[tuple[int, int], tuple] = {}  # (pass, item) -> (row, doc, start, stop, ids, mask)
        self.pool = ThreadPoolExecutor(prepare_threads(), thread_name_prefix="jsft-stream")
        self._start_pass(0)

    # -- reading
    def _start_pass(self, epoch: int, rows_read: int = 0):
        """Pass `epoch` from its start, or (set_state) from row `rows_read` of the source set_state positioned."""
        if rows_read == 0:
            self.source = self.streamed.read_pass(epoch)
        self.epoch, self.rows_read, self.items_made = epoch, rows_read, 0
        self.ahead: deque = deque()  # chunks being tokenized: (first row, number of rows, future of _documents)
        self.read_ahead, self.source_done = rows_read, False  # rows read off the source (rows_read: of them taken)
        d = self.streamed.data
        self.packer = StreamPacker(d.max_length, d.packing_buffer_size) if d.packing else None

    def _read_ahead(self) -> None:
        """Keep AHEAD_CHUNKS chunks a thread being tokenized on the pool (the tokenizer's Rust batch call releases the
        GIL, as in pipeline.tokenize_rows); they are taken in order, so the threads change no row."""
        while not self.source_done and len(self.ahead) < AHEAD_CHUNKS * prepare_threads():
            chunk = read_rows(self.source, CHUNK_ROWS, self.streamed.stats["source"], self.read_ahead, self.epoch)
            if not chunk:
                self.source_done = True
                break
            future = self.pool.submit(self._documents, chunk, self.read_ahead, self.epoch)
            self.ahead.append((self.read_ahead, len(chunk), future))
            self.read_ahead += len(chunk)

    def _documents(self, rows: list[dict], first: int, epoch: int):
        """(row index, document number, ids, mask) of each document of these rows, and the reasons of the bad rows
        skipped; a bad row is raised unless data.skip_bad_rows. Runs on a pool thread: it changes nothing here."""
        out, bad = [], []
        prepared = examples_lib.prepare_examples(rows, self.streamed.tokenizer, self.data, first_index=first)
        for k, example in enumerate(prepared):
            if isinstance(example, Exception):
                if not self.data.skip_bad_rows:
                    raise BadRowError(example.row_index, example.field, example.problem, example.fix,
                                      f"streamed train split ({self.streamed.stats['source']}, pass "
                                      f"{epoch + 1}, rows counted in stream order)") from example
                bad.append(bad_row_reason(example))
                continue
            ends = np.cumsum(example.get("document_lengths", [len(example["input_ids"])]))
            for doc, (a, b) in enumerate(zip(np.r_[0, ends[:-1]], ends)):
                out.append((first + k, doc, example["input_ids"][a:b], example["loss_mask"][a:b]))
        return out, bad

    def _fill(self):
        """Take tokenized chunks until a row is ready (a pass that ends packs its last rows, the next one begins)."""
        while not self.ready:
            self._read_ahead()
            if not self.ahead:
                if self.items_made == 0 and self.rows_read == 0:
                    raise ConfigError(f"the streamed train split ({self.streamed.stats['source']}) has no rows")
                if self.items_made == 0:
                    raise ConfigError(f"no row of the streamed train split ({self.streamed.stats['source']}) "
                                      f"trains a token:\n{self.report()}")
                if self.packer is not None:
                    self.ready.extend([(self.epoch, i) for i, _, _ in row] for row in self.packer.finish())
                self.counts["passes"] += 1
                print(self.report(), flush=True)  # what the preparation report could not say up front
                self._start_pass(self.epoch + 1)
                continue
            _, size, future = self.ahead.popleft()
            documents, bad = future.result()
            self.rows_read += size
            self.counts["rows_read"] += size
            self.bad.update(bad)
            for row, doc, ids, mask in documents:
                self._add_document(row, doc, ids, mask)

    def _add_document(self, row: int, doc: int, ids, mask):
        c = self.counts
        c["examples"] += 1
        c["tokens"] += len(ids)
        spans, truncated = pieces(ids, mask, self.streamed.data)
        kept = [trains(mask, start, stop) for start, stop in spans]
        if truncated and kept[0]:  # counted as build_rows counts them: truncated examples that are kept
            c["truncated_examples"] += 1
            c["truncated_tokens"] += len(ids) - (spans[0][1] - spans[0][0])
        for (start, stop), keep in zip(spans, kept):
            if not keep:
                c["dropped_no_trained_token"] += 1
                c["dropped_tokens"] += stop - start if self.streamed.data.packing_strategy == "bfd_split" and \
                    self.streamed.data.packing else len(ids)
                continue
            key = (self.epoch, self.items_made)
            self.items_made += 1
            self.held[key] = (row, doc, start, stop, ids, mask)
            if self.packer is None:
                self.ready.append([key])
            else:
                self.ready.extend([(self.epoch, i) for i, _, _ in r] for r in self.packer.push(key[1], stop - start))

    def __next__(self) -> list[tuple[np.ndarray, np.ndarray]]:
        self._fill()
        keys = self.ready.popleft()
        documents = []
        for key in keys:
            row, doc, start, stop, ids, mask = self.held.pop(key)
            documents.append((ids[start:stop], mask[start:stop]))
        self.counts["rows"] += 1
        self.counts["row_tokens"] += sum(len(i) for i, _ in documents)
        return documents

    def report(self) -> str:
        """The counts so far (all passes), one line: printed at the end of each pass."""
        c = self.counts
        bad = ", ".join(f"{n:,} x {reason}" for reason, n in self.bad.items()) or "none"
        return (f"data (train, streamed): pass {c['passes']} done; so far {c['rows_read']:,} rows read, "
                f"{c['examples']:,} examples, {c['tokens']:,} tokens; truncated {c['truncated_examples']:,} examples "
                f"({c['truncated_tokens']:,} tokens); dropped (no trained token) {c['dropped_no_trained_token']:,} "
                f"({c['dropped_tokens']:,} tokens); skipped bad rows: {bad}; {c['rows']:,} rows given out, "
                f"{c['row_tokens']:,} tokens")

    # -- state
    def get_state(self) -> dict:
        held = [[e, i, row, doc, start, stop] for (e, i), (row, doc, start, stop, _, _) in self.held.items()]
        return {"version": STATE_VERSION, "epoch": self.epoch, "rows_read": self.rows_read,
                "items_made": self.items_made, "packer": None if self.packer is None else self.packer.state(),
                "ready": [[list(k) for k in keys] for keys in self.ready], "held": held,
                "counts": dict(self.counts), "bad_rows": dict(self.bad)}

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"the saved data position is not a streamed one of this version ({state!r:.200}): "
                              "it was saved by a run without data.dataset_streaming, or by another jsft")
        self.counts, self.bad = Counter(state["counts"]), Counter(state["bad_rows"])
        epoch = state["epoch"]
        wanted: dict[int, dict[int, list]] = {}  # pass -> row -> [(item, doc, start, stop)]
        for e, i, row, doc, start, stop in state["held"]:
            wanted.setdefault(e, {}).setdefault(row, []).append((i, doc, start, stop))
        self.held = {}
        for e in sorted(set(wanted) | {epoch}):
            source = self.streamed.read_pass(e)
            stop_at = state["rows_read"] if e == epoch else max(wanted[e]) + 1
            self.epoch = e
            self._replay(source, wanted.get(e, {}), stop_at)
            if e == epoch:
                self.source = source
        self._start_pass(epoch, state["rows_read"])  # on self.source, at rows_read
        self.items_made = state["items_made"]
        if state["packer"] is not None:
            self.packer = StreamPacker.from_state(state["packer"])
        self.ready = deque([tuple(k) for k in keys] for keys in state["ready"])

    def _replay(self, source, rows: dict[int, list], stop_at: int) -> None:
        """Read a pass's first stop_at rows; tokenize those in `rows` (on the pool's threads) and hold their pieces
        again."""
        chunk, indices, futures = [], [], []
        for index in range(stop_at):
            row = next(source, None)
            if row is None:
                raise ConfigError(f"resume: the streamed train split ({self.streamed.stats['source']}) has fewer "
                                  f"rows than the checkpoint read ({stop_at} in pass {self.epoch + 1}): the data "
                                  "changed since the checkpoint was written")
            if index in rows:
                chunk.append(row)
                indices.append(index)
            if len(chunk) == CHUNK_ROWS or (chunk and index == stop_at - 1):
                futures.append(self.pool.submit(self._held_again, chunk, indices, rows, self.epoch))
                chunk, indices = [], []
        for future in futures:
            self.held.update(future.result())

    def _held_again(self, chunk: list[dict], indices: list[int], rows: dict[int, list], epoch: int) -> dict:
        """The held entries of these rows (pass `epoch`), tokenized again; runs on a pool thread."""
        held = {}
        prepared = examples_lib.prepare_examples(chunk, self.streamed.tokenizer, self.data, first_index=None)
        for index, example in zip(indices, prepared):
            if isinstance(example, Exception):
                raise ConfigError(f"resume: row {index} of pass {epoch + 1} of the streamed train split is "
                                  f"bad now ({example}): the data changed since the checkpoint was written")
            ends = np.cumsum(example.get("document_lengths", [len(example["input_ids"])]))
            bounds = list(zip(np.r_[0, ends[:-1]], ends))
            for item, doc, start, stop in rows[index]:
                a, b = bounds[doc]
                held[(epoch, item)] = (index, doc, start, stop, example["input_ids"][a:b], example["loss_mask"][a:b])
        return held


class StreamRows(grain.IterDataset):
    """The grain.IterDataset of a stream's packed rows (StreamRowsIterator)."""

    def __init__(self, streamed: StreamedDataset):
        super().__init__()
        self.streamed = streamed

    def __iter__(self) -> StreamRowsIterator:
        return StreamRowsIterator(self.streamed)


def stream_rows(streamed: StreamedDataset):
    """The grain.IterDataset of packed rows (each a list of documents (ids, mask))."""
    return StreamRows(streamed)


def _process_step(rows: list, streamed: StreamedDataset, rows_per_micro_batch: int, accum_steps: int,
                  process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """One optimizer step's rows -> this process's part of the batch contract: {key: [accum_steps, rows, L]}."""
    step_rows = accum_steps * process_count * rows_per_micro_batch
    rows = list(rows) + [[]] * (step_rows - len(rows))  # an empty row: all padding, nothing trained
    mine = [rows[i] for i in np.arange(step_rows).reshape(accum_steps, process_count, rows_per_micro_batch)
            [:, process_index].reshape(-1)]
    documents = [d for row in mine for d in row]
    lengths = np.array([len(ids) for ids, _ in documents], dtype=np.int64)
    examples = Examples(
        tokens=np.concatenate([ids for ids, _ in documents]).astype(np.int32) if documents else np.zeros(0, np.int32),
        loss_mask=np.concatenate([m for _, m in documents]).astype(bool) if documents else np.zeros(0, bool),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        source_rows=np.zeros(len(documents), np.int64), rows_read=0)
    row_ptr = np.concatenate([[0], np.cumsum([len(row) for row in mine])]).astype(np.int64)
    packed = Packed(row_ptr, np.arange(len(documents), dtype=np.int64), np.zeros(len(documents), np.int64), lengths)
    prepared = PreparedDataset(examples, packed, streamed.max_length, streamed.pad_id, {})
    row_ids = np.where([len(row) > 0 for row in mine], np.arange(len(mine)), -1).astype(np.int64)
    batch = assemble_rows(prepared, row_ids, streamed.max_length)
    return {k: v.reshape(accum_steps, rows_per_micro_batch, streamed.max_length) for k, v in batch.items()}


def stream_dataset(streamed: StreamedDataset, rows_per_micro_batch: int, accum_steps: int, process_index: int = 0,
                   process_count: int = 1):
    """The grain.IterDataset of optimizer steps (see stream_iterator)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    step_rows = rows_per_micro_batch * process_count * accum_steps
    return stream_rows(streamed).batch(step_rows, drop_remainder=False, batch_fn=list).map(partial(
        _process_step, streamed=streamed, rows_per_micro_batch=rows_per_micro_batch, accum_steps=accum_steps,
        process_index=process_index, process_count=process_count))


def stream_iterator(streamed: StreamedDataset, rows_per_micro_batch: int, accum_steps: int, process_index: int = 0,
                    process_count: int = 1):
    """A checkpointable Grain DatasetIterator of optimizer steps, endless (the stream is read again pass after pass;
    the run's max_steps ends it): {key: [accum_steps, rows_per_micro_batch, max_length]}."""
    return iter(stream_dataset(streamed, rows_per_micro_batch, accum_steps, process_index, process_count))
