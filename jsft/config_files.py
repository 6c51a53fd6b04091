"""Reading a run's config: a configs/<name>.py file, a TRL YAML/JSON, TRL flags, --set overrides.

    config = load("configs/llama3.py", ["training.learning_rate=1e-4"], {"max_length": 4096})

Here, not in jsft.config, because it reads TRL files through jsft.trl_config, which builds on jsft.config.
"""

from __future__ import annotations

import re
from pathlib import Path

from jsft import trl_config
from jsft.config import SECTIONS, SFTConfig, apply_override, did_you_mean
from jsft.validate import validate
from jsft.errors import ConfigError


def load_config_file(path: str | Path) -> SFTConfig:
    """A Python file defining `config` (an SFTConfig), or a TRL SFTConfig saved as YAML/JSON."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.suffix in (".yaml", ".yml", ".json"):
        return trl_config.from_trl_file(path)
    namespace: dict = {"__file__": str(path), "__name__": "jsft_config"}
    try:
        exec(compile(path.read_text(), str(path), "exec"), namespace)
    except ConfigError:
        raise
    except SyntaxError as e:  # the file does not parse: its line and Python's one-line reason
        raise ConfigError(f"{path}, line {e.lineno}: {type(e).__name__}: {e.msg}" +
                          (f": {e.text.strip()}" if e.text and e.text.strip() else "")) from e
    except Exception as e:  # noqa: BLE001 (the config's own code failed: name its line, not a traceback)
        raise _config_code_error(path, e) from e
    config = namespace.get("config")
    if not isinstance(config, SFTConfig):
        raise ConfigError(f"{path} must define `config = SFTConfig(...)`; found {type(config).__name__}")
    return config


def _config_code_error(path: Path, error: Exception) -> ConfigError:
    """A config file whose code raised: SectionConfig(unknown_field=...) names the field (and what is close); any
    other error names the file's line where it happened and the error's one-line message."""
    match = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(error))
    if isinstance(error, TypeError) and match:
        cls, name = match.groups()
        section = {c.__name__: n for n, c in SECTIONS.items()}.get(cls)
        if cls == "SFTConfig":
            return ConfigError(f"{path}: unknown config section {name!r}{did_you_mean(name)}: use one of "
                               f"{', '.join(SECTIONS)}")
        if section is not None:
            return ConfigError(f"{path}: unknown field {section}.{name}{did_you_mean(section, name)}")
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename) == path]
    where = f", line {frames[-1].lineno}" if frames else ""
    code = f" (in: {frames[-1].line.strip()})" if frames and frames[-1].line else ""
    message = " ".join(str(error).split())
    return ConfigError(f"{path}{where}: {type(error).__name__}{': ' + message if message else ''}{code}. Fix: "
                       "correct the config file there (JSFT_TRACEBACK=1 shows the traceback)")


def load(path: str | Path | None, overrides: list[str] = (), trl_flags: dict | None = None) -> SFTConfig:
    """Config file + TRL flags (`--learning_rate 1e-4`, jsft.trl_config.parse_flags) + --set overrides, validated.

    A TRL YAML/JSON and the flags are one set of TRL fields (flags win); on a jsft .py config the flags change only
    what they name. No file: the flags alone are the TRL config, as with `trl sft --model_name_or_path ...`."""
    trl_flags = trl_flags or {}
    if path is None:
        config = trl_config.from_trl_dict(trl_flags)
    elif Path(path).suffix in (".yaml", ".yml", ".json") and Path(path).exists():
        try:
            config = trl_config.from_trl_dict({**trl_config.read_trl_file(path), **trl_flags})
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    else:
        config = trl_config.apply_trl_flags(load_config_file(path), trl_flags)
    for text in overrides:
        apply_override(config, text)
    return validate(config)
