"""Where a split's rows come from: a local .jsonl/.json/.parquet/.arrow/.csv file, a directory, or a hub dataset.

    dataset = load_rows(config.data, "train")           # a datasets.Dataset ("eval": data.dataset_test_split)
    dataset, unreadable = read_split(config.data, "eval")  # and the malformed JSON lines skipped (skip_bad_rows)

`datasets.load_dataset` reads the rows; what jsft adds is the error for a malformed JSON line (file, line, row, fix;
datasets says only "An error occurred while generating the dataset") and the counted skip of such lines.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from jsft.config import ConfigError, DataConfig
from jsft.data.formats import BadRowError, read_jsonl

# jsft's own token cache files (jsft.data.pipeline), left out of a directory's identity: a cache kept inside the
# data directory must not change the key it is stored under.
CACHE_FILE = re.compile(r"\.?examples-(train|eval)-\w+\.npz(\.\d+\.tmp\.npz)?")
DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


def load_rows(data: DataConfig, split: str = "train"):
    """A datasets.Dataset for "train" (data.dataset_train_split) or "eval" (data.dataset_test_split).

    A split may be a split name of data.dataset_name (a directory or hub dataset), or a path to its own file.
    A malformed JSON line raises BadRowError naming the file and line (see `read_split`); lines skipped under
    data.skip_bad_rows are warned about here (prepare_dataset counts them in its report).
    """
    return read_split(data, split)[0]


def split_source(data: DataConfig, split: str, location: str | None = None) -> str:
    """Where a split's rows come from, for messages: "eval split (/data/test.jsonl)", "train split ('train' of org/ds)";
    with a row's location (row_location) inside the parentheses: "eval split (/data/test.jsonl, line 7)"."""
    name = data.dataset_train_split if split == "train" else data.dataset_test_split
    where = name if Path(name).is_file() else data.dataset_name if Path(data.dataset_name).is_file() else (
        f"{name!r} of {data.dataset_name}")
    return f"{split} split ({where}{', ' + location if location else ''})"


def row_location(data: DataConfig, split: str, row_index: int | None) -> str | None:
    """Where row `row_index` of a split is, for error messages: "line 7" of a JSON-lines file, or "file
    /d/part-1.jsonl, line 3" in a data directory (datasets concatenates a split's files in the order of its builder's
    data_files). None for hub and save_to_disk datasets, and where rows are not lines and the file is already named."""
    import datasets

    name = data.dataset_train_split if split == "train" else data.dataset_test_split
    single = next((Path(p) for p in (name, data.dataset_name) if Path(p).is_file()), None)
    path = Path(data.dataset_name)
    if row_index is None or (single is None and (not path.is_dir() or _saved_to_disk(path))):
        return None
    if single is not None:
        rows = _row_lines(single)
        return f"line {rows[row_index]}" if rows and row_index < len(rows) and rows[row_index] else None
    try:
        files = datasets.load_dataset_builder(str(path), data.dataset_config).config.data_files[name]
    except Exception:  # noqa: BLE001 (the message goes out without the file rather than not at all)
        return None
    first = 0
    for file in map(Path, files):
        rows = _row_lines(file)
        if rows is None:
            return None
        if row_index < first + len(rows):
            line = rows[row_index - first]
            return f"file {file}, " + (f"line {line}" if line else f"its row {row_index - first}")
        first += len(rows)
    return None


def _row_lines(file: Path) -> list[int | None] | None:
    """Per row of a data file, its 1-based line (None where rows are not lines); None for an unknown layout."""
    kind = DATA_FILE_TYPES.get(file.suffix)
    if kind == "json" and _is_json_lines(file):
        with open(file, encoding="utf-8") as f:
            return [number for number, line in enumerate(f, start=1) if line.strip()]
    if kind == "parquet":
        import pyarrow.parquet as pq

        return [None] * pq.ParquetFile(file).metadata.num_rows
    return None


