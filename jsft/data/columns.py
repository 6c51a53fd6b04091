"""The loss settings checked against a dataset's columns (and first row), before any tokenizing."""

from __future__ import annotations

from jsft.config import SFTConfig
from jsft.errors import ConfigError


def check_data_compatibility(config: SFTConfig, columns, first_row: dict | None = None) -> None:
    """Refuse loss settings the dataset cannot satisfy, once its columns (and a first row) are known.

    assistant_only_loss needs conversational data: a `messages` or `conversations` column, a conversational
    prompt/completion (lists of {"role", "content"} messages; pass `first_row` to detect it), or pre-tokenized
    `assistant_masks`. completion_only_loss=True needs a `completion` column or a pre-tokenized `completion_mask`.
    Pre-tokenized `labels` satisfy both: they are the trained mask, used as is (jsft.data.formats).
    Example: check_data_compatibility(cfg, ["text"]) with data.assistant_only_loss=True raises ConfigError.
    jsft.data.pipeline and jsft.data.streaming call it as soon as a split's rows (or the first row) are known, before
    tokenizing.
    """
    columns = set(columns)
    d = config.data

    def conversational(row) -> bool:  # TRL's is_conversational
        for key in ("prompt", "completion", "messages"):
            value = row.get(key) if row else None
            if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
                return True
        return False

    pretokenized = {"assistant_masks", "completion_mask", "labels"} if "input_ids" in columns else set()
    if d.assistant_only_loss:
        ok = bool(columns & ({"messages", "conversations"} | (pretokenized - {"completion_mask"}))) or \
            conversational(first_row)
        if not ok:
            raise ConfigError(
                f"data.assistant_only_loss=True, but the dataset (columns {sorted(columns)}) is not conversational: "
                "it needs a messages / conversations column or a conversational prompt/completion. Set "
                "data.assistant_only_loss=False (or completion_only_loss for prompt/completion data)."
            )
    if d.completion_only_loss is True and not columns & ({"completion"} | (pretokenized - {"assistant_masks"})):
        raise ConfigError(
            f"data.completion_only_loss=True, but the dataset (columns {sorted(columns)}) has no completion: it "
            "needs prompt + completion columns (or a pre-tokenized completion_mask). Set "
            "data.completion_only_loss=None (automatic) or False."
        )
    known = {"messages", "conversations", "prompt", "completion", "input_ids"}
    if not columns & known and d.dataset_text_field not in columns:
        raise ConfigError(
            f"data.dataset_text_field={d.dataset_text_field!r} is not a column of the dataset (columns "
            f"{sorted(columns)}), and no other format was detected: set data.dataset_text_field to the text column."
        )
