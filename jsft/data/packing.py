"""Packing: document lengths -> rows of at most `max_length` tokens. Pure numpy, no JAX.

A row is a list of slices `(example_index, start, stop)`; each slice is one *document* of the row: it gets its own
segment id, its positions restart at 0, and it never attends to another slice (see jsft/data/pipeline.py).

Strategies (TRL's names, `trl.data_utils.pack_dataset`):

- `bfd`: best-fit decreasing over the WHOLE dataset (TRL packs each 1,000-row `map` batch on its own). Examples are
  taken longest first (a stable sort: ties keep dataset order); each goes into the open row with the least room that
  still fits it (ties: the row that reached that room first), else a new row. Overlong examples keep their first
  `max_length` tokens; the rest is dropped (count it with `Packed.tokens`). Inside a row, documents come longest first.

      >>> pack([2, 7, 3, 9, 1, 5], max_length=10, strategy="bfd")   # rows of lengths [9, 1], [7, 3], [5, 2]
      [[(3, 0, 9), (4, 0, 1)], [(1, 0, 7), (2, 0, 3)], [(5, 0, 5), (0, 0, 2)]]

- `bfd_split`: overlong examples are cut into fragments of `max_length` (the last one shorter); every fragment is an
  independent document (positions restart at 0), then all are packed by BFD. No token is dropped.

      >>> pack([12, 3], max_length=5, strategy="bfd_split")
      [[(0, 0, 5)], [(0, 5, 10)], [(1, 0, 3), (0, 10, 12)]]

- `wrapped`: concatenate all examples in order and cut every `max_length` tokens (only the last row is short). Unlike
  TRL, where wrapped rows attend across document boundaries, in jsft each piece of a document is its own segment:
  a document cut by a row boundary continues in the next row as a new document with positions from 0, and no
  document ever sees another. Fill is TRL's; attention is document-exact.

      >>> pack([3, 4, 2], max_length=4, strategy="wrapped")
      [[(0, 0, 3), (1, 0, 1)], [(1, 1, 4), (2, 0, 1)], [(2, 1, 2)]]

- `bfd_stream` (`pack_stream`): best fit with a bounded buffer, for data that arrives as a stream. See `pack_stream`.

Examples of length 0 are skipped. `pack` returns Python lists; `pack_arrays` returns the same rows as flat numpy
arrays (`Packed`), which is what the pipeline uses (1M examples pack in about a second).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

STRATEGIES = ("bfd", "bfd_split", "wrapped", "bfd_stream")


@dataclass(frozen=True)
class Packed:
    """Rows as flat arrays: row r holds slices k in [row_ptr[r], row_ptr[r+1]) = (example[k], start[k], stop[k])."""

    row_ptr: np.ndarray  # int64 [num_rows + 1]
    example: np.ndarray  # int64 [num_slices]
    start: np.ndarray  # int64 [num_slices]
    stop: np.ndarray  # int64 [num_slices]

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1

    @property
    def tokens(self) -> int:
        """Tokens placed in rows (the dataset's tokens minus those dropped by `bfd` truncation)."""
        return int((self.stop - self.start).sum())

    def row_lengths(self) -> np.ndarray:
        return np.add.reduceat(self.stop - self.start, self.row_ptr[:-1]) if self.num_rows else np.zeros(0, np.int64)

    def select_rows(self, keep: np.ndarray) -> Packed:
        """The rows where `keep` (bool [num_rows]) is True, in order."""
        counts = np.diff(self.row_ptr)
        slices = np.repeat(keep, counts)
        row_ptr = np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64)
        return Packed(row_ptr, self.example[slices], self.start[slices], self.stop[slices])

    def to_lists(self) -> list[list[tuple[int, int, int]]]:
        slices = list(zip(self.example.tolist(), self.start.tolist(), self.stop.tolist()))
        ptr = self.row_ptr.tolist()
        return [slices[ptr[r] : ptr[r + 1]] for r in range(len(ptr) - 1)]

    @staticmethod
    def from_lists(rows: list[list[tuple[int, int, int]]]) -> Packed:
        flat = np.array([s for row in rows for s in row], dtype=np.int64).reshape(-1, 3)
        row_ptr = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int64)
        return Packed(row_ptr, flat[:, 0].copy(), flat[:, 1].copy(), flat[:, 2].copy())