def read_split(data: DataConfig, split: str = "train"):
    """(dataset, unreadable): the rows of a split, and the BadRowErrors of JSON lines skipped (data.skip_bad_rows).

    Malformed JSON. datasets reports a broken line of a local JSON file as "An error occurred while generating the
    dataset". jsft then reads the file again with `jsft.data.read_jsonl` and raises BadRowError naming the file, the
    line (1-based), the row index and the JSON problem, with the fix. With data.skip_bad_rows a malformed line of a
    JSON-lines file (.jsonl, or a .json file written one object per line) is a counted skip like any other bad row:
    each line is a row of its own, so the other lines are read whole, the skip is warned about (with line numbers),
    counted in the preparation report, and the rows after it keep their row index (Examples.source_rows). A .json file
    holding ONE document (an array of rows) with a syntax error, and a malformed line inside a dataset directory,
    stay errors even with skip_bad_rows: past the error there is no row boundary to resume at (a document), or the
    split's files are datasets' to read (a directory); fix the file.
    """
    import datasets

    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: use 'train' or 'eval'")
    name = data.dataset_train_split if split == "train" else data.dataset_test_split
    field = "data.dataset_train_split" if split == "train" else "data.dataset_test_split"
    if name is None:
        raise ConfigError("data.dataset_test_split is None: set a split name or a file path to evaluate")
    if Path(name).is_file():
        return _load_file(Path(name), data.skip_bad_rows, field)
    if Path(name).is_dir():
        raise ConfigError(f"{field}={name!r} is a directory: set it to a data file, or set data.dataset_name to the "
                          f"directory and {field} to one of its split names")
    if _looks_like_a_file(name):
        raise ConfigError(f"{field}={name!r}: no such file. Fix: correct the path of the {split} file, or set {field} "
                          "to a split name of data.dataset_name")
    path = Path(data.dataset_name)
    if path.is_file():
        _check_single_file_split(data, split, name, field)
        return _load_file(path, data.skip_bad_rows, "data.dataset_name")
    if path.is_dir() and _saved_to_disk(path):
        return _load_from_disk(path, data, split, name, field), []
    if path.is_dir():
        _check_has_data_files(path)
        try:
            return datasets.load_dataset(str(path), data.dataset_config, split=name), []
        except Exception as e:  # noqa: BLE001 (re-raised unless an unknown split or a malformed JSON line explains it)
            error = e
        _raise_if_unknown_split(error, data, name, field)
        files = sorted(p for p in path.rglob("*") if p.is_file() and DATA_FILE_TYPES.get(p.suffix) == "json")
        for file in files:
            bad = _malformed_json(file)
            if bad is not None:
                fix = "repair or remove that line (skip_bad_rows skips malformed lines of a single data file only)"
                raise BadRowError(bad.row_index, bad.field, bad.problem, fix) from bad.__cause__
        blank = [str(f) for f in files if _is_json_lines(f) and _has_blank_lines(f)]
        if blank and "Expected object or value" in str(error):
            raise ConfigError(
                f"datasets cannot read data.dataset_name={data.dataset_name!r}: its reader fails on blank lines in "
                f"JSON-lines files where a column's type varies between rows (e.g. content a string in one row, a "
                f"list of parts in another). Files with blank lines: {', '.join(blank[:5])}"
                f"{' ...' if len(blank) > 5 else ''}. Fix: remove the blank lines (e.g. `sed -i '/^\\s*$/d' FILE`)"
            ) from error
        raise error
    if data.dataset_name.startswith((".", "/")) or not data.dataset_name:
        raise ConfigError(f"data.dataset_name={data.dataset_name!r}: no such file or directory")
    return _load_hub_split(data, name, field), []


def _saved_to_disk(path: Path) -> bool:
    """A directory written by Dataset.save_to_disk (state.json) or DatasetDict.save_to_disk (dataset_dict.json)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _load_from_disk(path: Path, data: DataConfig, split: str, name: str, field: str):
    """datasets.load_from_disk: a Dataset is one split ('train'), a DatasetDict has its own split names."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.Dataset):
        _check_single_file_split(data, split, name, field)
        return loaded
    if name not in loaded:
        raise _unknown_split(data, name, field, list(loaded))
    return loaded[name]


def _unknown_split(data: DataConfig, name: str, field: str, splits: list[str]) -> ConfigError:
    return ConfigError(
        f"{field}={name!r}: data.dataset_name={data.dataset_name!r} has no split {name!r}; its splits are "
        f"{', '.join(map(repr, splits))}. Fix: set {field} to one of them (or, for eval, to the path of an eval file)"
    )


def _check_has_data_files(path: Path) -> None:
    if not any(p.is_file() and not p.name.startswith(".") for p in path.rglob("*")):
        raise ConfigError(f"data.dataset_name={str(path)!r} is an empty directory (no data files). Fix: point it at "
                          f"a directory holding {', '.join(DATA_FILE_TYPES)} files, or at one file")


def _looks_like_a_file(name: str) -> bool:
    """A split value that can only mean a file path: a data-file suffix or a path separator (split names have
    neither)."""
    return Path(name).suffix in DATA_FILE_TYPES or "/" in name or "\\" in name


