"""A dataset mixture (data.datasets, TRL's DatasetMixtureConfig): several datasets' rows as one, as TRL's get_dataset.

    mixture = read_mixture(config.data, "train", seed=config.training.seed)
    mixture.dataset, mixture.unreadable, mixture.components, mixture.source(row_index)

Each entry of data.datasets has TRL's DatasetConfig keys: path, name, data_dir, data_files, split ("train"), columns,
fraction. What TRL 1.x's `trl.scripts.utils.get_dataset` does, jsft does in the same order:
1. each component is read (through jsft.data.sources, so a malformed line names its file and line), then
   `select_columns(columns)` when columns is set;
2. `fraction` (set for all components or none) is a target share of the mixture: fractions are normalized to weights
   summing to one, total = min(len(d) / w for w > 0), and each component keeps its FIRST round(w * total) rows (no
   shuffling, no oversampling);
3. the components are concatenated in order (datasets.concatenate_datasets: a column one component lacks is None
   in its rows, a column's type must agree; `columns` leaves columns out);
3b. jsft, beyond TRL: data.mixture_probabilities samples the rows instead, as datasets.interleave_datasets(
   probabilities, seed=training.seed, stopping_strategy=data.mixture_stopping_strategy) does (the same rows, in its
   order, for a seed);
4. data.test_split_size (a share, or a row count when an int, as datasets' train_test_split's test_size) splits the
   concatenation into "train" and "test" with datasets' train_test_split, seeded by training.seed. TRL passes no seed
   (its split changes every run); jsft's is the one TRL gets with seed=training.seed, so a run is repeatable.
data.dataset_train_split is then "train" and data.dataset_test_split "test" (TRL's sft script indexes get_dataset's
DatasetDict with them), or the path of an eval file of its own. Streaming (TRL's `streaming`) is not supported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jsft.config import ConfigError, DataConfig
from jsft.data import sources
BUILDERS = {"json", "csv", "parquet", "arrow"}  # datasets' packaged builders read from local data_files


@dataclass
class Mixture:
    """A split of the mixture: its rows, the malformed lines skipped reading them, and per component its counts."""

    dataset: object  # datasets.Dataset
    unreadable: list
    components: list[dict]  # {"dataset", "rows" (read), "kept" (after fraction), "in_split"}
    split: str
    mixture_rows: np.ndarray  # row of the concatenation for each row of this split
    starts: np.ndarray  # first concatenation row of each component (and the total at the end)
    parts: list[list[tuple[DataConfig, int]]] = field(default_factory=list)  # per component: (file config, first row)

    def source(self, row_index: int | None) -> str:
        """Where row `row_index` of this split comes from, for errors: "train split (data.datasets[1]: /d/b.jsonl,
        line 7)"."""
        if row_index is None or row_index >= len(self.mixture_rows):
            return f"{self.split} split (data.datasets mixture)"
        row = int(self.mixture_rows[row_index])
        c = int(np.searchsorted(self.starts, row, side="right") - 1)
        within = row - int(self.starts[c])
        part, first = [(p, f) for p, f in self.parts[c] if f <= within][-1]
        location = sources.row_location(part, "train", within - first)
        return f"{self.split} split (data.datasets[{c}]: {part.dataset_name}{', ' + location if location else ''})"


def component_label(component: dict) -> str:
    files = component.get("data_files")
    label = component["path"] if files is None else f"{component['path']}:{files}"
    return label + (f" ({component['name']})" if component.get("name") else "")


def _parts(data: DataConfig, index: int, component: dict) -> list[DataConfig]:
    """The single-dataset configs a component is read through (jsft.data.sources), in row order: one per local data
    file for a builder path ("json" + data_files), else the path itself (a file, a directory, a hub dataset)."""
    where = f"data.datasets[{index}]"
    path, split, files = component["path"], component.get("split") or "train", component.get("data_files")
    base = dataclasses.replace(data, datasets=[], test_split_size=None, dataset_test_split=None,
                               dataset_config=component.get("name"), dataset_train_split=split)
    if path in BUILDERS and (files is not None or component.get("data_dir")):
        if isinstance(files, dict):
            if split not in files:
                raise ConfigError(f"{where}.data_files has no split {split!r} (its keys: {', '.join(files)}). Fix: "
                                  f"set {where}.split to one of them")
            files, split = files[split], "train"
        if files is None:
            return [dataclasses.replace(base, dataset_name=component["data_dir"], dataset_config=None)]
        if split != "train":
            raise ConfigError(f"{where}.split={split!r}: data_files given as a file or list are the 'train' split "
                              "(split slicing like 'train[:10%]' is not supported; use fraction)")
        files = [files] if isinstance(files, str) else list(files)
        return [dataclasses.replace(base, dataset_name=str(f), dataset_train_split="train", dataset_config=None)
                for f in files]
    if files is not None:
        raise ConfigError(f"{where}.data_files is supported with path json, csv, parquet or arrow only. Fix: set "
                          f"{where}.path to the builder (e.g. json) and list the files in data_files")
    if component.get("data_dir"):
        if not Path(path).is_dir():
            raise ConfigError(f"{where}.data_dir is supported for a local directory path only ({path!r} is not one)")
        path = str(Path(path) / component["data_dir"])
    return [dataclasses.replace(base, dataset_name=str(path))]