def pack(lengths, max_length: int, strategy: str = "bfd", buffer_size: int = 10_000) -> list[list[tuple]]:
    """lengths[i] = tokens of example i -> rows, each a list of (example_index, start, stop). See the module doc."""
    return pack_arrays(lengths, max_length, strategy, buffer_size).to_lists()


def pack_arrays(lengths, max_length: int, strategy: str = "bfd", buffer_size: int = 10_000) -> Packed:
    """`pack`, returning flat arrays (`Packed`)."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if max_length < 1:
        raise ValueError(f"max_length={max_length}: must be >= 1")
    if (lengths < 0).any():
        raise ValueError(f"negative length at example {int(np.argmax(lengths < 0))}")
    if strategy == "bfd":
        idx = np.flatnonzero(lengths > 0)
        return _bfd(idx, np.zeros_like(idx), np.minimum(lengths[idx], max_length), max_length)
    if strategy == "bfd_split":
        example, start, stop = split_overlong(lengths, max_length)
        return _bfd(example, start, stop, max_length)
    if strategy == "wrapped":
        return _wrapped(lengths, max_length)
    if strategy == "bfd_stream":
        return Packed.from_lists(list(pack_stream(lengths.tolist(), max_length, buffer_size)))
    raise ValueError(f"unknown packing strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")


def pack_slices(example, start, stop, max_length: int, strategy: str = "bfd", buffer_size: int = 10_000) -> Packed:
    """`pack_arrays` over slices of examples (each slice packed as if it were a whole example of stop - start tokens).

        >>> pack_slices(np.array([7, 9]), np.array([10, 0]), np.array([13, 2]), 4).to_lists()
        [[(7, 10, 13)], [(9, 0, 2)]]
    """
    example, start, stop = (np.asarray(a, dtype=np.int64) for a in (example, start, stop))
    packed = pack_arrays(stop - start, max_length, strategy, buffer_size)
    return Packed(packed.row_ptr, example[packed.example], start[packed.example] + packed.start,
                  start[packed.example] + packed.stop)


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Bin of each item (bins numbered in order of creation), by TRL's best-fit decreasing with its tie rules.

    Items go longest first (stable); each takes the bin with the smallest remaining room >= its size, the oldest such
    bin on ties, else opens a new bin. The set of rooms in use is one Python int used as a bitset, so "smallest room
    >= size" is a shift and a lowest-set-bit, O(capacity / 64) machine words in C per item.

        >>> best_fit_decreasing(np.array([2, 7, 3, 9, 1, 5]), 10).tolist()   # rows 0:[9,1] 1:[7,3] 2:[5,2]
        [2, 1, 1, 0, 0, 2]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) and (sizes.min() < 1 or sizes.max() > capacity):
        raise ValueError(f"item sizes must be in [1, {capacity}]")
    order = np.argsort(-sizes, kind="stable")
    bins = np.empty(len(sizes), dtype=np.int64)
    queues = [deque() for _ in range(capacity + 1)]  # room -> bins with exactly that room, oldest first
    rooms = 1 << capacity  # bit r set <=> some bin has room r; bit `capacity` (a new bin) is always set
    num_bins = 0
    out = []
    for size in sizes[order].tolist():
        above = rooms >> size
        room = size + (above & -above).bit_length() - 1  # the smallest room >= size
        if room == capacity:
            b = num_bins
            num_bins += 1
        else:
            q = queues[room]
            b = q.popleft()
            if not q:
                rooms ^= 1 << room
        out.append(b)
        left = room - size
        if left:
            q = queues[left]
            if not q:
                rooms |= 1 << left
            q.append(b)
    bins[order] = out
    return bins


def _bfd(example: np.ndarray, start: np.ndarray, stop: np.ndarray, max_length: int) -> Packed:
    """Pack slices by BFD; inside a row, slices come in BFD order (longest first)."""
    bins = best_fit_decreasing(stop - start, max_length)
    order = np.argsort(-(stop - start), kind="stable")
    order = order[np.argsort(bins[order], kind="stable")]  # by row, then longest first
    counts = np.bincount(bins, minlength=0) if len(bins) else np.zeros(0, np.int64)
    row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Packed(row_ptr, example[order], start[order], stop[order])


def split_overlong(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut each example into pieces of max_length (the last shorter), in dataset order: TRL's `bfd_split`.

        >>> [a.tolist() for a in split_overlong(np.array([5, 2]), 2)]   # (example, start, stop) of each piece
        [[0, 0, 0, 1], [0, 2, 4, 0], [2, 4, 5, 2]]
    """
    count = -(-lengths // max_length)  # ceil; 0 for empty examples
    example = np.repeat(np.arange(len(lengths), dtype=np.int64), count)
    first = np.repeat(np.cumsum(count) - count, count)
    start = (np.arange(len(example), dtype=np.int64) - first) * max_length
    stop = np.minimum(start + max_length, lengths[example])
    return example, start, stop


def _wrapped(lengths: np.ndarray, max_length: int) -> Packed:
    """Concatenate all examples and cut every max_length; a slice ends at a document end or a row end."""
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    cuts = np.union1d(ends - lengths, np.arange(0, total, max_length))  # every slice start
    cuts = cuts[cuts < total]
    stops = np.append(cuts[1:], total)
    example = np.searchsorted(ends, cuts, side="right")  # the example whose span holds the token at `cut`
    offset = ends[example] - lengths[example]
    row = cuts // max_length
    row_ptr = np.searchsorted(row, np.arange(-(-total // max_length) + 1))
    return Packed(row_ptr.astype(np.int64), example.astype(np.int64), cuts - offset, stops - offset)


def pack_stream(lengths: Iterable[int], max_length: int, buffer_size: int = 10_000) -> Iterator[list[tuple]]:
    """Streaming best fit (`bfd_stream`): yields rows while reading lengths, holding at most `buffer_size` pending
    examples and `buffer_size` open rows. Overlong examples keep their first max_length tokens (like `bfd`).

    The buffer is a max-heap: once full, each new example pushes the longest pending one out into the best-fitting open
    row (least room that fits; else a new row). Long examples therefore open rows early and the short ones that pile
    up in the buffer fill the gaps later. A row is yielded when it is exactly full or, when more than `buffer_size`
    rows are open, the fullest open row is yielded. At the end the buffer drains longest first: with a buffer as large
    as the dataset this is exactly `bfd` (the same rows, yielded in another order). The work is `StreamPacker`'s.

        >>> list(pack_stream([2, 7, 3, 9, 1, 5], max_length=10, buffer_size=2))
        [[(1, 0, 7), (2, 0, 3)], [(3, 0, 9), (4, 0, 1)], [(5, 0, 5), (0, 0, 2)]]
    """
    packer = StreamPacker(max_length, buffer_size)
    for index, length in enumerate(lengths):
        if int(length) < 0:
            raise ValueError(f"negative length at example {index}")
        yield from packer.push(index, int(length))
    yield from packer.finish()


class StreamPacker:
    """`pack_stream`'s best fit as an object whose whole state is small and JSON-able (`state()` / `from_state`), so
    a streaming pipeline can checkpoint it between rows (jsft.data.streaming). Items are (index, length); a row is a
    list of (index, 0, length). `push` returns the rows it closes (at most one), `finish` the rest.

        >>> packer = StreamPacker(max_length=10, buffer_size=2)
        >>> [packer.push(i, n) for i, n in enumerate([2, 7, 3])]
        [[], [], []]
        >>> StreamPacker.from_state(packer.state()).finish()   # a restored packer goes on the same way
        [[(1, 0, 7), (2, 0, 3)], [(0, 0, 2)]]
    """

    def __init__(self, max_length: int, buffer_size: int = 10_000):
        if max_length < 1 or buffer_size < 1:
            raise ValueError(f"max_length={max_length}, buffer_size={buffer_size}: both must be >= 1")
        self.max_length, self.buffer_size = max_length, buffer_size
        self.pending: list[tuple[int, int]] = []  # heap of (-length, index)
        self.rows: dict[int, list[tuple]] = {}  # open row id -> its slices
        self.queues = [deque() for _ in range(max_length + 1)]  # room -> open rows with that room, oldest first
        self.rooms = 1 << max_length  # bitset of rooms in use; bit max_length = "a new row", always set
        self.next_row = 0

    def push(self, index: int, length: int) -> list[list[tuple]]:
        """Add item `index` of `length` tokens (cut to max_length; 0: skipped); the rows this closes."""
        length = min(int(length), self.max_length)
        if length <= 0:
            return []
        heapq.heappush(self.pending, (-length, index))
        if len(self.pending) <= self.buffer_size:
            return []
        negative, i = heapq.heappop(self.pending)
        row = self._place(-negative, i)
        return [] if row is None else [row]

    def finish(self) -> list[list[tuple]]:
        """Drain the buffer longest first, then every open row (oldest first); the packer is empty after."""
        out = []
        while self.pending:
            negative, i = heapq.heappop(self.pending)
            row = self._place(-negative, i)
            if row is not None:
                out.append(row)
        out.extend(self.rows[r] for r in sorted(self.rows))
        self.rows.clear()
        self.queues = [deque() for _ in range(self.max_length + 1)]
        self.rooms = 1 << self.max_length
        return out

    def items(self) -> list[int]:
        """The indices of every item the packer holds (pending or in an open row)."""
        return [i for _, i in self.pending] + [s[0] for row in self.rows.values() for s in row]

    def _place(self, length: int, index: int):
        above = self.rooms >> length
        room = length + (above & -above).bit_length() - 1
        if room == self.max_length:
            r, self.next_row = self.next_row, self.next_row + 1
            self.rows[r] = []
        else:
            r = self._take(room)
        self.rows[r].append((index, 0, length))
        left = room - length
        if left == 0:
            return self.rows.pop(r)
        q = self.queues[left]
        if not q:
            self.rooms |= 1 << left
        q.append(r)
        if len(self.rows) > self.buffer_size:  # too many open rows: close the fullest (the smallest room, oldest first)
            return self.rows.pop(self._take((self.rooms & -self.rooms).bit_length() - 1))
        return None

    def _take(self, room: int) -> int:
        """The oldest open row with exactly `room` left, out of its queue."""
        q = self.queues[room]
        r = q.popleft()
        if not q:
            self.rooms ^= 1 << room
        return r

    def state(self) -> dict:
        """Everything the packer holds, as JSON-able lists of ints."""
        return {"max_length": self.max_length, "buffer_size": self.buffer_size, "next_row": self.next_row,
                "pending": [list(p) for p in self.pending],
                "rows": [[r, [list(s) for s in slices]] for r, slices in self.rows.items()],
                "queues": [[room, list(q)] for room, q in enumerate(self.queues) if q]}

    @classmethod
    def from_state(cls, state: dict) -> StreamPacker:
        packer = cls(state["max_length"], state["buffer_size"])
        packer.next_row = state["next_row"]
        packer.pending = [tuple(p) for p in state["pending"]]  # a heap already, in the saved order
        packer.rows = {r: [tuple(s) for s in slices] for r, slices in state["rows"]}
        for room, rows in state["queues"]:
            packer.queues[room].extend(rows)
            packer.rooms |= 1 << room
        return packer