def _check_single_file_split(data: DataConfig, split: str, name: str, field: str) -> None:
    """data.dataset_name is one file: its rows are the 'train' split; eval needs a file of its own."""
    if split == "eval":
        raise ConfigError(
            f"data.dataset_name={data.dataset_name!r} is one file (one split); set data.dataset_test_split to "
            f"the path of an eval file, not the split name {name!r}"
        )
    if name != "train":
        raise ConfigError(
            f"{field}={name!r}, but data.dataset_name={data.dataset_name!r} is one file, which has only a 'train' "
            f"split. Fix: leave {field} at 'train', or point data.dataset_name at a directory or hub dataset "
            f"with a {name!r} split"
        )


def _raise_if_unknown_split(error: Exception, data: DataConfig, name: str, field: str) -> None:
    """datasets' `Unknown split "validation"` as a ConfigError naming the field and the splits that exist."""
    import datasets

    if not (isinstance(error, ValueError) and str(error).startswith("Unknown split")):
        return
    splits = datasets.get_dataset_split_names(data.dataset_name, data.dataset_config)
    raise _unknown_split(data, name, field, splits) from error


def _load_hub_split(data: DataConfig, name: str, field: str):
    """A split of a hub dataset; an unknown split or an unreachable dataset is a ConfigError."""
    import datasets

    try:
        return datasets.load_dataset(data.dataset_name, data.dataset_config, split=name)
    except ValueError as e:
        _raise_if_unknown_split(e, data, name, field)
        raise
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ConfigError(
            f"data.dataset_name={data.dataset_name!r} is no local file or directory, and this machine could not "
            f"load it as a hub dataset (offline, HF_HUB_OFFLINE=1, or a private/gated dataset without a token?): "
            f"{' '.join(str(e).split()).rstrip('.')}. Fix: point data.dataset_name at a local file or directory, or "
            "download the dataset first"
        ) from e


def _load_file(path: Path, skip_bad_rows: bool = False, field: str = "data.dataset_name"):
    """(dataset, unreadable) of one data file (the value of config `field`); see read_split for malformed JSON."""
    import datasets

    kind = DATA_FILE_TYPES.get(path.suffix)
    if kind is None:
        raise ConfigError(f"{field}={str(path)!r}: unknown data file type; use one of {', '.join(DATA_FILE_TYPES)} "
                          "(decompress a .gz file first)")
    if _is_blank(path, kind):
        raise ConfigError(f"{field}={str(path)!r}: the file is empty (no rows, only blank lines or 0 bytes). Fix: "
                          f"point {field} at a file with rows (was it written completely?)")
    if kind in ("json", "csv"):
        _check_utf8(path, field)
    try:
        dataset = datasets.load_dataset(kind, data_files=str(path), split="train")
        if kind == "json" and _has_json_feature(dataset.features) and _is_json_lines(path):
            damage = _json_decoding_damage(path, dataset)
            if damage is not None:
                raise damage
        return dataset, []
    except BadRowError:
        raise
    except Exception as e:  # noqa: BLE001 (re-raised unless no rows or a malformed JSON line explains it)
        if "corresponds to no data" in str(e):
            raise ConfigError(f"{field}={str(path)!r}: the file has no rows. Fix: point {field} at a file with "
                              "rows") from e
        if kind != "json":
            raise
        error = e
    bad = _malformed_json(path)
    if bad is None and _is_json_lines(path):
        # every line parses, yet datasets failed: its reader for a column whose type varies between rows (content as
        # a string in one row, a list of parts in another) fails on blank lines ("Expected object or value")
        try:
            return _load_clean_copy(path)
        except Exception:  # noqa: BLE001 (something else: datasets' own error)
            raise error from None
    if bad is None:
        raise error
    if not skip_bad_rows or bad.row_index is None:
        raise bad  # (its cause: the JSONDecodeError; datasets' own error says no more)
    return _load_clean_copy(path)


