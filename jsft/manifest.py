"""A checksum manifest of a checkpoint directory: written when a save completes, checked before a restore.

    <step>/jsft_manifest.json   {"version": 1, "hash": "xxh3_128", "files": {"state/_METADATA": [28599, "9f0c.."]}}

Why jsft writes one: Orbax and TensorStore check structure, not bytes. TensorStore's OCDBT manifest and B-tree
nodes and zarr3's shard index carry crc32c checksums, a JSON item must parse, and a missing `_METADATA` fails the
restore; but the array chunks themselves have no checksum, so random bytes in a data file restore as garbage
(NaN) without a word. The manifest holds every file's size and xxh3-128 hash (xxhash, which datasets needs too;
~9 GB/s, so hashing costs about what reading the files back from the page cache does).

Orbax updates `_CHECKPOINT_METADATA` and writes `commit_success.txt` at the top of the step directory when it commits
(after the manifest is written, see jsft.checkpoint.make_manager): those two are left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import xxhash

FILE = "jsft_manifest.json"
VERSION = 1
# Written or changed by Orbax after the manifest (at commit), at the top level of the step directory.
NOT_COVERED = ("_CHECKPOINT_METADATA", "commit_success.txt", FILE)
CHUNK = 16 * 2**20


def _files(directory: Path) -> list[str]:
    names = []
    for root, _, files in os.walk(directory):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), directory)
            if relative not in NOT_COVERED:
                names.append(relative)
    return sorted(names)


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write(directory) -> dict:
    """Hash every file under directory into directory/jsft_manifest.json (written to a temporary name, then renamed:
    a manifest is either whole or absent). Returns the manifest."""
    directory = Path(directory)
    files = {name: [(directory / name).stat().st_size, file_hash(directory / name)] for name in _files(directory)}
    manifest = {"version": VERSION, "hash": "xxh3_128", "files": files}
    partial = directory / (FILE + ".partial")
    with open(partial, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, directory / FILE)
    return manifest


def has_manifest(directory) -> bool:
    return (Path(directory) / FILE).exists()


def check(directory) -> str | None:
    """None when every file the manifest lists is there with its size and hash; else what is wrong, naming the file
    ("state/_METADATA is missing", "... has 12 bytes, 28599 when saved (truncated)", "... differs from what was
    saved (damaged bytes)"). Sizes are checked first (no reading), then hashes. A directory without a manifest: "no
    manifest" (see has_manifest)."""
    directory = Path(directory)
    try:
        files = json.loads((directory / FILE).read_text())["files"]
    except FileNotFoundError:
        return f"{directory / FILE} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{directory / FILE} is unreadable ({type(e).__name__})"
    for name, (size, _) in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{path} has {actual:,} bytes, {size:,} when saved ({'truncated' if actual < size else 'grown'})"
    for name, (_, digest) in files.items():
        if file_hash(directory / name) != digest:
            return f"{directory / name} differs from what was saved (damaged bytes: its checksum does not match)"
    return None