def _read_component(data: DataConfig, index: int, component: dict):
    """(dataset, unreadable, parts with their first rows) of one component, its columns selected."""
    import datasets

    where = f"data.datasets[{index}]"
    pieces, unreadable, parts, first = [], [], [], 0
    for part in _parts(data, index, component):
        try:
            piece, bad = sources.read_split(part, "train")
        except ConfigError as e:
            raise ConfigError(f"{where} ({component_label(component)}): {e}") from e
        pieces.append(piece)
        unreadable += bad
        parts.append((part, first))
        first += len(piece)
    dataset = pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)
    columns = component.get("columns")
    if columns is not None:
        missing = [c for c in columns if c not in dataset.column_names]
        if missing:
            raise ConfigError(f"{where}.columns: {component_label(component)} has no column "
                              f"{', '.join(map(repr, missing))}; its columns are {', '.join(dataset.column_names)}")
        dataset = dataset.select_columns(columns)
    return dataset, unreadable, parts


def kept_rows(lengths: list[int], fractions: list[float | None]) -> list[int]:
    """Rows kept of each component: TRL's get_dataset, the first round(w * total) rows, w the normalized fractions,
    total the largest mixture size that oversamples no component."""
    if all(f is None for f in fractions):
        return list(lengths)
    weights = [f / sum(fractions) for f in fractions]
    total = min(n / w for n, w in zip(lengths, weights) if w > 0)
    return [round(w * total) for w in weights]


def read_mixture(data: DataConfig, split: str, seed: int) -> Mixture:
    """The rows of split "train" or "eval" of the mixture data.datasets (module doc)."""
    import datasets

    read = [_read_component(data, i, c) for i, c in enumerate(data.datasets)]
    lengths = [len(d) for d, _, _ in read]
    kept = kept_rows(lengths, [c.get("fraction") for c in data.datasets])
    selected = [d.select(range(k)) if k != len(d) else d for (d, _, _), k in zip(read, kept)]
    try:
        combined = datasets.concatenate_datasets(selected)
    except ValueError as e:
        columns = "; ".join(f"[{i}] " + ", ".join(f"{k}: {v}" for k, v in d.features.items())
                            for i, d in enumerate(selected))
        raise ConfigError(f"data.datasets: a column has different types in the components ({columns}), so their rows "
                          f"cannot be concatenated ({' '.join(str(e).split())[:300]}). Fix: make that column's type the "
                          "same in every component, or leave it out with `columns`") from e
    starts = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    rows = np.arange(len(combined), dtype=np.int64)  # the concatenation's row for each row of this split
    if data.mixture_probabilities is not None:
        # the rows datasets.interleave_datasets picks (they depend on the lengths, probabilities and seed only),
        # drawn over row numbers so that each row's component is known
        numbers = [datasets.Dataset.from_dict({"row": np.arange(s, s + k)}) for s, k in zip(starts[:-1], kept)]
        rows = np.asarray(datasets.interleave_datasets(
            numbers, probabilities=data.mixture_probabilities, seed=seed,
            stopping_strategy=data.mixture_stopping_strategy)["row"], dtype=np.int64)
    if data.test_split_size is not None:
        # the split of datasets' train_test_split(seed=seed) of the mixture, taken over its row numbers
        split_rows = datasets.Dataset.from_dict({"row": np.arange(len(rows))}).train_test_split(
            test_size=data.test_split_size, seed=seed)
        rows = rows[np.asarray(split_rows["train" if split == "train" else "test"]["row"], dtype=np.int64)]
    elif split != "train":
        raise ConfigError("data.datasets has no eval split without data.test_split_size: set test_split_size, or "
                          "data.dataset_test_split to the path of an eval file")
    if not np.array_equal(rows, np.arange(len(combined))):
        combined = combined.select(rows)
    in_split = np.bincount(np.searchsorted(starts, rows, side="right") - 1, minlength=len(kept))
    components = [{"dataset": component_label(c), "rows": n, "kept": k, "in_split": int(s)}
                  for c, n, k, s in zip(data.datasets, lengths, kept, in_split)]
    unreadable = [e for _, bad, _ in read for e in bad]
    return Mixture(combined, unreadable, components, split, rows, starts, [p for _, _, p in read])


def fingerprint(data: DataConfig, split: str, seed: int) -> dict:
    """Identity of a mixture split's rows: every component's files (jsft.data.sources.source_fingerprint), its
    settings, test_split_size, the probabilities and (with either) the seed that splits or samples."""
    parts = [[sources.source_fingerprint(p, "train", None) for p in _parts(data, i, c)]
             for i, c in enumerate(data.datasets)]
    sampled = data.test_split_size is not None or data.mixture_probabilities is not None
    return {"mixture": data.datasets, "parts": parts, "split": split, "test_split_size": data.test_split_size,
            "probabilities": data.mixture_probabilities, "stopping": data.mixture_stopping_strategy,
            "seed": seed if sampled else None}
