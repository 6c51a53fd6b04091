"""Dataset mixtures (data.datasets, TRL's DatasetMixtureConfig): the rows TRL's own get_dataset gives, its
test_split_size split under the run's seed, the per-component counts in the report, the cache key, a run."""

import dataclasses
import functools

import datasets
import pytest
import yaml
from trl.scripts.utils import DatasetConfig, DatasetMixtureConfig, get_dataset

from jsft import fixtures, train
from jsft.config import ConfigError
from jsft.validate import validate
from jsft.data import mixture
from jsft.data.formats import BadRowError
from jsft.data.pipeline import format_stats, prepare_dataset
from jsft.trl_config import from_trl_file
from train_configs import tiny_config


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    """a.jsonl: 20 prompt/completion rows with a `note` column; b.jsonl: 12 with a `meta` column (so only `columns`
    lets them concatenate)."""
    root = tmp_path_factory.mktemp("mix")
    a = [{**r, "note": f"a{i}"} for i, r in enumerate(fixtures.make_rows("prompt_completion", 20, seed=1))]
    b = [{**r, "meta": i} for i, r in enumerate(fixtures.make_rows("prompt_completion", 12, seed=2))]
    return fixtures.write_jsonl(a, root / "a.jsonl"), fixtures.write_jsonl(b, root / "b.jsonl")


def _components(two_files, fractions=(0.7, 0.3)):
    a, b = two_files
    return [{"path": "json", "data_files": str(a), "columns": ["prompt", "completion"], "fraction": fractions[0]},
            {"path": "json", "data_files": str(b), "columns": ["prompt", "completion"], "fraction": fractions[1]}]


def _trl_yaml(path, components, **fields):
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "datasets": components, **fields}))
    return from_trl_file(path)


def _trl_rows(components, test_split_size=None, seed=None):
    """TRL's get_dataset; its train_test_split is given `seed` (TRL passes none, so its split changes every run)."""
    config = DatasetMixtureConfig(datasets=[DatasetConfig(**c) for c in components], test_split_size=test_split_size)
    if seed is None:
        return get_dataset(config)
    split = datasets.Dataset.train_test_split
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.Dataset, "train_test_split", functools.partialmethod(split, seed=seed))
        return get_dataset(config)


def test_a_trl_mixture_gives_the_rows_of_trls_get_dataset(two_files, tmp_path):
    components = _components(two_files)
    config = _trl_yaml(tmp_path / "trl.yaml", components)
    assert config.data.datasets == components and config.data.test_split_size is None
    ours = mixture.read_mixture(config.data, "train", seed=0)
    theirs = _trl_rows(components)["train"]
    assert ours.dataset.column_names == theirs.column_names == ["prompt", "completion"]
    assert ours.dataset.to_list() == theirs.to_list()
    # fraction 0.7/0.3 of 20 and 12 rows: total min(20/0.7, 12/0.3) = 28.6 -> the first 20 and the first 9 rows
    assert [(c["rows"], c["kept"], c["in_split"]) for c in ours.components] == [(20, 20, 20), (12, 9, 9)]
    # without fraction and columns: every row of both, in order, a column one file lacks None (as datasets concatenates)
    whole = [{k: v for k, v in c.items() if k not in ("fraction", "columns")} for c in components]
    assert mixture.read_mixture(dataclasses.replace(config.data, datasets=whole), "train", 0).dataset.to_list() == \
        _trl_rows(whole)["train"].to_list()


def test_test_split_size_splits_as_trls_train_test_split_under_the_run_seed(two_files, tmp_path):
    components = _components(two_files)
    config = _trl_yaml(tmp_path / "trl.yaml", components, test_split_size=0.25, eval_strategy="steps",
                       eval_steps=2, seed=7)
    assert config.data.test_split_size == 0.25 and config.data.dataset_test_split == "test"
    theirs = _trl_rows(components, test_split_size=0.25, seed=7)
    train_rows = mixture.read_mixture(config.data, "train", seed=7)
    eval_rows = mixture.read_mixture(config.data, "eval", seed=7)
    assert train_rows.dataset.to_list() == theirs["train"].to_list()
    assert eval_rows.dataset.to_list() == theirs["test"].to_list()
    assert sum(c["in_split"] for c in eval_rows.components) == len(theirs["test"]) == 8  # ceil(0.25 * 29)
    assert mixture.read_mixture(config.data, "train", seed=7).dataset.to_list() == train_rows.dataset.to_list()
    assert mixture.read_mixture(config.data, "train", seed=8).dataset.to_list() != train_rows.dataset.to_list()
    five = dataclasses.replace(config.data, test_split_size=5)  # a row count, as train_test_split's int test_size
    validate(dataclasses.replace(config, data=five))
    assert mixture.read_mixture(five, "eval", seed=7).dataset.to_list() == \
        _trl_rows(components, test_split_size=5, seed=7)["test"].to_list()


