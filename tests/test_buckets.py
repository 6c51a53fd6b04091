"""group_by_length without packing: a few bucket lengths chosen from the histogram, each step from one bucket."""

import itertools

import numpy as np
import pytest

from jsft import fixtures, progress, step, train
from jsft.data import buckets
from train_configs import tiny_config


def _padding(lengths, boundaries):
    return int(np.sum(np.asarray(boundaries)[buckets.bucket_of(lengths, boundaries)] - lengths))


@pytest.mark.parametrize("seed", range(6))
def test_chosen_buckets_pad_least_among_all_choices(seed):
    """The dynamic program against brute force over every set of <= k candidate lengths covering the longest row."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([rng.integers(5, 200, 40), rng.integers(300, 500, 7)])
    max_length, k = 512, 3
    chosen = buckets.choose_buckets(lengths, max_length, k)
    assert len(chosen) <= k and chosen[-1] >= lengths.max() and all(b % 64 == 0 or b == max_length for b in chosen)
    candidates = sorted({min(-(-int(n) // 64) * 64, max_length) for n in lengths})
    best = min(_padding(lengths, list(c)) for r in range(1, k + 1) for c in itertools.combinations(candidates, r)
               if max(c) == candidates[-1])  # the longest row must fit
    assert _padding(lengths, chosen) == best
    assert _padding(lengths, chosen) < _padding(lengths, [max_length])


def test_bucketed_steps_hold_every_row_once_from_one_bucket_each_and_reshuffle_by_epoch():
    lengths = np.random.default_rng(0).integers(1, 500, 103)
    boundaries = buckets.choose_buckets(lengths, 512, 4)
    of = buckets.bucket_of(lengths, boundaries)
    epochs = [buckets.bucketed_steps(of, 8, seed=1, epoch=e, shuffle=True) for e in (0, 1)]
    for steps in epochs:
        real = steps[steps >= 0]
        assert sorted(real.tolist()) == list(range(103))  # every row once, the rest empty slots
        for row_ids in steps:
            assert len(set(of[row_ids[row_ids >= 0]])) == 1  # one bucket a step
    assert not np.array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(epochs[0], buckets.bucketed_steps(of, 8, seed=1, epoch=0, shuffle=True))
    dropped = buckets.bucketed_steps(of, 8, seed=1, epoch=0, shuffle=True, drop_remainder=True)
    assert (dropped >= 0).all()


def _rows(n=48):
    """Prompt/completion rows of very different lengths (3 groups), so buckets matter."""
    rows = fixtures.make_rows("prompt_completion", n, seed=4)
    return [dict(r, completion=r["completion"] + " end" * (3 * (i % 3) ** 2)) for i, r in enumerate(rows)]


def test_group_by_length_run_compiles_once_per_bucket_and_resumes_exactly(tokenizer_dir, tmp_path):
    data = fixtures.write_jsonl(_rows(), tmp_path / "pc.jsonl")
    settings = dict(data={"packing": False, "padding_free": False, "max_length": 128,
                          "train_sampling_strategy": "group_by_length", "length_buckets": 3},
                    training={"max_steps": 8}, logging={"save_steps": 4, "save_total_limit": 3})
    config = tiny_config(tokenizer_dir, data, tmp_path / "run", **settings)
    step.train_step.jitted_fn.clear_cache()
    summary = train.run(config)
    lengths = summary["plan"]["step_lengths"]
    assert 1 < len(lengths) <= 3 and max(lengths) <= 128
    assert step.train_step.jitted_fn._cache_size() <= len(lengths)
    records = [r for r in progress.read_metrics(tmp_path / "run") if "loss" in r]
    assert len(records) == 8 and all(np.isfinite(r["loss"]) for r in records)
    # a resumed run from checkpoint 4 logs the same losses for steps 5..8
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "8")
    resumed = tiny_config(tokenizer_dir, data, tmp_path / "resumed", **settings)
    train.run(resumed)
    again = {r["step"]: r["loss"] for r in progress.read_metrics(tmp_path / "resumed") if "loss" in r}
    for r in records[4:]:
        assert again[r["step"]] == pytest.approx(r["loss"], rel=1e-6)


def test_group_by_length_is_refused_with_packing(tokenizer_dir, tmp_path):
    from jsft.config import ConfigError
    from jsft.validate import validate

    config = tiny_config(tokenizer_dir, "d.jsonl", tmp_path, data={"train_sampling_strategy": "group_by_length"})
    with pytest.raises(ConfigError, match="Set data.packing=False"):
        validate(config)
