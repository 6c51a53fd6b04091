"""The token store: a split's tokenized examples on disk, memory-mapped (the token cache of jsft.data.pipeline).

    <cache_dir>/__examples-<split>-<key>/
        tokens.npy       int32 [T]      example e is tokens[offsets[e]:offsets[e + 1]]
        loss_mask.npy    bool  [T]      unshifted: token i is a trained label
        offsets.npy      int64 [E + 1]
        source_rows.npy  int64 [E]      the dataset row of each example
        meta.npy         a JSON string {"version", "rows_read", "bad_rows"} (.npy like the rest: no data file type)

    with StoreWriter(path) as writer:           # a temporary directory beside `path`
        writer.append(tokens, loss_mask)        # each finished chunk, in row order: appended to the .npy files
        writer.commit(offsets, source_rows, rows_read, bad_rows)   # then renamed into place
    examples = open_store(path)                 # Examples over np.load(mmap_mode="r"): nothing read yet

Writing never holds more than a chunk of tokens (the .npy header is rewritten with the final length at the end;
numpy leaves room in it for that). The directory appears under its name only complete (one rename), so a killed
run leaves a `.__examples-...tmp` directory that no run reads; the next write of that store on the same host removes
it. Reading maps the files: the OS reads only the pages of the rows a process assembles (its shard). Passes over
a whole array (trained-token counts, the data fingerprint) go through `read_range`, plain file reads of bounded
pieces, so the mapped pages do not pile up in the process's resident memory either.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STORE_VERSION = 1
READ_CHUNK = 1 << 22  # elements per piece of a pass over a whole array (4M tokens: 16 MiB of int32)
ARRAYS = {"tokens": np.int32, "loss_mask": np.bool_, "offsets": np.int64, "source_rows": np.int64}


@dataclass
class Examples:
    """Tokenized examples, flat: example e is tokens[offsets[e]:offsets[e + 1]] (what the store holds).

    tokens and loss_mask are memory maps of a store (open_store), or in-memory arrays; offsets and source_rows
    (8 bytes an example each) are always in memory."""

    tokens: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T], unshifted: token i is a trained label
    offsets: np.ndarray  # int64 [E + 1]
    source_rows: np.ndarray  # int64 [E], the dataset row of each example
    rows_read: int
    bad_rows: dict[str, int] = field(default_factory=dict)  # reason -> count (skip_bad_rows)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def read_range(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """array[start:stop] as a new in-memory array; for a store's memory map a plain file read (pages mapped to be
    read once would stay in this process's resident memory until unmapped)."""
    if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap):
        count = max(0, min(stop, len(array)) - start)
        return np.fromfile(array.filename, dtype=array.dtype, count=count, offset=array.offset + start * array.itemsize)
    return np.array(array[start:stop])


def read_chunks(array: np.ndarray, chunk: int = READ_CHUNK):
    """The whole array in consecutive pieces of at most `chunk` elements (read_range)."""
    for start in range(0, len(array), chunk):
        yield read_range(array, start, start + chunk)


class _NpyAppender:
    """A 1-D .npy file written piece by piece: a header for length 0 first, rewritten with the final length."""

    def __init__(self, path: Path, dtype):
        self.dtype, self.count = np.dtype(dtype), 0
        self.file = open(path, "wb")
        self.header_size = self._write_header()

    def _write_header(self) -> int:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.count,)}
        start = self.file.tell()
        np.lib.format.write_array_header_1_0(self.file, header)
        return self.file.tell() - start

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self.file.write(values.data)
        self.count += len(values)

    def close(self) -> None:
        self.file.seek(0)
        if self._write_header() != self.header_size:  # numpy pads the header for in-place growth; never expected
            raise RuntimeError(f"{self.file.name}: the .npy header changed size")
        self.file.close()


def store_path(cache_dir: Path, split: str, key: str) -> Path:
    """`<cache_dir>/__examples-<split>-<key>`: datasets skips directories starting with `__`, so a store in a
    cache_dir inside a directory dataset is never read as rows of a split (it matches `*-train-*/`)."""
    return Path(cache_dir) / f"__examples-{split}-{key}"


class StoreWriter:
    """Writes a store into `.<name>.<host>.<pid>.tmp` beside `path`; commit renames it to `path`. Leaving the
    `with` block without commit (an error, a stop) removes the temporary directory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_writers(self.path)
        self.tmp = self.path.with_name(f".{self.path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.files = {name: _NpyAppender(self.tmp / f"{name}.npy", ARRAYS[name]) for name in ("tokens", "loss_mask")}

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def append(self, tokens: np.ndarray, loss_mask: np.ndarray) -> None:
        """One chunk's tokens and mask, in row order after the previous chunk's."""
        self.files["tokens"].append(tokens)
        self.files["loss_mask"].append(loss_mask)

    def commit(self, offsets: np.ndarray, source_rows: np.ndarray, rows_read: int, bad_rows: dict) -> None:
        """Finish the files and rename the directory into place (another process that finished the same store
        first wins: the stores are the same)."""
        tokens = self.files["tokens"].count
        if offsets[0] != 0 or offsets[-1] != tokens or len(source_rows) != len(offsets) - 1:
            raise ValueError(f"offsets end at {offsets[-1]} for {tokens} tokens written, {len(source_rows)} source "
                             f"rows for {len(offsets) - 1} examples")
        for f in self.files.values():
            f.close()
        np.save(self.tmp / "offsets.npy", np.asarray(offsets, np.int64))
        np.save(self.tmp / "source_rows.npy", np.asarray(source_rows, np.int64))
        meta = {"version": STORE_VERSION, "rows_read": int(rows_read), "bad_rows": dict(bad_rows)}
        np.save(self.tmp / "meta.npy", np.array(json.dumps(meta)))
        try:
            os.rename(self.tmp, self.path)
        except OSError:
            if not (self.path / "meta.npy").exists():
                raise


def _remove_dead_writers(path: Path) -> None:
    """Temporary directories of this store left by killed runs on this host (their process is gone)."""
    host = socket.gethostname()
    for tmp in path.parent.glob(f".{path.name}.{host}.*.tmp"):
        pid = tmp.name[len(f".{path.name}.{host}.") : -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_store(path: Path) -> Examples:
    """The Examples of a complete store: tokens and loss_mask memory-mapped, offsets and source_rows read. Raises
    (ValueError, OSError, KeyError, ...) when a file is missing, damaged or disagrees with the others."""
    path = Path(path)
    meta = json.loads(str(np.load(path / "meta.npy")))
    if meta.get("version") != STORE_VERSION:
        raise ValueError(f"store version {meta.get('version')}, expected {STORE_VERSION}")
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r" if name in ("tokens", "loss_mask") else None)
              for name in ARRAYS}
    for name, dtype in ARRAYS.items():
        if arrays[name].dtype != dtype or arrays[name].ndim != 1:
            raise ValueError(f"{name}.npy holds {arrays[name].dtype} {arrays[name].shape}, expected 1-D {np.dtype(dtype)}")
    offsets = arrays["offsets"]
    if (len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(arrays["tokens"])
            or len(arrays["loss_mask"]) != len(arrays["tokens"]) or len(arrays["source_rows"]) != len(offsets) - 1
            or np.any(np.diff(offsets) < 0)):
        raise ValueError("its arrays disagree in length")
    return Examples(arrays["tokens"], arrays["loss_mask"], offsets, arrays["source_rows"], int(meta["rows_read"]),
                    dict(meta["bad_rows"]))
