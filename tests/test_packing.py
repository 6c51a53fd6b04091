"""Packing: rows never overflow, every kept token appears exactly once, and BFD is TRL's BFD, done globally."""

import doctest
import json
import time

import numpy as np
import pytest

from jsft.data import packing
from jsft.data.packing import pack, pack_arrays, pack_stream

STRATEGIES = ("bfd", "bfd_split", "wrapped", "bfd_stream")


def long_tail(n, seed=0, high=2000):
    rng = np.random.default_rng(seed)
    return np.minimum(np.exp(rng.uniform(0.5, 7.0, n)).astype(np.int64), high)


def fill(packed, max_length):
    return packed.tokens / (packed.num_rows * max_length)


def row_tokens(row):
    """(example, token position) of every token of one row, in row order."""
    return [(ex, t) for ex, start, stop in row for t in range(start, stop)]


@pytest.fixture(scope="module")
def chat_lengths(tokenizer, data_dir):
    """Token counts of the fixture's 2,000 messages rows, rendered by the fixture tokenizer's chat template."""
    rows = [json.loads(line) for line in open(data_dir / "messages.jsonl")]
    texts = tokenizer.apply_chat_template([r["messages"] for r in rows], tokenize=False)
    return np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])


def trl_pack(lengths, max_length, strategy):
    """TRL's pack_dataset (default map batch of 1,000) on token ids that name themselves: example i, token k is
    i * 100_000 + k. Returns rows as lists of documents, each a list of (example, token position)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    ids = [[i * 100_000 + k for k in range(n)] for i, n in enumerate(lengths)]
    packed = pack_dataset(Dataset.from_dict({"input_ids": ids}), max_length, strategy)
    rows = []
    for row in packed:
        tokens = [(t // 100_000, t % 100_000) for t in row["input_ids"]]
        bounds = np.cumsum([0] + list(row.get("seq_lengths") or [len(tokens)]))
        rows.append([tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    return rows


def as_documents(rows):
    return [[row_tokens([piece]) for piece in row] for row in rows]


def test_docstring_examples_hold():
    assert doctest.testmod(packing).failed == 0


def test_trl_example_rows_by_length():
    lengths = [2, 7, 3, 9, 1, 5]
    rows = pack(lengths, 10, "bfd")
    assert [[stop - start for _, start, stop in row] for row in rows] == [[9, 1], [7, 3], [5, 2]]
    assert as_documents(rows) == trl_pack(lengths, 10, "bfd")


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split"])
def test_bfd_equals_trl_inside_one_map_batch(strategy):
    """Under 1,000 examples TRL packs in one batch: identical rows, identical document order inside each row."""
    lengths = long_tail(700, seed=1, high=300)  # many ties, some overlong
    assert as_documents(pack(lengths, 128, strategy)) == trl_pack(lengths, 128, strategy)


def test_wrapped_has_trl_rows_with_documents_marked():
    """The same tokens in the same rows as TRL's wrapped; jsft also cuts each row where the document changes."""
    lengths = long_tail(300, seed=2, high=400)
    ours = pack(lengths, 100, "wrapped")
    theirs = trl_pack(lengths, 100, "wrapped")
    assert [row_tokens(row) for row in ours] == [docs[0] for docs in theirs]
    for row in ours:  # each slice is one document's run: a new slice starts exactly where the example changes
        assert all(a[0] != b[0] for a, b in zip(row, row[1:]))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_row_overflows_and_every_kept_token_appears_once(strategy):
    lengths = np.concatenate([long_tail(3000, seed=3, high=700), [0, 256, 257, 1]])
    max_length = 256
    rows = pack(lengths, max_length, strategy, buffer_size=100)
    assert all(0 < sum(stop - start for _, start, stop in row) <= max_length for row in rows)
    assert all(stop > start for row in rows for _, start, stop in row)
    placed = [tok for row in rows for tok in row_tokens(row)]
    assert len(placed) == len(set(placed))
    keep = (lambda n: min(n, max_length)) if strategy in ("bfd", "bfd_stream") else (lambda n: n)
    assert set(placed) == {(i, t) for i, n in enumerate(lengths.tolist()) for t in range(keep(n))}


