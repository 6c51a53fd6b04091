"""Where a split's rows come from: a local .jsonl/.json/.parquet/.arrow/.csv file, a directory, or a hub dataset.

    dataset = load_rows(config.data, "train")           # a datasets.Dataset ("eval": data.dataset_test_split)
    dataset, unreadable = read_split(config.data, "eval")  # and the malformed JSON lines skipped (skip_bad_rows)

`datasets.load_dataset` reads the rows; what jsft adds is the error for a malformed JSON line (file, line, row, fix;
datasets says only "An error occurred while generating the dataset") and the counted skip of such lines; JSON lines
read as the files hold them (a field whose type varies between rows: jsft.data.mixed_types); a path that does not
exist named as such, never tried on the hub, and a hub that does not answer said at once (jsft.hub).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from jsft import hub
from jsft.config import ConfigError, DataConfig
from jsft.data import mixed_types
from jsft.data.formats import BadRowError, read_jsonl
from jsft.hub import hub_unreachable, looks_local, nearby, no_such_path

# jsft's own token caches (jsft.data.store directories, their temporary directories, older .npz files), left out
# of a directory's identity: a cache kept inside the data directory must not change the key it is stored under.
CACHE_FILE = re.compile(r"\.?(__)?examples-(train|eval)-\w+(\.npz|\.[^/]*\.tmp(\.npz)?)?")
DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")  # rows.jsonl.gz and the like: datasets reads them


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
    files = _split_files(path, data, name)
    if files is None:
        return None
    first = 0
    for file in files:
        rows = _row_lines(file)
        if rows is None:
            return None
        if row_index < first + len(rows):
            line = rows[row_index - first]
            return f"file {file}, " + (f"line {line}" if line else f"its row {row_index - first}")
        first += len(rows)
    return None


def _split_files(path: Path, data: DataConfig, name: str) -> list[Path] | None:
    """The files of split `name` of data directory `path`, in the order datasets concatenates their rows (None when
    datasets' builder cannot say)."""
    import datasets

    try:
        return [Path(f) for f in datasets.load_dataset_builder(str(path), data.dataset_config).config.data_files[name]]
    except Exception:  # noqa: BLE001 (callers go on without the files: a message without the file, no check)
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
        near = nearby(name)
        raise ConfigError(f"{field}={name!r}: no such file{f' ({near})' if near else ''}. Fix: correct the path of "
                          f"the {split} file, or set {field} to a split name of data.dataset_name")
    path = Path(data.dataset_name)
    if path.is_file():
        _check_single_file_split(data, split, name, field)
        return _load_file(path, data.skip_bad_rows, "data.dataset_name")
    if path.is_dir() and _saved_to_disk(path):
        return _load_from_disk(path, data, split, name, field), []
    if path.is_dir():
        _check_has_data_files(path)
        # a directory of JSON-lines shards (no dataset card): read as "json" with its split's files, in order, so
        # jsft.data.mixed_types can check it; anything else: datasets' own reading of the directory
        files = _split_files(path, data, name) if data.dataset_config is None else None
        json_lines = bool(files) and all(_is_json_lines(f) for f in files) and not (path / "README.md").exists()
        try:
            if json_lines:
                return _read_json_lines(files, data.skip_bad_rows, lambda **options: datasets.load_dataset(
                    "json", data_files=[str(f) for f in files], split="train", **options))
            return datasets.load_dataset(str(path), data.dataset_config, split=name), []
        except BadRowError:
            raise
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
    if looks_local(data.dataset_name):  # never tried on the hub (jsft.hub)
        raise no_such_path(data.dataset_name, "data.dataset_name")
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
    """A split of a hub dataset; an unknown split or an unreachable dataset is a ConfigError, at once when the hub
    does not answer (jsft.hub.unreachable_reason: no network retries)."""
    import datasets

    unreachable = None if hub.offline() else hub.unreachable_reason()
    if unreachable is not None:
        raise hub_unreachable(data.dataset_name, "data.dataset_name", unreachable, "hub dataset")
    try:
        return datasets.load_dataset(data.dataset_name, data.dataset_config, split=name)
    except ValueError as e:
        _raise_if_unknown_split(e, data, name, field)
        raise
    except (OSError, datasets.exceptions.DatasetNotFoundError) as e:  # ConnectionError, FileNotFoundError, ...
        raise hub_unreachable(data.dataset_name, "data.dataset_name", e, "hub dataset") from e


def _load_file(path: Path, skip_bad_rows: bool = False, field: str = "data.dataset_name"):
    """(dataset, unreadable) of one data file (the value of config `field`); see read_split for malformed JSON."""
    import datasets

    kind = DATA_FILE_TYPES.get(path.suffix)
    inner = DATA_FILE_TYPES.get(Path(path.stem).suffix) if path.suffix in COMPRESSED else None
    if inner is not None:  # rows.jsonl.gz: datasets decompresses it, as it does a directory of such shards
        try:
            return datasets.load_dataset(inner, data_files=str(path), split="train"), []
        except Exception as e:  # noqa: BLE001 (one line naming the file, not datasets' traceback)
            raise ConfigError(f"{field}={str(path)!r}: datasets cannot read this compressed {inner} file: "
                              f"{' '.join(str(e).split())[:300]}. Fix: check it decompresses (e.g. `zcat {path.name} "
                              "| head`)") from e
    if kind is None:
        raise ConfigError(f"{field}={str(path)!r}: unknown data file type; use one of {', '.join(DATA_FILE_TYPES)} "
                          f"(or one of them compressed: {', '.join(COMPRESSED)})")
    if _is_blank(path, kind):
        raise ConfigError(f"{field}={str(path)!r}: the file is empty (no rows, only blank lines or 0 bytes). Fix: "
                          f"point {field} at a file with rows (was it written completely?)")
    if kind in ("json", "csv"):
        _check_utf8(path, field)
    try:
        if kind == "json" and _is_json_lines(path):
            return _read_json_lines([path], skip_bad_rows, lambda **options: datasets.load_dataset(
                "json", data_files=str(path), split="train", **options))
        return datasets.load_dataset(kind, data_files=str(path), split="train"), []
    except BadRowError:
        raise
    except Exception as e:  # noqa: BLE001 (re-raised unless no rows or a malformed JSON line explains it)
        if "corresponds to no data" in str(e):
            raise ConfigError(f"{field}={str(path)!r}: the file has no rows. Fix: point {field} at a file with "
                              "rows") from e
        if kind != "json":
            raise
        return _read_json_after_failure(path, e, skip_bad_rows)


def _read_json_after_failure(path: Path, error: Exception, skip_bad_rows: bool):
    """(dataset, unreadable) of a JSON file datasets could not read: a malformed line is its BadRowError (skipped
    under skip_bad_rows); lines that all parse are read from a clean copy; else datasets' own error."""
    bad = _malformed_json(path)
    if bad is None and _is_json_lines(path):
        # every line parses, yet datasets failed: its reader for a column whose type varies between rows (content as
        # a string in one row, a list of parts in another) fails on blank lines ("Expected object or value")
        try:
            return _load_clean_copy([path], skip_bad_rows)
        except BadRowError:
            raise
        except Exception:  # noqa: BLE001 (something else: datasets' own error)
            raise error from None
    if bad is None:
        raise error
    if not skip_bad_rows or bad.row_index is None:
        raise bad  # (its cause: the JSONDecodeError; datasets' own error says no more)
    return _load_clean_copy([path], skip_bad_rows)


def _read_json_lines(files: list[Path], skip_bad_rows: bool, read, dropped: frozenset = frozenset(),
                     unreadable: list[BadRowError] = ()):
    """(dataset, unreadable) of JSON-lines files (one file, or a directory split's shards in order) as the files hold
    them. read(**options) loads them with datasets (or a clean copy of them without `dropped` and malformed lines).

    Strictly first (on_mixed_types=None): a field whose type varies between rows then fails instead of being read as
    JSON, which would change other rows' values (jsft.data.mixed_types). Only then are they read the default way and
    compared with the files: a row holding a number where others hold text is the bad row (raised, or skipped under
    skip_bad_rows, and the rest read again); a change no row explains that way is the error."""
    import logging

    json_log = logging.getLogger("datasets.packaged_modules.json.json")
    level = json_log.level
    json_log.setLevel(logging.CRITICAL)  # its ERROR line for the refusal is no error here
    try:
        return read(on_mixed_types=None), list(unreadable)
    except Exception as e:  # noqa: BLE001 (re-raised unless datasets refused a mixed-type field)
        if mixed_types.mixed_field(e) is None:
            raise
    finally:
        json_log.setLevel(level)
    dataset = read()
    damage = mixed_types.decoding_damage(files, dataset, dropped)
    if damage is None:
        return dataset, list(unreadable)
    causes = mixed_types.number_rows(files, damage, dropped)
    if not causes:
        raise damage
    if not skip_bad_rows:
        raise causes[0]
    where = [e.source for e in causes]
    warnings.warn(f"skipped {len(causes)} row(s) holding a number where other rows hold text (data.skip_bad_rows=True)"
                  f": {'; '.join(where[:10])}{' ...' if len(where) > 10 else ''}; they are counted as bad rows",
                  UserWarning, stacklevel=4)
    return _load_clean_copy(files, skip_bad_rows, dropped | {e.row_index for e in causes}, [*unreadable, *causes])


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


def _load_clean_copy(files: list[Path], skip_bad_rows: bool, dropped: frozenset = frozenset(),
                     skipped: list[BadRowError] = ()):
    """(dataset, unreadable): datasets reads one copy of JSON-lines files (a split's, in order) without their blank
    and malformed lines and without the rows `dropped` (by row index in the split, already `skipped`); malformed lines
    are warned about (the caller allows skipping them) and counted with the skipped rows."""
    import tempfile

    import datasets

    malformed: list[BadRowError] = []
    for file in files:  # the malformed lines' errors (a single file: a directory's are raised before)
        for _ in read_jsonl(file, skipped=malformed):
            pass
    if malformed and len(files) == 1 and not skipped:
        lines = [re.search(r"line (\d+)", e.problem).group(1) for e in malformed]
        warnings.warn(
            f"{files[0]}: skipped {len(malformed)} malformed JSON line(s) (data.skip_bad_rows=True): line(s) "
            f"{', '.join(lines[:20])}{' ...' if len(lines) > 20 else ''}; they are counted as bad rows",
            UserWarning, stacklevel=4,
        )
    with tempfile.TemporaryDirectory(prefix="jsft-rows-") as tmp:
        clean = Path(tmp) / "rows.jsonl"
        with open(clean, "w", encoding="utf-8") as f:
            for _, _, _, row in mixed_types.file_rows(files, dropped):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        dataset, unreadable = _read_json_lines(files, skip_bad_rows, lambda **options: datasets.load_dataset(
            "json", data_files=str(clean), split="train", keep_in_memory=True, cache_dir=str(Path(tmp) / "cache"),
            **options), dropped, skipped)
    return dataset, sorted({e.row_index: e for e in [*malformed, *unreadable]}.values(), key=lambda e: e.row_index)


def in_token_cache(path: Path, root: Path) -> bool:
    """A file of jsft's own token caches (CACHE_FILE) inside data directory `root`: a store's files are in a directory
    named like one."""
    return any(CACHE_FILE.fullmatch(part) for part in path.relative_to(root).parts)


def source_fingerprint(data: DataConfig, split: str, dataset) -> dict:
    """Identity of the rows: every local file's path, size and mtime, else the hub name and datasets' fingerprint."""
    name = data.dataset_train_split if split == "train" else data.dataset_test_split
    paths = [Path(name)] if Path(name).is_file() else [Path(data.dataset_name)]
    if not paths[0].exists():
        return {"hub": data.dataset_name, "config": data.dataset_config, "split": name,
                "fingerprint": getattr(dataset, "_fingerprint", None)}
    files = sorted(p for p in paths[0].rglob("*") if p.is_file() and not in_token_cache(p, paths[0])) \
        if paths[0].is_dir() else paths
    return {"split": name, "files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]}
