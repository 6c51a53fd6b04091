"""The token store (jsft.data.store): written chunk by chunk, complete or absent, memory-mapped, read per process."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest

from jsft.config import SFTConfig
from jsft.data import pipeline, sources, store, tokenize
from jsft.data.pipeline import batch_iterator, prepare_dataset

WORKER = Path(__file__).with_name("store_worker.py")
REPO = Path(__file__).resolve().parents[1]
ARRAYS = ("tokens", "loss_mask", "offsets", "source_rows")


def make_config(tmp_path, data_file, cache_dir, **data):
    config = SFTConfig()
    config.data.dataset_name = str(data_file)
    config.data.cache_dir = str(cache_dir)
    config.data.max_length, config.data.packing, config.data.assistant_only_loss = 256, True, True
    for k, v in data.items():
        setattr(config.data, k, v)
    config.logging.output_dir = str(tmp_path / "out")
    return config


@pytest.fixture(scope="module")
def rows(tmp_path_factory, data_dir):
    """300 fixture chat rows, one of them bad (skipped and counted)."""
    lines = open(data_dir / "messages.jsonl").readlines()[:300]
    lines[100] = json.dumps({"messages": "not a list"}) + "\n"
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory, rows):
    """(config, store cache directory) shared by the tests that only read the store."""
    tmp = tmp_path_factory.mktemp("shared")
    return tmp, tmp / "cache"


@pytest.fixture(scope="module")
def memory(shared, rows, tok):
    """The examples in memory (the path before the store)."""
    return in_memory(make_config(shared[0], rows, shared[1], skip_bad_rows=True), tok)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from jsft.data import load_tokenizer

    return load_tokenizer(tokenizer_dir, SFTConfig().data)[0]


def in_memory(config, tokenizer):
    """The examples as the pipeline held them before the store: tokenized into memory, whole."""
    dataset = sources.load_rows(config.data)
    return tokenize.tokenize_rows(dataset, tokenizer, config.data)


def store_dir(config):
    (path,) = Path(config.data.cache_dir).glob("__examples-train-*")
    return path


def test_a_store_written_chunk_by_chunk_equals_the_examples_in_memory(tmp_path, rows, tok, monkeypatch):
    monkeypatch.setattr(tokenize, "PREPARE_CHUNK_ROWS", 25)  # 12 chunks appended one by one
    config = make_config(tmp_path, rows, tmp_path / "cache", skip_bad_rows=True)
    appended = []
    append = store.StoreWriter.append
    monkeypatch.setattr(store.StoreWriter, "append", lambda self, t, m: (appended.append(len(t)), append(self, t, m)))
    prepared = prepare_dataset(config, tok)
    assert prepared.stats["cache"] == "miss" and len(appended) == 12
    ex, mem = prepared.examples, in_memory(config, tok)
    assert isinstance(ex.tokens, np.memmap) and isinstance(ex.loss_mask, np.memmap)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(ex, name), getattr(mem, name), err_msg=name)
    assert (ex.rows_read, ex.bad_rows) == (mem.rows_read, mem.bad_rows)
    assert ex.rows_read == 300 and sum(ex.bad_rows.values()) == 1
    assert sum(appended) == len(ex.tokens) == ex.offsets[-1] > 50_000
    path = store_dir(config)
    assert sorted(p.name for p in path.iterdir()) == sorted(f"{n}.npy" for n in (*ARRAYS, "meta"))
    assert not list(path.parent.glob(".*"))  # the temporary directory was renamed into place
    assert prepare_dataset(config, tok).stats["cache"] == "hit"


def test_trained_targets_read_in_pieces_equal_one_pass(rows, tok, shared, monkeypatch):
    ex = prepare_dataset(make_config(*shared[:1], rows, shared[1], skip_bad_rows=True), tok).examples
    rng = np.random.default_rng(0)
    example = rng.integers(0, len(ex.offsets) - 1, 5000)
    length = np.diff(ex.offsets)[example]
    start = rng.integers(0, np.maximum(length, 1))
    stop = np.minimum(start + rng.integers(0, 80, 5000), length)
    cum = np.concatenate([[0], np.cumsum(np.asarray(ex.loss_mask), dtype=np.int64)])  # the one-pass formula
    base = ex.offsets[example]
    expected = cum[base + stop] - cum[np.minimum(base + start + 1, base + stop)]
    assert (np.diff(ex.offsets) > 300).sum() > 3
    monkeypatch.setattr(store, "READ_CHUNK", 300)  # many pieces, several examples longer than one
    np.testing.assert_array_equal(pipeline._trained_targets(ex, example, start, stop), expected)


STRATEGIES = [dict(packing_strategy="bfd"), dict(packing_strategy="bfd_split", max_length=128),
              dict(packing_strategy="wrapped"), dict(packing_strategy="bfd_stream", packing_buffer_size=50),
              dict(packing=False), dict(packing=False, pad_to_multiple_of=64),
              dict(packing=False, train_sampling_strategy="group_by_length", length_buckets=3)]


@pytest.mark.parametrize("settings", STRATEGIES, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_batches_from_the_store_are_the_batches_from_memory(rows, tok, shared, memory, settings, monkeypatch):
    config = make_config(shared[0], rows, shared[1], skip_bad_rows=True, **settings)
    from_store = prepare_dataset(config, tok)
    monkeypatch.setattr(pipeline, "cached_examples", lambda *a: (memory, "hit", None))
    from_memory = prepare_dataset(config, tok)
    assert isinstance(from_store.examples.tokens, np.memmap) and not isinstance(from_memory.examples.tokens, np.memmap)
    assert {k: v for k, v in from_store.stats.items() if k != "cache"} == \
        {k: v for k, v in from_memory.stats.items() if k != "cache"}
    args = dict(rows_per_micro_batch=4, accum_steps=2, seed=3, num_epochs=2, drop_remainder=False, prefetch=0)
    steps = 0
    for a, b in zip(batch_iterator(from_store, **args), batch_iterator(from_memory, **args), strict=True):
        for key in pipeline.BATCH_KEYS:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        steps += 1
    assert steps == 2 * pipeline.steps_per_epoch(from_store, 4, 2, drop_remainder=False)


def test_a_reopened_store_resumes_mid_epoch_with_the_identical_next_batches(shared, rows, tok):
    config = make_config(shared[0], rows, shared[1], skip_bad_rows=True)
    first = prepare_dataset(config, tok)
    args = dict(rows_per_micro_batch=2, accum_steps=2, seed=7, num_epochs=None, prefetch=2)
    it = batch_iterator(first, **args)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    again = prepare_dataset(config, tok)  # a new run: the store opened again, nothing tokenized
    assert again.stats["cache"] == "hit" and again.examples.tokens is not first.examples.tokens
    resumed = batch_iterator(again, **args)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_a_store_from_an_interrupted_write_is_not_used(tmp_path, rows, tok, memory, monkeypatch):
    config = make_config(tmp_path, rows, tmp_path / "cache", skip_bad_rows=True)
    append, calls = store.StoreWriter.append, []

    def append_then_stop(self, tokens, mask):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is stopped while writing
        append(self, tokens, mask)

    monkeypatch.setattr(store.StoreWriter, "append", append_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(config, tok)
    assert not list((tmp_path / "cache").iterdir())  # no store, no temporary directory
    monkeypatch.setattr(store.StoreWriter, "append", append)

    # a killed run (no cleanup) leaves its temporary directory, half written: never read, removed by the next write
    killed = store.StoreWriter(store.store_path(tmp_path / "cache", "train", "0123"))
    killed.append(np.arange(10, dtype=np.int32), np.ones(10, bool))
    mem = memory
    path = store.store_path(config.data.cache_dir, "train", "x" * 20)
    half = store.StoreWriter(path)
    half.append(mem.tokens[:1000], mem.loss_mask[:1000])
    dead = half.tmp.with_name(half.tmp.name.replace(f".{os.getpid()}.", ".4194305."))  # above any pid_max
    half.tmp.rename(dead)
    monkeypatch.setattr(pipeline, "cache_key", lambda *a: "x" * 20)
    prepared = prepare_dataset(config, tok)
    assert prepared.stats["cache"] == "miss" and not dead.exists() and killed.tmp.exists()  # a live writer's stays
    np.testing.assert_array_equal(prepared.examples.tokens, mem.tokens)


@pytest.mark.parametrize("damage", ["truncated tokens", "no meta", "offsets disagree"])
def test_a_damaged_store_is_warned_about_removed_and_rebuilt(tmp_path, rows, tok, damage):
    config = make_config(tmp_path, rows, tmp_path / "cache", skip_bad_rows=True)
    first = prepare_dataset(config, tok)
    tokens_before = np.array(first.examples.tokens)  # (a mapped file cut short faults on reading: copy it first)
    path = store_dir(config)
    if damage == "truncated tokens":
        tokens = path / "tokens.npy"
        tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2])
    elif damage == "no meta":
        (path / "meta.npy").unlink()
    else:
        np.save(path / "offsets.npy", first.examples.offsets[:-1])
    with pytest.warns(UserWarning, match=rf"token cache {path} is unreadable \(.*\): removing it and tokenizing again"):
        again = prepare_dataset(config, tok)
    assert again.stats["cache"] == "miss"
    np.testing.assert_array_equal(again.examples.tokens, tokens_before)
    assert prepare_dataset(config, tok).stats["cache"] == "hit"


class Recording:
    """An array that records which indices are read (the token store's reads, seen from the pipeline)."""

    def __init__(self, array, reads):
        self.array, self.reads = array, reads

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        self.reads.append(np.arange(len(self.array))[index])
        return self.array[index]


def tokens_read(prepared, process_index, process_count, **args):
    """The store's token indices the batches of this process read (tokens and mask)."""
    reads = []
    ex = prepared.examples
    recording = dataclasses.replace(ex, tokens=Recording(ex.tokens, reads), loss_mask=Recording(ex.loss_mask, reads))
    for _ in batch_iterator(dataclasses.replace(prepared, examples=recording), process_index=process_index,
                            process_count=process_count, prefetch=0, **args):
        pass
    return np.unique(np.concatenate(reads))


def trained_rows_tokens(prepared, row_ids):
    """The store's token indices of these rows' slices."""
    rows, offsets = prepared.rows, prepared.examples.offsets
    slices = np.concatenate([np.arange(rows.row_ptr[r], rows.row_ptr[r + 1]) for r in row_ids])
    return np.unique(np.concatenate([np.arange(offsets[rows.example[s]] + rows.start[s],
                                               offsets[rows.example[s]] + rows.stop[s]) for s in slices]))


def test_each_process_reads_only_the_rows_it_trains(shared, rows, tok):
    config = make_config(shared[0], rows, shared[1], skip_bad_rows=True)
    prepared = prepare_dataset(config, tok)
    args = dict(rows_per_micro_batch=2, accum_steps=2, seed=0, num_epochs=1, drop_remainder=True)
    read = [tokens_read(prepared, p, 2, **args) for p in (0, 1)]
    trained_count = 8 * pipeline.steps_per_epoch(prepared, 4, 2)  # rows trained in the epoch by both processes
    order = shuffled_rows(prepared)
    trained = order[:trained_count].reshape(-1, 2, 2, 2)  # [step, accum, process, row]
    assert len(np.intersect1d(read[0], read[1])) == 0
    for p in (0, 1):
        np.testing.assert_array_equal(read[p], trained_rows_tokens(prepared, trained[:, :, p].reshape(-1)))
    union = np.union1d(read[0], read[1])
    np.testing.assert_array_equal(union, trained_rows_tokens(prepared, order[:trained_count]))
    assert len(union) < len(prepared.examples.tokens)  # the dropped last rows were never read


def shuffled_rows(prepared, seed=0):
    """The first epoch's row order of batch_iterator (Grain's index shuffle)."""
    return np.asarray(list(grain.MapDataset.range(prepared.num_rows).shuffle(seed=seed)))


def load_worker():
    spec = importlib.util.spec_from_file_location("store_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_processes_share_one_store_and_read_disjoint_parts(tmp_path, rows, tokenizer_dir):
    """Two processes (as two hosts would) prepare the same split at once into one cache directory and train their
    halves: one store ends up on disk, and their reads are disjoint and cover the trained rows."""
    config = {"rows": str(rows), "cache": str(tmp_path / "cache"), "tokenizer": str(tokenizer_dir)}
    procs = [subprocess.Popen([sys.executable, str(WORKER), json.dumps(config), str(p), "2", str(tmp_path / f"{p}.npy")],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for p in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    read = [np.load(tmp_path / f"{p}.npy") for p in (0, 1)]
    assert len(read[0]) > 0 and len(read[1]) > 0 and len(np.intersect1d(read[0], read[1])) == 0
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [store_dir_name(tmp_path / "cache")]  # no temp left
    worker = load_worker()
    prepared = worker.prepare(config)
    assert prepared.stats["cache"] == "hit"
    b, accum = worker.ARGS["rows_per_micro_batch"], worker.ARGS["accum_steps"]
    trained = b * 2 * accum * pipeline.steps_per_epoch(prepared, b * 2, accum)
    np.testing.assert_array_equal(np.union1d(*read), trained_rows_tokens(prepared, shuffled_rows(prepared)[:trained]))


def store_dir_name(cache):
    (path,) = cache.glob("__examples-train-*")
    return path.name


def test_a_cache_dir_inside_a_data_directory_is_not_read_as_data(tmp_path, rows, tok):
    """datasets reads a directory's `*-train-*/` subdirectories as the train split, but skips `__` directories: a
    store inside the data directory is neither read as rows nor counted in the data's fingerprint, so it hits."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text(rows.read_text())
    config = make_config(tmp_path, folder, folder / "cache", skip_bad_rows=True)
    first = prepare_dataset(config, tok)
    assert first.stats["cache"] == "miss" and list((folder / "cache").glob("__examples-train-*"))
    again = prepare_dataset(config, tok)
    assert again.stats["cache"] == "hit" and again.stats["rows_read"] == first.stats["rows_read"]
    np.testing.assert_array_equal(np.asarray(again.examples.tokens), np.asarray(first.examples.tokens))