def _check_utf8(path: Path, field: str) -> None:
    """ConfigError when a text data file is not UTF-8: datasets would read it, and its rows would fail later with a
    bare UnicodeDecodeError naming nothing. One pass over the bytes (much faster than tokenizing them)."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                decoder.decode(block)
                offset += len(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{field}={str(path)!r} is not UTF-8 text (near byte {offset + e.start}: {e.reason}). Fix: re-encode it "
            f"as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > utf8{path.suffix}`"
        ) from e


def _is_blank(path: Path, kind: str) -> bool:
    """0 bytes, or (a text file) nothing but blank lines; reads up to the first non-blank line."""
    if path.stat().st_size == 0:
        return True
    if kind not in ("json", "csv"):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return all(not line.strip() for line in f)


def _malformed_json(path: Path) -> BadRowError | None:
    """The BadRowError of the first malformed row of a JSON file, or None when it parses.

    JSON lines (any .jsonl; a .json whose first non-blank line is an object on its own) go through read_jsonl, which
    names the line. Otherwise a .json is one document, and the error names its line and column (row index unknown).
    """
    if not _is_json_lines(path):
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except json.JSONDecodeError as e:
            return BadRowError(
                None, "json", f"{path} is not valid JSON: {e.msg} on line {e.lineno}, column {e.colno}",
                "repair the file at that line (a .json file holding one array cannot skip a row; a .jsonl file with "
                "one object per line can, with skip_bad_rows=True)",
            )
        return None
    try:
        for _ in read_jsonl(path):
            pass
    except BadRowError as e:
        return e
    return None


def _has_json_feature(feature) -> bool:
    """datasets types a field whose type varies between rows as Json (a string in one row, a number in another)."""
    from datasets.features import Json

    if isinstance(feature, Json):
        return True
    if isinstance(feature, dict):
        return any(_has_json_feature(f) for f in feature.values())
    inner = getattr(feature, "feature", None)
    return inner is not None and _has_json_feature(inner)


def _first_changed_string(raw, read, field: str) -> tuple[str, str, object] | None:
    """(field, the file's string, what datasets gave) where a string of the file came back as another value."""
    if isinstance(raw, str):
        return None if raw == read else (field, raw, read)
    if isinstance(raw, dict) and isinstance(read, dict):
        return next(filter(None, (_first_changed_string(v, read.get(k), f"{field}.{k}" if field else k)
                                  for k, v in raw.items())), None)
    if isinstance(raw, list) and isinstance(read, list):
        return next(filter(None, (_first_changed_string(v, w, f"{field}[{j}]")
                                  for j, (v, w) in enumerate(zip(raw, read)))), None)
    return None


def _json_decoding_damage(path: Path, dataset) -> BadRowError | None:
    """datasets reads a field whose type varies between rows as JSON and decodes the strings of the other rows too:
    the string "5" comes back as the number 5, "null" as None. The first such row, as a BadRowError naming it."""
    for index, (raw, read) in enumerate(zip(read_jsonl(path), dataset)):
        changed = _first_changed_string(raw, read, "")
        if changed is not None:
            field, text, value = changed
            line, every_row = _row_lines(path)[index], re.sub(r"\[[0-9]+\]", "[]", field)
            return BadRowError(
                index, field, f"the string {text!r} is read as {value!r}: the type of this field varies between rows "
                "(e.g. a number or a list in some rows), so datasets reads it as JSON and decodes strings that look "
                "like JSON", f"give {every_row} one type in every row (e.g. strings)", f"{path}, line {line}")
    return None


def _has_blank_lines(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return any(not line.strip() for line in f)


def _is_json_lines(path: Path) -> bool:
    """A .jsonl file, or a .json file written one object per line (its first non-blank line is an object)."""
    return path.suffix == ".jsonl" or (path.suffix == ".json" and _first_line_is_an_object(path))


def _first_line_is_an_object(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except json.JSONDecodeError:
                    return False
    return False


def _load_clean_copy(path: Path):
    """(dataset, unreadable): datasets reads a copy of a JSON-lines file without its blank and malformed lines; the
    malformed ones are warned about (the caller allows skipping them)."""
    import tempfile

    import datasets

    unreadable: list[BadRowError] = []
    with tempfile.TemporaryDirectory(prefix="jsft-rows-") as tmp:
        clean = Path(tmp) / "rows.jsonl"
        with open(clean, "w", encoding="utf-8") as f:
            for row in read_jsonl(path, skipped=unreadable):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        dataset = datasets.load_dataset("json", data_files=str(clean), split="train", keep_in_memory=True,
                                        cache_dir=str(Path(tmp) / "cache"))
    if not unreadable:
        return dataset, unreadable
    lines = [re.search(r"line (\d+)", e.problem).group(1) for e in unreadable]
    warnings.warn(
        f"{path}: skipped {len(unreadable)} malformed JSON line(s) (data.skip_bad_rows=True): line(s) "
        f"{', '.join(lines[:20])}{' ...' if len(lines) > 20 else ''}; they are counted as bad rows",
        UserWarning, stacklevel=4,
    )
    return dataset, unreadable


def source_fingerprint(data: DataConfig, split: str, dataset) -> dict:
    """Identity of the rows: every local file's path, size and mtime, else the hub name and datasets' fingerprint."""
    name = data.dataset_train_split if split == "train" else data.dataset_test_split
    paths = [Path(name)] if Path(name).is_file() else [Path(data.dataset_name)]
    if not paths[0].exists():
        return {"hub": data.dataset_name, "config": data.dataset_config, "split": name,
                "fingerprint": getattr(dataset, "_fingerprint", None)}
    files = sorted(p for p in paths[0].rglob("*") if p.is_file() and not CACHE_FILE.fullmatch(p.name)) \
        if paths[0].is_dir() else paths
    return {"split": name, "files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]}