def test_the_report_lists_each_component_and_the_cache_key_follows_the_mixture(two_files, tokenizer, tmp_path):
    config = tiny_config("unused", "", tmp_path / "run",
                         data={"datasets": _components(two_files), "test_split_size": 0.25, "packing": False,
                               "padding_free": False})
    prepared = prepare_dataset(config, tokenizer, "train")
    assert prepared.stats["cache"] == "miss" and prepared.stats["rows_read"] == 21
    assert [(c["rows"], c["kept"]) for c in prepared.stats["components"]] == [(20, 20), (12, 9)]
    assert sum(c["in_split"] for c in prepared.stats["components"]) == 21
    report = format_stats(prepared.stats)
    assert "mixture of 2 datasets" in report and f"[1] json:{two_files[1]}: 12 rows, 9 kept" in report
    assert prepare_dataset(config, tokenizer, "train").stats["cache"] == "hit"
    config.data.datasets = _components(two_files, fractions=(0.5, 0.5))  # other rows: another cache entry
    assert prepare_dataset(config, tokenizer, "train").stats["cache"] == "miss"
    config.training.seed = 1  # another split
    assert prepare_dataset(config, tokenizer, "train").stats["cache"] == "miss"


def test_a_run_on_a_two_dataset_mixture_trains_and_evaluates(two_files, tokenizer_dir, tmp_path):
    config = tiny_config(tokenizer_dir, "", tmp_path / "run",
                         data={"datasets": _components(two_files), "test_split_size": 0.25,
                               "dataset_test_split": "test"},
                         training={"max_steps": 2}, logging={"eval_steps": 2, "save_steps": 2})
    summary = train.run(config)
    assert summary["steps"] == 2 and "eval_loss" in summary["eval"]


def test_mixture_mistakes_are_config_errors_naming_the_fix(two_files, tmp_path):
    a, b = two_files
    with pytest.raises(ConfigError, match="streaming is not supported"):
        _trl_yaml(tmp_path / "s.yaml", _components(two_files), streaming=True)
    config = tiny_config("t", "", tmp_path / "run", data={"datasets": _components(two_files, (0.5, None))})
    with pytest.raises(ConfigError, match="`fraction` must be set for either all datasets"):
        validate(config)
    config.data.datasets = [{"path": "json", "data_files": str(a), "colums": ["prompt"]}]
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].*unknown key\(s\) 'colums'"):
        validate(config)
    numbers = fixtures.write_jsonl([{"prompt": 5, "completion": "x"}], tmp_path / "numbers.jsonl")
    config.data.datasets = [{"path": str(a)}, {"path": str(numbers)}]
    with pytest.raises(ConfigError, match="column has different types.*prompt: Value.'int64'.*`columns`"):
        mixture.read_mixture(config.data, "train", 0)
    config.data.datasets = [{"path": str(a), "columns": ["prompt", "answer"]}]
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].columns: .* no column 'answer'"):
        mixture.read_mixture(config.data, "train", 0)


def test_a_bad_row_names_its_component_file_and_line(two_files, tokenizer, tmp_path):
    a, _ = two_files
    bad = fixtures.write_jsonl([*fixtures.make_rows("prompt_completion", 3, seed=3), {"prompt": "q =>", "completion": None}],
                               tmp_path / "bad.jsonl")
    components = [{"path": str(a), "columns": ["prompt", "completion"]}, {"path": "json", "data_files": str(bad)}]
    config = tiny_config("t", "", tmp_path / "run", data={"datasets": components})
    with pytest.raises(BadRowError, match=rf"data.datasets\[1\]: {bad}, line 4"):
        prepare_dataset(config, tokenizer, "train")


def test_mixture_probabilities_sample_as_interleave_datasets_in_those_proportions(tmp_path):
    """jsft's extension: 0.7/0.3 from two 300-row files gives the rows of datasets.interleave_datasets with the run's
    seed, about 30% from the second (first_exhausted: until the first file runs out, ~430 rows)."""
    a = fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 300, seed=1), tmp_path / "a.jsonl")
    b = fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 300, seed=2), tmp_path / "b.jsonl")
    config = tiny_config("t", "", tmp_path / "run", data={"datasets": [{"path": str(a)}, {"path": str(b)}],
                                                          "mixture_probabilities": [0.7, 0.3]})
    validate(config)
    ours = mixture.read_mixture(config.data, "train", seed=3)
    files = [datasets.load_dataset("json", data_files=str(f), split="train") for f in (a, b)]
    theirs = datasets.interleave_datasets(files, probabilities=[0.7, 0.3], seed=3, stopping_strategy="first_exhausted")
    assert ours.dataset.to_list() == theirs.to_list()
    counts = [c["in_split"] for c in ours.components]
    n = sum(counts)
    assert counts[0] == 300 and abs(counts[1] / n - 0.3) < 3 * (0.3 * 0.7 / n) ** 0.5
    assert mixture.read_mixture(config.data, "train", seed=3).dataset.to_list() == ours.dataset.to_list()
    assert mixture.read_mixture(config.data, "train", seed=4).dataset.to_list() != ours.dataset.to_list()
    config.data.mixture_probabilities = [0.7, 0.2]
    with pytest.raises(ConfigError, match="summing to 1"):
        validate(config)
