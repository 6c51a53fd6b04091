"""Length-grouped batches without packing (train_sampling_strategy="group_by_length"): a few static row lengths.

XLA compiles one step per shape, so instead of padding every row to max_length (one shape, much padding) or every
step to its longest row (a shape per step), rows are grouped into at most `max_buckets` lengths chosen from the
length histogram, each step takes its rows from one bucket, and steps are shuffled. Example: rows of 40-900 tokens,
max_length 2048, 4 buckets -> lengths like (128, 256, 512, 1024): a step compiles once per bucket.

    boundaries = choose_buckets(row_lengths, max_length, max_buckets=8)
    steps = bucketed_steps(bucket_of(row_lengths, boundaries), step_rows, seed, epoch, shuffle=True)   # [S, rows]
"""

from __future__ import annotations

import numpy as np

MULTIPLE = 64  # bucket lengths are multiples of this (or max_length itself): tensor-core friendly shapes


def choose_buckets(lengths: np.ndarray, max_length: int, max_buckets: int, multiple: int = MULTIPLE) -> list[int]:
    """At most `max_buckets` row lengths (multiples of `multiple`, or max_length) that cover every row with the
    least padding: an exact dynamic program over the histogram (candidates <= max_length / multiple + 1, tiny)."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) == 0:
        return [max_length]
    candidates = sorted({min(-(-int(n) // multiple) * multiple, max_length) for n in np.unique(lengths)})
    counts = np.array([np.sum((lengths <= c) & (lengths > p)) for p, c in zip([0] + candidates[:-1], candidates)])
    tokens = np.array([np.sum(lengths[(lengths <= c) & (lengths > p)]) for p, c in zip([0] + candidates[:-1],
                                                                                        candidates)])
    n = len(candidates)
    k_max = min(max_buckets, n)
    # cost[i][j]: padding when candidates i..j (inclusive) all pad to candidates[j]
    rows_to, tokens_to = np.cumsum(counts), np.cumsum(tokens)

    def cost(i, j):
        rows = rows_to[j] - (rows_to[i - 1] if i else 0)
        toks = tokens_to[j] - (tokens_to[i - 1] if i else 0)
        return rows * candidates[j] - toks

    inf = float("inf")
    best = [[inf] * n for _ in range(k_max + 1)]  # best[k][j]: first j+1 candidates covered with k buckets
    back = [[-1] * n for _ in range(k_max + 1)]
    for j in range(n):
        best[1][j] = cost(0, j)
    for k in range(2, k_max + 1):
        for j in range(n):
            for i in range(1, j + 1):
                value = best[k - 1][i - 1] + cost(i, j)
                if value < best[k][j]:
                    best[k][j], back[k][j] = value, i
    k = min(range(1, k_max + 1), key=lambda k: (best[k][n - 1], k))
    boundaries, j = [], n - 1
    while k >= 1 and j >= 0:
        boundaries.append(candidates[j])
        i = back[k][j] if k > 1 else 0
        j, k = i - 1, k - 1
    return sorted(boundaries)


def bucket_of(lengths: np.ndarray, boundaries: list[int]) -> np.ndarray:
    """Each row's bucket: the smallest boundary >= its length."""
    return np.searchsorted(np.asarray(boundaries), np.asarray(lengths), side="left")


def bucketed_steps(buckets: np.ndarray, step_rows: int, seed: int, epoch: int, shuffle: bool,
                   drop_remainder: bool = False) -> np.ndarray:
    """One epoch of steps [num_steps, step_rows] of row ids, each step's rows from one bucket; a bucket's last
    partial step is filled with -1 (empty rows, nothing trained) or dropped. shuffle: rows inside each bucket and
    the order of the steps are permuted by (seed, epoch); else buckets in order, rows in order."""
    rng = np.random.default_rng([seed % 2**32, epoch])
    steps = []
    for bucket in np.unique(buckets):
        rows = np.flatnonzero(buckets == bucket)
        if shuffle:
            rows = rng.permutation(rows)
        full = len(rows) // step_rows * step_rows
        steps.extend(rows[:full].reshape(-1, step_rows))
        if len(rows) > full and not drop_remainder:
            steps.append(np.concatenate([rows[full:], np.full(step_rows - (len(rows) - full), -1)]))
    steps = np.asarray(steps, np.int64).reshape(-1, step_rows)
    return steps[rng.permutation(len(steps))] if shuffle else steps


def padding_report(lengths: np.ndarray, boundaries: list[int], max_length: int) -> dict:
    """Padding slots of the rows at their bucket lengths vs all at max_length (partial steps not counted)."""
    lengths = np.asarray(lengths, np.int64)
    padded = int(np.sum(np.asarray(boundaries)[bucket_of(lengths, boundaries)] - lengths))
    at_max = int(np.sum(max_length - lengths))
    return {"buckets": list(boundaries), "padding_tokens": padded, "padding_tokens_at_max_length": at_max,
            "rows_per_bucket": np.bincount(bucket_of(lengths, boundaries), minlength=len(boundaries)).tolist()}
