"""The output directory of a run: one writer at a time, writable, and the disk space its files need.

    with claim(output_dir):      # <output_dir>/jsft.lock holds {"pid", "host", "started", "command"}
        ...                      # a second run on the same output_dir fails at once, naming the first

A lock left by a process that is gone (same host, its PID no longer running: a SIGKILL, a crash of the machine) is
taken over with a message. A lock from another host cannot be checked from here: the error says which host and PID
hold it, and to delete the file if that run is over. Only process 0 of a multi-process run takes the lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = "jsft.lock"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How TensorStore (checkpoints: RESOURCE_EXHAUSTED, which alone can also mean device memory) and safetensors
# (exports) word a full disk.
DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "os_error_code='28'", "StorageFull")


class OutputDirError(ValueError):
    """logging.output_dir (or an export directory) cannot be written: in use by another run, read-only, not a
    directory, or its disk is full. The message names the path and the fix."""


# ----------------------------------------------------------------------------------------------- the lock


def _lock_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)[:500]}


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, as another user
        return True
    return True


def _open_exclusive(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


def make_dir(output_dir, field: str = "logging.output_dir") -> Path:
    """output_dir, created with its parents; OutputDirError when a file is in the way or it cannot be created."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputDirError(f"{field}={out} is a file, not a directory: choose another {field} (or move the "
                             "file away)") from None
    except NotADirectoryError:
        parent = next((p for p in out.parents if p.exists() and not p.is_dir()), out.parent)
        raise OutputDirError(f"{field}={out}: {parent} is a file, not a directory: choose another {field}") from None
    except OSError as e:
        raise OutputDirError(f"{field}={out} cannot be created ({e.strerror}): choose a writable {field}") from None
    return out


def acquire(output_dir, field: str = "logging.output_dir") -> Path:
    """Create <output_dir>/jsft.lock for this process; OutputDirError when a live run holds it or the directory is
    not writable. Returns the lock file's path (see release)."""
    out = make_dir(output_dir, field)
    path = out / LOCK_FILE
    for _ in range(3):  # a stale lock is removed, then taken: twice more at most if another run races us to it
        try:
            fd = _open_exclusive(path)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                continue  # removed meanwhile, or empty: try again
            if not _is_stale(holder):
                raise OutputDirError(_in_use(out, path, holder, field)) from None
            print(f"output_dir: taking over the lock {path} of a run that is gone (PID {holder.get('pid')} on "
                  f"{holder.get('host')}, started {holder.get('started')}, no longer running)")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        except IsADirectoryError:
            raise OutputDirError(f"{path} is a directory: remove it (jsft keeps its lock file there)") from None
        except OSError as e:
            raise OutputDirError(f"{field}={out} is not writable ({e.strerror}): make it writable or choose "
                                 f"another {field}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(_lock_record(), f)
        return path
    raise OutputDirError(f"could not take the lock {path}: another run keeps taking it; choose another {field}")


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # half-written by a run killed while it took the lock (or not jsft's): wait a moment for a writer
        time.sleep(0.2)
        try:
            holder = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": None, "host": socket.gethostname(), "started": "?", "unreadable": True}
    return holder if isinstance(holder, dict) else {"pid": None, "host": socket.gethostname(), "unreadable": True}


def _is_stale(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return False  # another machine's process: cannot tell from here
    pid = holder.get("pid")
    return not isinstance(pid, int) or not _pid_running(pid)


def _in_use(out: Path, path: Path, holder: dict, field: str) -> str:
    who = f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
    command = f" ({holder['command']})" if holder.get("command") else ""
    here = holder.get("host") == socket.gethostname()
    then = ("wait for it to finish or stop it" if here else
            f"if that run is over (this machine cannot check {holder.get('host')}'s processes), delete {path}")
    return (f"{field}={out} is in use by another jsft run: {who}{command}. Two runs writing one output_dir mix "
            f"their checkpoints, metrics and exports: {then}, or choose another {field}")


def release(path: Path | None) -> None:
    """Remove the lock file when it is still this process's."""
    if path is None:
        return
    holder = _read_lock(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def claim(output_dir, enabled: bool = True, field: str = "logging.output_dir"):
    """acquire ... release around a block (enabled=False: nothing, e.g. on processes other than 0)."""
    path = acquire(output_dir, field) if enabled else None
    try:
        yield path
    finally:
        release(path)


# ----------------------------------------------------------------------------------------------- disk space


def is_disk_full(error: BaseException) -> bool:
    """A full disk or quota somewhere in the error or its causes (OSError ENOSPC/EDQUOT, TensorStore's
    RESOURCE_EXHAUSTED "No space left on device", safetensors' StorageFull)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if any(words in str(error) for words in DISK_FULL_WORDS):
            return True
        error = error.__cause__ or error.__context__
    return False


def free_bytes(path) -> int:
    """Free bytes on the disk holding path (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def tree_bytes(path) -> int:
    """Bytes of the files under path (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"
