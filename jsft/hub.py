"""Local paths and hub names: which one a setting's value is, and the errors when it is neither.

A value that looks like a path is never tried on the hub (a mistyped `data/chat.jsnol` is no hub dataset, and trying
it costs half a minute of network retries): it starts with ./ ../ / or ~, has more than one "/", a file suffix
(.jsonl, .parquet, .safetensors, ...), or a parent directory that exists. Its error says what exists nearby:

    data.dataset_name='data/chat.jsnol': no such file or directory (did you mean data/chat.jsonl?)

Before a hub name is tried, one short request checks that the hub answers at all (HUB_PROBE_TIMEOUT seconds): behind
a refusing proxy or with no network, jsft says so at once instead of after huggingface_hub's retries (about 25 s for
a dataset). Models and tokenizers then still load from the local HF cache; a dataset needs HF_HUB_OFFLINE=1 for that
(datasets has no per-call switch). With HF_HUB_OFFLINE=1 nothing is probed.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path

from jsft.config import ConfigError

# A hub repo id: "name" or "org/name" (letters, digits, '-', '_', '.'); anything else can only be a local path.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# Suffixes of files a user points a setting at (data files, weights): such a value is a path, never a repo id.
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt", ".gz", ".zip", ".tar", ".safetensors",
                 ".bin", ".pt", ".gguf", ".jinja", ".j2", ".yaml", ".yml", ".py")
HUB_PROBE_TIMEOUT = 5.0  # seconds for the one request that tells a reachable hub from none


def looks_local(value) -> bool:
    """True when `value` can only mean a local path (module doc); False for a plausible hub name like 'org/name'."""
    text = str(value)
    if not HUB_NAME.fullmatch(text):  # empty, ./ ../ / ~, a backslash, more than one "/"
        return True
    return text.lower().endswith(FILE_SUFFIXES) or ("/" in text and Path(text).parent.is_dir())


def nearby(value) -> str:
    """What exists near a missing path, for its error: the closest names in its nearest existing directory."""
    text = str(value)
    if text.startswith("~") and Path(text).expanduser().exists():
        return f"jsft does not expand '~': write the full path, {Path(text).expanduser()}"
    path = Path(text)
    missing, parent = path.name, path.parent
    while not parent.is_dir() and parent != parent.parent:
        missing, parent = parent.name, parent.parent
    if not parent.is_dir():
        return ""
    names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    where = "the current directory" if str(parent) == "." else f"{parent}/"
    close = difflib.get_close_matches(missing, names, n=2, cutoff=0.75)
    if close:
        return "did you mean " + " or ".join(str(parent / c) if str(parent) != "." else c for c in close) + "?"
    if not names:
        return f"{where} is empty"
    return f"{where} holds {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"


def no_such_path(value, field: str, what: str = "file or directory") -> ConfigError:
    """The ConfigError for a local-looking value that does not exist: the path, what is nearby, the fix."""
    near = nearby(value)
    return ConfigError(f"{field}={str(value)!r}: no such {what}" + (f" ({near})" if near else "") +
                       f". Fix: correct the path (relative paths start at {Path.cwd()})")


def check_local_or_hub(path, field: str) -> bool:
    """True when `path` (the value of config field `field`) is a local directory, False when it can only be a hub
    name; ConfigError when it is neither (a missing path, or a file)."""
    local = Path(path)
    if local.is_dir():
        return True
    if local.exists():
        raise ConfigError(f"{field}={str(path)!r} is a file: point it at the directory that holds the model's files")
    if looks_local(path):
        raise no_such_path(path, field.split()[0], "directory (an HF checkpoint or tokenizer, or a hub name such as "
                                                   "'org/name')")
    return False


def one_line(error: Exception, limit: int = 300) -> str:
    """An exception's message on one line, without its final period, cut at `limit` characters (for messages)."""
    text = " ".join(str(error).split()).rstrip(".")
    return text if len(text) <= limit else text[:limit] + " ..."


def hub_unreachable(path, field: str, error: Exception, kind: str = "hub name") -> ConfigError:
    """The ConfigError for a value that is no local path and could not be loaded from the hub."""
    fix = f"point {field.split()[0]} at a local " + ("file or directory" if kind == "hub dataset" else "directory") + \
        " with the files, or download them first where there is network (`hf download <name>" + \
        (" --repo-type dataset`)" if kind == "hub dataset" else "`)")
    if kind == "hub dataset":
        fix += "; a dataset already in the local HF cache loads with HF_HUB_OFFLINE=1"
    return ConfigError(
        f"{field}={str(path)!r} is no local path, and this machine could not load it as a {kind} (offline, behind a "
        f"proxy, HF_HUB_OFFLINE=1, or a private/gated repo without a token?): {type(error).__name__}: "
        f"{one_line(error)}. Fix: {fix}"
    )


def offline() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) as huggingface_hub read it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=1)
def unreachable_reason() -> Exception | None:
    """None when the hub answers one HEAD request within HUB_PROBE_TIMEOUT (any status below 500), else the error
    (DNS failure, connection refused, a proxy's refusal, a timeout, a 5xx). Asked once per process; never offline."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        response = get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
    except Exception as e:  # noqa: BLE001 (whatever the HTTP client raises means: no hub from here)
        return e
    if response.status_code >= 500:
        return ConnectionError(f"{constants.ENDPOINT} answered HTTP {response.status_code}")
    return None
