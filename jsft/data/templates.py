"""The tokenizer and its chat template: the tokenizer's own, a `.jinja` file, or cloned from another tokenizer.

    tokenizer, added_ids = load_tokenizer("path/to/model", config.data)

- config.chat_template_path ending in .jinja / .j2 (an existing file): the template text is used as is, no tokens added.
- config.chat_template_path a tokenizer directory (or hub name): TRL's clone_chat_template. Its template is copied, its added
  tokens missing from this vocabulary are added (ids appended after the current vocabulary), and EOS becomes the
  source's EOS (the token that ends an assistant turn there, e.g. <|im_end|>). `added_ids` lists the new ids so the
  model side resizes embeddings / lm_head (TRL also pads the vocabulary to a multiple of 64 with dummy tokens; jsft
  leaves that padding to the model side and adds no dummy tokens to the tokenizer).
- config.eos_token then config.pad_token override (each must already be in the vocabulary). An explicit eos_token
  wins over the cloned one (in TRL the clone silently overrides it). pad defaults to the tokenizer's pad, else EOS.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from jsft.config import ConfigError, DataConfig


TEMPLATE_SUFFIXES = (".jinja", ".j2")
CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_.\-]+\|>")  # <|eot_id|>, <|im_end|>, <|start_header_id|> ...


def read_template_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.chat_template_path={str(path)!r}: the template file does not exist")
    return path.read_text(encoding="utf-8")


def warn_if_control_tokens_missing(tokenizer, template: str, source: str) -> None:
    """A template written for another model writes its control tokens (<|eot_id|> ...) as text; where this vocabulary
    lacks them they become several ordinary tokens, and the model never sees the real turn markers."""
    vocab = tokenizer.get_vocab()
    missing = sorted({t for t in CONTROL_TOKEN.findall(template) if t not in vocab})
    if missing:
        warnings.warn(
            f"the chat template from {source} writes {', '.join(missing)}, which this tokenizer does not have as "
            "tokens: they are tokenized as plain text. Fix: clone the template from the tokenizer of the model it "
            "was written for (data.chat_template_path=<that tokenizer directory>, which adds its tokens), or use a "
            "template written with this tokenizer's own tokens.",
            UserWarning, stacklevel=3,
        )


def clone_chat_template(tokenizer, source_path: str | Path) -> list[int]:
    """Copy the template and missing added tokens of the tokenizer at `source_path`; set its EOS. Returns new ids."""
    from transformers import AutoTokenizer

    try:  # a local directory, or a hub name where the machine has network
        source = AutoTokenizer.from_pretrained(source_path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"data.chat_template_path={str(source_path)!r} is neither a .jinja/.j2 file nor a tokenizer directory "
            f"(or reachable hub name) to clone the template from: {e}"
        ) from e
    if not source.chat_template:
        raise ConfigError(f"data.chat_template_path={str(source_path)!r}: that tokenizer has no chat template to clone")
    template = source.get_chat_template()
    tokenizer.chat_template = template
    vocab = tokenizer.get_vocab()
    # sorted by the source's ids, so the new ids come out in the source's order
    missing = [token for _, token in sorted(source.added_tokens_decoder.items()) if token.content not in vocab]
    tokenizer.add_tokens(missing)
    tokenizer.eos_token = source.eos_token
    return tokenizer.convert_tokens_to_ids([token.content for token in missing])


def _set_special(tokenizer, name: str, token: str) -> None:
    if token not in tokenizer.get_vocab():
        raise ConfigError(
            f"data.{name}={token!r} is not in the tokenizer's vocabulary: choose an existing token "
            f"(e.g. {tokenizer.eos_token!r}), or clone a template that adds it (data.chat_template_path)"
        )
    setattr(tokenizer, name, token)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TOKENIZER_FIELD = "model.tokenizer_name_or_path (model.model_name_or_path when unset)"


def from_pretrained(path: str | Path, field: str = TOKENIZER_FIELD):
    """AutoTokenizer.from_pretrained(path), with a ConfigError naming `field` when `path` is no tokenizer: a missing
    directory, a directory without tokenizer files (e.g. a checkpoint saved without them), an unreachable hub name."""
    from transformers import AutoTokenizer

    from jsft import hub
    from jsft.hub import check_local_or_hub, hub_unreachable, one_line

    local = check_local_or_hub(path, field)
    unreachable = None if local or hub.offline() else hub.unreachable_reason()
    try:  # the local HF cache only when the hub does not answer (jsft.hub)
        return AutoTokenizer.from_pretrained(path, local_files_only=unreachable is not None)
    except Exception as e:  # noqa: BLE001 (re-raised unless a missing/unreachable tokenizer explains it)
        if not local:
            raise hub_unreachable(path, field, unreachable or e) from e
        if not isinstance(e, (OSError, ValueError)):
            raise
        has = [name for name in TOKENIZER_FILES if (Path(path) / name).exists()]
        problem = "has no tokenizer files" if not has else f"has {', '.join(has)} but no tokenizer loads from it"
        raise ConfigError(
            f"{field}={str(path)!r} {problem} ({type(e).__name__}: {one_line(e, 120)}). Fix: point "
            f"{field.split()[0]} at a "
            f"directory with tokenizer files ({', '.join(TOKENIZER_FILES[:2])}), e.g. the base model's directory"
        ) from e


def load_tokenizer(path: str | Path, config: DataConfig, field: str = TOKENIZER_FIELD):
    """(tokenizer, added_token_ids) for a run: template and special tokens set as the module doc says.
    field: the setting `path` came from, for the error when it is no tokenizer."""
    tokenizer = from_pretrained(path, field)
    added: list[int] = []
    template_path = config.chat_template_path
    if template_path is not None:
        if str(template_path).lower().endswith(TEMPLATE_SUFFIXES):
            tokenizer.chat_template = read_template_file(template_path)
            warn_if_control_tokens_missing(tokenizer, tokenizer.chat_template, str(template_path))
        else:
            added = clone_chat_template(tokenizer, template_path)
    if config.eos_token is not None:
        _set_special(tokenizer, "eos_token", config.eos_token)
    pad = config.pad_token or tokenizer.pad_token or tokenizer.eos_token
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad_token nor an eos_token: set data.pad_token")
    _set_special(tokenizer, "pad_token", pad)
    return tokenizer, added