def test_bfd_orders_documents_longest_first():
    for row in pack(long_tail(2000, seed=4, high=500), 512, "bfd"):
        sizes = [stop - start for _, start, stop in row]
        assert sizes == sorted(sizes, reverse=True)


def test_bfd_split_fragments_are_max_length_pieces_from_zero():
    (row0,), (row1,), (frag, short) = pack([12, 3], 5, "bfd_split")
    assert (row0, row1, frag, short) == ((0, 0, 5), (0, 5, 10), (1, 0, 3), (0, 10, 12))


def test_global_bfd_fills_at_least_as_well_as_trl_on_the_chat_fixture(chat_lengths):
    ours = pack_arrays(chat_lengths, 512, "bfd")
    theirs = trl_pack(chat_lengths.tolist(), 512, "bfd")
    trl_fill = sum(len(d) for row in theirs for d in row) / (len(theirs) * 512)
    print(f"\nchat fixture at 512: jsft bfd {ours.num_rows} rows fill {fill(ours, 512):.4f}; "
          f"TRL bfd {len(theirs)} rows fill {trl_fill:.4f}")
    assert ours.tokens == sum(len(d) for row in theirs for d in row)  # the same truncation
    assert fill(ours, 512) >= trl_fill
    assert ours.num_rows <= len(theirs)


def test_global_bfd_pairs_across_trls_1000_row_chunks():
    """1,000 examples of 300 tokens then 1,000 of 200: TRL's chunks cannot pair them (1,500 rows), global BFD does."""
    lengths = [300] * 1000 + [200] * 1000
    assert len(trl_pack(lengths, 512, "bfd")) == 1500
    packed = pack_arrays(lengths, 512, "bfd")
    assert packed.num_rows == 1000 and (packed.row_lengths() == 500).all()


def test_bfd_stream_within_one_point_of_global_bfd(chat_lengths):
    bfd = fill(pack_arrays(chat_lengths, 512, "bfd"), 512)
    for buffer_size in (64, 256, 10_000):
        stream = fill(pack_arrays(chat_lengths, 512, "bfd_stream", buffer_size=buffer_size), 512)
        print(f"\nbfd_stream buffer {buffer_size}: fill {stream:.4f} (global bfd {bfd:.4f})")
        assert stream >= bfd - 0.01
    # with a buffer that holds the whole dataset the stream is global BFD: the same rows
    rows = sorted(sorted(r) for r in pack(chat_lengths, 512, "bfd_stream", buffer_size=len(chat_lengths)))
    assert rows == sorted(sorted(r) for r in pack(chat_lengths, 512, "bfd"))


def test_bfd_stream_is_lazy_and_bounded():
    """Rows come out before the stream ends; the generator never needs the whole input."""
    def lengths():
        yield from long_tail(5000, seed=5, high=600).tolist()
        raise AssertionError("read past the first rows")

    stream = pack_stream(lengths(), 512, buffer_size=100)
    first = [next(stream) for _ in range(10)]
    assert all(sum(b - a for _, a, b in row) <= 512 for row in first)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown packing strategy 'best'"):
        pack([1, 2], 4, "best")
    with pytest.raises(ValueError, match="negative length at example 1"):
        pack([1, -2], 4)


@pytest.mark.slow
def test_one_million_examples_pack_in_seconds():
    lengths = long_tail(1_000_000, seed=6)
    for strategy in ("bfd", "bfd_split", "wrapped"):
        start = time.perf_counter()
        packed = pack_arrays(lengths, 512, strategy)
        seconds = time.perf_counter() - start
        print(f"\n1M examples {strategy}: {seconds:.2f} s, {packed.num_rows} rows, fill {fill(packed, 512):.4f}")
        assert seconds < 30
