"""The Grain input pipeline: dataset rows -> examples (cached on disk) -> rows of max_length -> batches.

    prepared = prepare_dataset(config, tokenizer, split="train")        # or split="eval"
    print(format_stats(prepared.stats))
    it = batch_iterator(prepared, rows_per_micro_batch=8, accum_steps=4, seed=config.training.seed,
                        num_epochs=1, shuffle=True, process_index=0, process_count=1)
    batch = next(it)          # {key: [accum_steps, rows_per_micro_batch, L]} of the batch contract (DESIGN.md)
    state = it.get_state()    # a small dict; it.set_state(state) on a fresh iterator resumes exactly here
    steps_per_epoch(prepared, rows_per_micro_batch * process_count, accum_steps)

Preparation (`prepare_dataset`):
1. Rows come from `jsft.data.sources` (datasets.load_dataset): a local .jsonl/.json/.parquet/.arrow/.csv file, a
   directory, or a hub name. A malformed JSON line is a BadRowError naming the file and line (with skip_bad_rows, a
   counted skip).
   The loss settings are then checked against the columns (jsft.data.columns.check_data_compatibility), before any
   work.
2. Every row goes through `jsft.data.prepare_example` WITHOUT truncation, in chunks (`jsft.data.tokenize`: threads
   or Grain worker processes, row order kept). Rows that raise BadRowError stop the run, or with
   data.skip_bad_rows are counted per reason and skipped. The examples (one flat token array, one flat mask, offsets)
   go to a token store on disk, `<cache_dir>/__examples-<split>-<key>/` (jsft.data.store: memory-mapped .npy files):
   each finished chunk's tokens and mask are appended to the files as it arrives, so preparation holds a few chunks
   of tokens, never the split's; only the per-example offsets and source rows (16 bytes an example) stay in memory.
   The store is written into a temporary directory and renamed into place when complete (a killed run leaves none
   that is read); an unreadable store is warned about, removed and rebuilt. It is keyed by the data files (path,
   size, mtime), the tokenizer (vocabulary, special tokens, chat template), the DataConfig fields that change
   tokens, and the source of the code that tokenizes, and reused by later runs and by every host that sees the same
   cache_dir. Changing max_length, packing or truncation_mode reuses it: those steps run after it, over the example
   lengths (and the mask, read in bounded pieces, for the trained-token counts).
3. Truncation. Without packing: data.truncation_mode (keep_start / keep_end) to max_length. `bfd` / `bfd_stream`: the
   first max_length tokens. `bfd_split`: overlong examples become fragments of max_length. `wrapped`: none.
   Truncated examples and tokens are counted.
4. An example (a fragment, for bfd_split) with no trained target left after truncation is dropped and counted.
   That is TRL's rule without packing. TRL 1.16 does not apply it when packing: such examples keep their place in
   the bins, and a step may then train no token at all (loss 0, while Adam's momentum still moves the weights);
   jsft drops them in every path, so with packing and truncation its rows hold other examples than TRL's (the
   report counts them). ("Trained target": a trained token after the document's first token, which is never a
   target; TRL also keeps a document whose only trained label is its first token, which trains nothing.) `wrapped`
   cuts after this rule, so a piece of a cut document may train nothing; it is kept (the row's other pieces need
   its place), but a whole row that trains nothing (cut from inside a long prompt, with assistant_only_loss or
   prompt/completion data) is dropped and counted: a step of such rows would train nothing.
5. Rows. Packing: `jsft.data.packing` over the example lengths, in an order shuffled by training.seed when
   data.shuffle_dataset (as TRL shuffles before packing). Without packing each example is its own row, padded to
   max_length; if max_length is None, to the longest example rounded up to a multiple of 64 (one static shape).

Batches (`batch_iterator`): a Grain MapDataset over row indices: shuffle (Grain's index shuffle, reseeded each epoch)
-> batch into optimizer steps of accum_steps * rows_per_micro_batch * process_count rows -> repeat num_epochs (None:
forever) -> assemble this process's rows (a .map that gathers their slices' tokens from the memory-mapped store:
a process reads the pages of its own rows only). With drop_remainder=False (training and eval, as TRL's
dataloader_drop_last=False) each epoch's last partial step is kept and completed with empty rows (padding, nothing
trained), so every row counts once an epoch; with drop_remainder=True that step is dropped (`dropped_rows_per_epoch`).
Processes: each micro-batch of the global step holds rows_per_micro_batch rows of each process, process p taking
[p * rows_per_micro_batch, (p + 1) * rows_per_micro_batch); the processes' rows are disjoint and together are the
single-process batch.

Example of one packed row (L = 8) holding documents [a b c] (mask 0 1 1) and [d e] (mask 1 1):

    input_ids    a b c d e pad pad pad
    segment_ids  1 1 1 2 2 0   0   0
    positions    0 1 2 0 1 0   0   0
    targets      b c pad e pad pad pad pad
    loss_mask    1 1 0 1 0 0   0   0
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from jsft.config import ConfigError, DataConfig, SFTConfig
from jsft.data import buckets, mixture, packing, store
from jsft.data.columns import check_data_compatibility
from jsft.data.formats import BadRowError
from jsft.data.sources import read_split, row_location, source_fingerprint, split_source
from jsft.data.store import Examples
from jsft.data.tokenize import bad_row_reason, tokenize_rows

CACHE_VERSION = 1
# DataConfig fields applied after the cached tokenization (changing them reuses the cache).
NOT_IN_CACHE_KEY = (
    "max_length", "packing", "packing_strategy", "packing_buffer_size", "padding_free", "pad_to_multiple_of",
    "truncation_mode", "shuffle_dataset", "dataset_num_proc", "cache_dir", "dataset_test_split", "dataset_train_split",
)
BATCH_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")


# ----------------------------------------------------------------------------------------------- data


@dataclass
class PreparedDataset:
    """Examples + rows of `max_length` slots. Row r holds slices (example, start, stop) of `rows` (packing.Packed)."""

    examples: Examples
    rows: packing.Packed
    max_length: int
    pad_id: int
    stats: dict
    pad_to_multiple_of: int | None = None  # data.pad_to_multiple_of (unpacked rows only): see step_length
    buckets: list[int] | None = None  # train_sampling_strategy="group_by_length": the row lengths (data/buckets.py)

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    @functools.cached_property
    def row_lengths(self) -> np.ndarray:
        """Tokens in each row (the rest of its max_length slots is padding)."""
        sizes = self.rows.stop - self.rows.start
        return np.add.reduceat(sizes, self.rows.row_ptr[:-1]) if self.num_rows else np.zeros(0, np.int64)

    def step_length(self, row_ids) -> int:
        """The length L of a step holding these rows (-1: an empty row): max_length, or with pad_to_multiple_of m the
        longest row rounded up to a multiple of m (at most max_length), so a step compiles once per distinct L.
        E.g. rows of 3, 70 and 20 tokens, max_length 512, m = 64: L = 128.
        """
        row_ids = np.asarray(row_ids, dtype=np.int64)
        real = row_ids[row_ids >= 0]
        if self.buckets is not None and len(real):  # the smallest bucket that holds the longest row
            longest = int(self.row_lengths[real].max())
            return next(b for b in self.buckets if b >= longest)
        if self.pad_to_multiple_of is None or len(real) == 0:
            return self.max_length
        m = self.pad_to_multiple_of
        return int(min(-(-int(self.row_lengths[real].max()) // m) * m, self.max_length))

    def lengths(self) -> list[int]:
        """Every L a step can have (the shapes a run compiles for)."""
        if self.buckets is not None:
            return list(self.buckets)
        if self.pad_to_multiple_of is None:
            return [self.max_length]
        m, L = self.pad_to_multiple_of, self.max_length
        return sorted({min(k * m, L) for k in range(1, -(-L // m) + 1)})

    def batch(self, row_ids, length: int | None = None) -> dict[str, np.ndarray]:
        """The batch contract for these rows: {key: [len(row_ids), length or max_length]}."""
        return assemble_rows(self, np.asarray(row_ids, dtype=np.int64), length)


# ----------------------------------------------------------------------------------------------- the token cache


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    h.update(vocabulary.encode())
    h.update(json.dumps([type(tokenizer).__name__, str(tokenizer.chat_template), tokenizer.bos_token,
                         tokenizer.eos_token, tokenizer.pad_token, str(tokenizer.special_tokens_map)]).encode())
    return h.hexdigest()


def _code_fingerprint() -> str:
    """The source of the code that turns rows into tokens: editing it invalidates caches."""
    from jsft.data import batched, chat, examples, formats, templates, token_bytes, tokenize

    modules = (batched, chat, examples, formats, templates, token_bytes, tokenize)
    return hashlib.sha256("".join(inspect.getsource(m) for m in modules).encode()).hexdigest()


def cache_key(data: DataConfig, split: str, dataset, tokenizer, source: dict | None = None) -> str:
    """The token cache key: the rows' identity (`source`, default sources.source_fingerprint; a mixture's:
    jsft.data.mixture.fingerprint), the tokenizer, the DataConfig fields that change tokens (data.datasets and
    test_split_size among them), the code."""
    fields = {k: v for k, v in dataclasses.asdict(data).items() if k not in NOT_IN_CACHE_KEY}
    source = source_fingerprint(data, split, dataset) if source is None else source
    blob = json.dumps(
        [CACHE_VERSION, source, _tokenizer_fingerprint(tokenizer), fields,
         _code_fingerprint()], sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _load_store(path: Path) -> Examples | None:
    """The stored examples, or None (with a warning, the store removed) when the store is unreadable: a cache is
    disposable, so a truncated or damaged one is rebuilt rather than an error."""
    try:
        return store.open_store(path)
    except Exception as e:  # noqa: BLE001 (OSError, ValueError, KeyError, JSONDecodeError: all "damaged")
        warnings.warn(f"token cache {path} is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:200]}): "
                      "removing it and tokenizing again", UserWarning, stacklevel=3)
        shutil.rmtree(path, ignore_errors=True)
        return None


def read_rows(config: SFTConfig, split: str):
    """(dataset, unreadable, mixture or None): a split's rows from data.datasets (jsft.data.mixture) or one dataset
    (jsft.data.sources); a mixture's eval rows without test_split_size are dataset_test_split's own file."""
    data = config.data
    if data.datasets and (split == "train" or data.test_split_size is not None):
        mix = mixture.read_mixture(data, split, config.training.seed)
        return mix.dataset, mix.unreadable, mix
    return (*read_split(data, split), None)


def cached_examples(config: SFTConfig, tokenizer, split: str = "train") -> tuple[Examples, str, list[dict] | None]:
    """Examples of a split, from the cache when its key matches; returns (examples, "hit" | "miss", the mixture's
    per-component counts or None).

    The loss settings are checked against the dataset's columns (jsft.data.columns.check_data_compatibility) as soon
    as the rows are loaded, before the cache or any tokenization: an impossible combination is a ConfigError naming
    the field.
    """
    cache_dir = Path(config.data.cache_dir or Path(config.logging.output_dir) / "cache")
    dataset, unreadable, mix = read_rows(config, split)
    components = None if mix is None else mix.components
    check_data_compatibility(config, dataset.column_names, dataset[0] if len(dataset) else None)
    source = None if mix is None else mixture.fingerprint(config.data, split, config.training.seed)
    key = cache_key(config.data, split, dataset, tokenizer, source)
    path = store.store_path(cache_dir, split, key)
    if path.exists():
        cached = _load_store(path)
        if cached is not None:
            return cached, "hit", components
    with store.StoreWriter(path) as writer:
        try:
            examples = tokenize_rows(dataset, tokenizer, config.data, f"tokenize {split}", writer)
        except BadRowError as e:  # which split's rows the index counts (train and eval both start at row 0), which
            # line (raised only without skip_bad_rows, so no malformed line was skipped: the index is the file's row)
            source = split_source(config.data, split, row_location(config.data, split, e.row_index)) if mix is None \
                else mix.source(e.row_index)
            raise BadRowError(e.row_index, e.field, e.problem, e.fix, source) from e
        examples = _count_unreadable(examples, unreadable, renumber=mix is None)
        writer.commit(examples.offsets, examples.source_rows, examples.rows_read, examples.bad_rows)
    return store.open_store(path), "miss", components


def _count_unreadable(examples: Examples, unreadable: list[BadRowError], renumber: bool = True) -> Examples:
    """Add the rows skipped while reading (malformed JSON lines) to the bad-row count and to rows_read, and number
    source_rows as rows of the file (the dataset read has no row for a skipped line; a mixture's rows, renumber=False,
    stay rows of the mixture split: its files' rows are cut by fraction and test_split_size)."""
    if not unreadable:
        return examples
    rows_read = examples.rows_read + len(unreadable)
    if not renumber:
        bad = Counter(examples.bad_rows) + Counter(bad_row_reason(e) for e in unreadable)
        return dataclasses.replace(examples, rows_read=rows_read, bad_rows=dict(sorted(bad.items())))
    file_rows = np.delete(np.arange(rows_read, dtype=np.int64), [e.row_index for e in unreadable])
    bad = Counter(examples.bad_rows) + Counter(bad_row_reason(e) for e in unreadable)
    return dataclasses.replace(examples, source_rows=file_rows[examples.source_rows], rows_read=rows_read,
                               bad_rows=dict(sorted(bad.items())))


# ----------------------------------------------------------------------------------------------- rows


def _trained_targets(examples: Examples, example, start, stop) -> np.ndarray:
    """Trained targets of each slice: trained tokens in (start, stop) of its example (the first is never a target).
    The mask is read a range of examples at a time (about store.READ_CHUNK tokens), so memory stays bounded."""
    example, start, stop = (np.asarray(a, np.int64) for a in (example, start, stop))
    order = np.argsort(example, kind="stable")
    in_order = example[order]
    offsets, out = examples.offsets, np.zeros(len(example), np.int64)
    first = 0
    while first < len(order):  # slices of examples [lo, hi), whose tokens span at most READ_CHUNK (or one example)
        lo = int(in_order[first])
        hi = max(lo + 1, int(np.searchsorted(offsets, offsets[lo] + store.READ_CHUNK, side="right")) - 1)
        last = int(np.searchsorted(in_order, hi, side="left"))
        mask = store.read_range(examples.loss_mask, int(offsets[lo]), int(offsets[hi]))
        cum = np.zeros(len(mask) + 1, np.int64)
        np.cumsum(mask, out=cum[1:])
        k = order[first:last]
        base = offsets[example[k]] - offsets[lo]
        out[k] = cum[base + stop[k]] - cum[np.minimum(base + start[k] + 1, base + stop[k])]
        first = last
    return out


def build_rows(examples: Examples, data: DataConfig, seed: int) -> tuple[packing.Packed, int, dict]:
    """Truncate, drop what trains nothing, pack (or one example per row). Returns (rows, row length, stats)."""
    lengths = examples.lengths
    n = len(lengths)
    if data.packing:
        if data.max_length is None:
            raise ConfigError("data.packing=True needs data.max_length (the row length packing fills).")
        row_length, strategy = data.max_length, data.packing_strategy
    else:
        longest = int(lengths.max()) if n else 1
        row_length, strategy = data.max_length or -(-longest // 64) * 64, None

    example = np.arange(n, dtype=np.int64)
    start = np.zeros(n, dtype=np.int64)
    if strategy == "bfd_split":
        example, start, stop = packing.split_overlong(lengths, row_length)
    elif strategy == "wrapped":
        stop = lengths.copy()
    elif strategy is None and data.truncation_mode == "keep_end":
        start, stop = np.maximum(lengths - row_length, 0), lengths.copy()
    elif strategy is None and data.truncation_mode != "keep_start":
        raise ConfigError(f"data.truncation_mode={data.truncation_mode!r}: choose keep_start or keep_end")
    else:  # keep_start: no packing, bfd, bfd_stream
        stop = np.minimum(lengths, row_length)
    truncated = lengths > row_length if strategy not in ("bfd_split", "wrapped") else np.zeros(n, bool)

    trains = _trained_targets(examples, example, start, stop) > 0
    dropped = int((~trains).sum())  # tokens: a dropped example's all (truncated ones too), a dropped fragment's own
    dropped_tokens = int((stop - start)[~trains].sum() if strategy == "bfd_split" else lengths[~trains].sum())
    example, start, stop = example[trains], start[trains], stop[trains]

    if strategy is None:
        rows = packing.Packed(np.arange(len(example) + 1, dtype=np.int64), example, start, stop)
    else:
        order = np.arange(len(example))
        if data.shuffle_dataset:
            order = np.random.default_rng(seed).permutation(len(example))
        example, start, stop = example[order], start[order], stop[order]
        rows = packing.pack_slices(example, start, stop, row_length, strategy, data.packing_buffer_size)
    untrained_rows = 0
    if strategy == "wrapped":  # a row cut from inside a long prompt trains nothing: drop it (a step of such rows
        # would train nothing); pieces restart as documents, so no kept row loses context by it
        trained = _trained_targets(examples, rows.example, rows.start, rows.stop)
        keep = (np.add.reduceat(trained, rows.row_ptr[:-1]) if rows.num_rows else np.zeros(0, np.int64)) > 0
        untrained_rows = int((~keep).sum())
        rows = rows.select_rows(keep)

    kept = np.isin(np.arange(n), rows.example)
    stats = {
        "rows_read": examples.rows_read,
        "skipped_bad_rows": dict(examples.bad_rows),
        "examples": n,
        "split_conversations": int(np.sum(np.unique(examples.source_rows, return_counts=True)[1] > 1)),
        "examples_kept": int(kept.sum()),
        "tokens": int(lengths.sum()),
        "truncated_examples": int((truncated & kept).sum()),
        "truncated_tokens": int((lengths - np.minimum(lengths, row_length))[truncated & kept].sum()),
        "dropped_no_trained_token": dropped,
        "dropped_unit": "fragments" if strategy == "bfd_split" else "examples",
        "dropped_tokens": dropped_tokens,
        "dropped_untrained_rows": untrained_rows,
        "row_tokens": rows.tokens,
        "trained_tokens": int(_trained_targets(examples, rows.example, rows.start, rows.stop).sum()),
        "rows": rows.num_rows,
        "row_length": row_length,
        "max_length": data.max_length,
        "packing": strategy or "none",
        "fill_rate": rows.tokens / max(1, rows.num_rows * row_length),
        "max_documents_per_row": int(np.diff(rows.row_ptr).max()) if rows.num_rows else 0,
    }
    return rows, row_length, stats


def prepare_dataset(config: SFTConfig, tokenizer, split: str = "train") -> PreparedDataset:
    """Rows of a split -> PreparedDataset (examples, rows, stats); see the module doc."""
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token: load it with jsft.data.load_tokenizer (sets one)")
    examples, cache, components = cached_examples(config, tokenizer, split)
    rows, row_length, stats = build_rows(examples, config.data, config.training.seed)
    stats = {"split": split, "cache": cache, **stats, **({"components": components} if components else {})}
    if rows.num_rows == 0:
        raise ConfigError(f"no {split} rows left after preparation:\n{format_stats(stats)}\nEvery example lost its "
                          "trained tokens or was skipped: raise data.max_length if examples are truncated, check the "
                          "loss settings (completion_only_loss / assistant_only_loss) and the skipped rows above")
    pad_to = None if config.data.packing else config.data.pad_to_multiple_of
    prepared = PreparedDataset(examples, rows, row_length, int(tokenizer.pad_token_id), stats, pad_to)
    if split == "train" and config.data.train_sampling_strategy == "group_by_length":
        prepared.buckets = buckets.choose_buckets(prepared.row_lengths, row_length, config.data.length_buckets)
        prepared.stats["length_buckets"] = buckets.padding_report(prepared.row_lengths, prepared.buckets, row_length)
    return prepared


def format_stats(stats: dict) -> str:
    """The preparation report, one fact a line."""
    s = stats
    if s.get("streamed"):  # jsft.data.streaming: nothing is read before training, so nothing is counted yet
        packed = (f"packed {s['packing']}: best fit over a buffer of {s['packing_buffer_size']:,} examples"
                  if s["packing"] != "none" else "one example each, truncated")
        shuffled = (f"shuffled by datasets (IterableDataset.shuffle, buffer {s['shuffle_buffer']:,} rows, seed "
                    f"{s['seed']}, reseeded each pass)" if s["shuffle_buffer"] else "not shuffled (stream order)")
        return "\n".join([
            f"data ({s['split']}, streamed from {s['source']}): rows are read, tokenized and packed while training "
            "runs; rows, examples and tokens are not known up front (nothing is cached)",
            f"  rows ({packed}) of {s['row_length']} slots; {shuffled}; the stream is read again as often as "
            "training.max_steps needs",
        ])
    lines = [
        f"data ({s.get('split', 'train')}, cache {s.get('cache', '-')}): {s['rows_read']:,} rows read, "
        f"{s['examples']:,} examples, {s['tokens']:,} tokens",
        f"  skipped bad rows: {sum(s['skipped_bad_rows'].values()):,}",
        *[f"    {count:,} x {reason}" for reason, count in s["skipped_bad_rows"].items()],
        *([f"  split conversations: {s['split_conversations']:,} (a turn the template renders differently once "
           "later turns follow is trained in a document of its own, as at inference; data.split_conversations)"]
          if s.get("split_conversations") else []),
        f"  truncated to {s['row_length']}: {s['truncated_examples']:,} examples, {s['truncated_tokens']:,} tokens"
        if s['truncated_examples'] or s.get('max_length') is not None else "  truncated: none (no max_length)",
        f"  dropped (no trained token after truncation): {s['dropped_no_trained_token']:,} {s['dropped_unit']}, "
        f"{s['dropped_tokens']:,} tokens",
        *([f"  dropped (wrapped rows with no trained token, cut from inside prompts): {s['dropped_untrained_rows']:,} "
           "rows"] if s.get("dropped_untrained_rows") else []),
        f"  rows ({'packed ' + s['packing'] if s['packing'] != 'none' else 'one example each'}): {s['rows']:,} rows "
        f"of {s['row_length']} slots, {s['row_tokens']:,} tokens, "
        f"{s['trained_tokens']:,} trained, fill {s['fill_rate']:.1%}, at most {s['max_documents_per_row']} "
        "documents a row",
    ]
    if "components" in s:
        lines.insert(1, f"  mixture of {len(s['components'])} datasets (data.datasets):")
        lines[2:2] = [f"    [{i}] {c['dataset']}: {c['rows']:,} rows, {c['kept']:,} kept (fraction), {c['in_split']:,} "
                      f"in {s.get('split', 'train')}" for i, c in enumerate(s["components"])]
    if "length_buckets" in s:
        b = s["length_buckets"]
        saved = 1 - b["padding_tokens"] / max(b["padding_tokens_at_max_length"], 1)
        lines.append(f"  length buckets (group_by_length): {b['buckets']} with {b['rows_per_bucket']} rows; padding "
                     f"{b['padding_tokens']:,} tokens instead of {b['padding_tokens_at_max_length']:,} at "
                     f"{s['row_length']} ({saved:.0%} less)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- batches


def assemble_rows(prepared: PreparedDataset, row_ids: np.ndarray, length: int | None = None) -> dict[str, np.ndarray]:
    """Rows -> {input_ids, segment_ids, positions, targets, loss_mask}, each [len(row_ids), L] (module doc example),
    L = length (at least the longest of these rows) or max_length. A row id of -1 gives an empty row: all padding,
    nothing trained."""
    rows, ex = prepared.rows, prepared.examples
    B, L = len(row_ids), length or prepared.max_length
    real = row_ids >= 0  # -1: an empty row (all padding), which fills a last partial step
    safe = np.where(real, row_ids, 0)
    first = rows.row_ptr[safe]
    count = np.where(real, rows.row_ptr[safe + 1] - first, 0)
    slot_row = np.repeat(np.arange(B), count)  # each slice: its batch row
    within = np.arange(len(slot_row)) - np.repeat(np.cumsum(count) - count, count)  # slice number inside its row
    slices = np.repeat(first, count) + within
    start, stop = rows.start[slices], rows.stop[slices]
    size = stop - start
    before = np.cumsum(size) - size  # tokens before each slice in the whole listing
    row_first = np.append(before, 0)[np.cumsum(count) - count]  # (empty rows point past the end)
    row_offset = before - np.repeat(row_first, count)  # tokens before each slice inside its own row
    tok_slice = np.repeat(np.arange(len(size)), size)
    pos = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
    src = ex.offsets[rows.example[slices]][tok_slice] + start[tok_slice] + pos
    r, c = slot_row[tok_slice], row_offset[tok_slice] + pos
    has_next = pos < size[tok_slice] - 1
    nxt = np.where(has_next, src + 1, src)  # a slice's last token has no target: read nothing past it

    out = {
        "input_ids": np.full((B, L), prepared.pad_id, np.int32),
        "segment_ids": np.zeros((B, L), np.int32),
        "positions": np.zeros((B, L), np.int32),
        "targets": np.full((B, L), prepared.pad_id, np.int32),
        "loss_mask": np.zeros((B, L), bool),
    }
    out["input_ids"][r, c] = ex.tokens[src]
    out["segment_ids"][r, c] = within[tok_slice] + 1
    out["positions"][r, c] = pos
    out["targets"][r, c] = np.where(has_next, ex.tokens[nxt], prepared.pad_id)
    out["loss_mask"][r, c] = has_next & ex.loss_mask[nxt]
    return out


def steps_per_epoch(prepared: PreparedDataset, global_rows_per_micro_batch: int, accum_steps: int,
                    drop_remainder: bool = True) -> int:
    """Optimizer steps in one epoch. drop_remainder: the rows of a last partial step are dropped
    (`dropped_rows_per_epoch`); else that step is completed with empty rows (eval: every row counted once)."""
    step_rows = global_rows_per_micro_batch * accum_steps
    if prepared.buckets is not None:  # each bucket's rows make their own steps
        counts = np.bincount(buckets.bucket_of(prepared.row_lengths, prepared.buckets))
        return int(sum(c // step_rows if drop_remainder else -(-c // step_rows) for c in counts))
    return prepared.num_rows // step_rows if drop_remainder else -(-prepared.num_rows // step_rows)


def dropped_rows_per_epoch(prepared: PreparedDataset, global_rows_per_micro_batch: int, accum_steps: int) -> int:
    return prepared.num_rows % (global_rows_per_micro_batch * accum_steps)


def _process_step(row_ids: np.ndarray, prepared: PreparedDataset, rows_per_micro_batch: int, accum_steps: int,
                  process_index: int, process_count: int) -> dict[str, np.ndarray]:
    step_rows = accum_steps * process_count * rows_per_micro_batch
    row_ids = np.concatenate([row_ids, np.full(step_rows - len(row_ids), -1, dtype=np.int64)])  # a short last step
    mine = row_ids.reshape(accum_steps, process_count, rows_per_micro_batch)[:, process_index].reshape(-1)
    length = prepared.step_length(row_ids)  # from the whole step's rows: every process gets the same shape
    batch = assemble_rows(prepared, mine, length)
    return {k: v.reshape(accum_steps, rows_per_micro_batch, length) for k, v in batch.items()}


def batch_dataset(prepared: PreparedDataset, rows_per_micro_batch: int, accum_steps: int, seed: int,
                  num_epochs: int | None = 1, shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                  drop_remainder: bool = True):
    """The grain.MapDataset of optimizer steps (see batch_iterator); len() is the number of steps when finite."""
    import grain

    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    step_rows = rows_per_micro_batch * process_count * accum_steps
    if steps_per_epoch(prepared, rows_per_micro_batch * process_count, accum_steps, drop_remainder) == 0:
        raise ValueError(
            f"{prepared.num_rows} rows cannot fill one optimizer step of {step_rows} rows (rows_per_micro_batch "
            f"{rows_per_micro_batch} x processes {process_count} x accum_steps {accum_steps}): lower the batch size"
        )
    if prepared.buckets is not None:
        ds = _bucketed_steps(prepared, step_rows, seed, num_epochs, shuffle, drop_remainder)
    else:
        ds = grain.MapDataset.range(prepared.num_rows)
        if shuffle:
            ds = ds.shuffle(seed=seed % 2**32)
        ds = ds.batch(step_rows, drop_remainder=drop_remainder).repeat(num_epochs)
    return ds.map(partial(_process_step, prepared=prepared, rows_per_micro_batch=rows_per_micro_batch,
                          accum_steps=accum_steps, process_index=process_index, process_count=process_count))


def _bucketed_steps(prepared: PreparedDataset, step_rows: int, seed: int, num_epochs, shuffle: bool,
                    drop_remainder: bool):
    """A grain.MapDataset of steps' row ids, each step from one length bucket, reshuffled every epoch."""
    import grain

    row_buckets = buckets.bucket_of(prepared.row_lengths, prepared.buckets)
    epoch_steps = steps_per_epoch(prepared, step_rows, 1, drop_remainder)

    @functools.lru_cache(maxsize=2)
    def plan(epoch: int) -> np.ndarray:
        return buckets.bucketed_steps(row_buckets, step_rows, seed, epoch, shuffle, drop_remainder)

    ds = grain.MapDataset.range(epoch_steps).repeat(num_epochs)
    return ds.map_with_index(lambda index, _: plan(index // epoch_steps)[index % epoch_steps])


def batch_iterator(prepared: PreparedDataset, rows_per_micro_batch: int, accum_steps: int, seed: int,
                   num_epochs: int | None = 1, shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                   prefetch: int = 2, drop_remainder: bool = True):
    """A checkpointable Grain DatasetIterator of optimizer steps: {key: [accum_steps, rows_per_micro_batch, L]}.

    `it.get_state()` / `it.set_state(state)` save and restore the position; one background thread assembles up to
    `prefetch` steps ahead (0: none). drop_remainder=False (eval): each epoch's last partial step is completed with
    empty rows (all padding, nothing trained) instead of dropped.
    """
    import grain

    ds = batch_dataset(prepared, rows_per_micro_batch, accum_steps, seed, num_epochs, shuffle, process_index,
                       process_count, drop_remainder)
    options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))
