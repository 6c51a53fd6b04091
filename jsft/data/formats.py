"""Dataset rows: reading, format detection, validation, pre-tokenized rows, truncation (jsft.data.examples turns rows
into examples: token ids and a per-token "trained" mask, TRL's labels != -100, unshifted).

Formats are detected from the columns, as TRL does (checked in this order):

| columns                                   | format                            |
| ----------------------------------------- | --------------------------------- |
| `input_ids` (+ `labels` / `completion_mask` / `assistant_masks`) | tokenized     |
| `prompt` + `completion`, strings          | prompt_completion                 |
| `prompt` + `completion`, lists of messages| conversational_prompt_completion  |
| `messages` (or ShareGPT `conversations`)  | messages                          |
| `text` (config.dataset_text_field)        | text                              |

Optional columns: `tools` (a list or a JSON string, passed to the template) and `chat_template_kwargs` (a dict).
ShareGPT messages `{"from": "human", "value": ...}` become `{"role": "user", "content": ...}` (gpt -> assistant);
TRL only renames the keys, jsft also maps the role names so ChatML templates see user/assistant.

How an example follows TRL (EOS, BOS, completion start, masks, truncation): jsft.data.examples.

Bad rows raise BadRowError (row index + field + fix). A row must keep at least one trained token after its first
position (the first token of a document is never a target); otherwise it is a bad row too. With
config.skip_bad_rows the pipeline catches BadRowError, counts and reports the row; prepare_example always raises.
ChatTemplateError / ConfigError are never per-row: they are not BadRowError and are never skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from jsft.config import ConfigError, DataConfig

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")  # ipython: Llama 3.1 tool results
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
FORMATS = ("tokenized", "prompt_completion", "conversational_prompt_completion", "messages", "text")


class BadRowError(ValueError):
    """A row that cannot become an example. `row_index` and `field` say where; the message says the fix."""

    def __init__(self, row_index: int | None, field: str, problem: str, fix: str, source: str | None = None):
        self.row_index, self.field, self.problem, self.fix, self.source = row_index, field, problem, fix, source
        where = f"row {row_index}" if row_index is not None else "row (index unknown)"
        where = f"{source}: {where}" if source else where
        super().__init__(f"{where}, field {field!r}: {problem}" + (f". Fix: {fix}" if fix else ""))

    def __reduce__(self):  # picklable, so it crosses worker processes whole
        return (type(self), (self.row_index, self.field, self.problem, self.fix, self.source))


# ----------------------------------------------------------------------------------------------- reading rows


def read_jsonl(path: str | Path, skipped: list | None = None) -> Iterator[dict]:
    """Rows of a JSON-lines file. Blank lines are skipped; a malformed line raises BadRowError with its line number.

    row_index counts rows (non-blank lines) from 0, the same index prepare_example errors use. With a `skipped` list,
    a malformed line is not raised but appended to it (as its BadRowError) and reading goes on; it keeps its row
    index, so later rows keep theirs:

        '{"text": "a"}\\n{"text": \\n{"text": "c"}\\n'  ->  yields rows 0 and 2; skipped = [row 1 (line 2)]
    """
    path = Path(path)
    row_index = 0
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            error = None
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                error = BadRowError(
                    row_index, "json", f"malformed JSON on line {line_number} of {path}: {e.msg} (column {e.pos + 1})",
                    "repair or remove that line (or set skip_bad_rows=True to count and skip it)",
                )
                error.__cause__ = e
            else:
                if not isinstance(row, dict):
                    error = BadRowError(
                        row_index, "json",
                        f"line {line_number} of {path} is a JSON {type(row).__name__}, not an object",
                        'write one JSON object per line, e.g. {"text": "..."}',
                    )
            row_index += 1
            if error is None:
                yield row
            elif skipped is None:
                raise error
            else:
                skipped.append(error)


# ----------------------------------------------------------------------------------------------- detection


def _is_message_list(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict)


def detect_format(row: dict, config: DataConfig, row_index: int | None = None) -> str:
    """One of FORMATS, from the row's columns; BadRowError naming the columns found and expected otherwise.

    Columns whose value is None count as absent first: datasets gives every row every column of the file, so in a
    file mixing formats a text row has prompt=None. Only when that finds no format are they counted (so a text
    column that is None is the row's error about its text, not an unknown format).
    """
    if not isinstance(row, dict):
        raise BadRowError(row_index, "row", f"expected a dict of columns, got {type(row).__name__}",
                          "pass one dict per row")
    filled = {k: v for k, v in row.items() if v is not None}
    if len(filled) < len(row):
        try:
            return _detect(filled, config, row_index)
        except BadRowError:
            pass
    return _detect(row, config, row_index)


def _detect(row: dict, config: DataConfig, row_index: int | None) -> str:
    if "input_ids" in row:
        return "tokenized"
    if "prompt" in row and "completion" in row:
        prompt_conv, completion_conv = _is_message_list(row["prompt"]), _is_message_list(row["completion"])
        if prompt_conv or completion_conv:
            if isinstance(row["completion"], list) and not row["completion"]:
                raise BadRowError(
                    row_index, "completion", "empty completion (an empty list of messages)",
                    "give the completion at least one assistant message, or drop the row",
                )
            if not (prompt_conv and completion_conv):
                conv, plain = ("prompt", "completion") if prompt_conv else ("completion", "prompt")
                raise BadRowError(
                    row_index, plain,
                    f"{conv!r} is a list of messages but {plain!r} is {type(row[plain]).__name__}",
                    "use lists of {role, content} messages for both, or strings for both",
                )
            return "conversational_prompt_completion"
        return "prompt_completion"
    if "messages" in row or "conversations" in row:
        return "messages"
    if config.dataset_text_field in row:
        return "text"
    if "prompt" in row:
        raise BadRowError(
            row_index, "completion", "the row has a 'prompt' but no 'completion' (prompt-only rows cannot be trained)",
            "add a 'completion' column",
        )
    raise BadRowError(
        row_index, "columns",
        f"unknown dataset format: the row has columns {sorted(row)}; expected one of "
        f"{config.dataset_text_field!r} (text), 'prompt'+'completion', 'messages', 'conversations' (ShareGPT), "
        "or 'input_ids' (pre-tokenized)",
        "rename the columns, or set dataset_text_field to the text column",
    )


# ----------------------------------------------------------------------------------------------- validation


def check_messages(messages, row_index: int | None, field: str) -> list[dict]:
    """Validated role/content messages (ShareGPT from/value converted). BadRowError names e.g. 'messages[2].role'."""
    if not isinstance(messages, list) or not messages:
        raise BadRowError(
            row_index, field, f"expected a non-empty list of messages, got {type(messages).__name__} {messages!r:.80}",
            'write [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]',
        )
    checked = []
    for j, message in enumerate(messages):
        if type(message) is dict and type(message.get("content")) is str and message.get("role") in KNOWN_ROLES and \
                (message["role"] != "assistant" or message["content"].strip()):
            checked.append(dict(message))  # the common message: a known role and string content (no ShareGPT)
            continue
        where = f"{field}[{j}]"
        if not isinstance(message, dict):
            raise BadRowError(
                row_index, where, f"a message must be a dict, got {type(message).__name__}",
                'write each message as {"role": ..., "content": ...}',
            )
        message = dict(message)
        if "role" not in message and "from" in message:  # ShareGPT
            value = message.pop("from")
            message["role"] = SHAREGPT_ROLES.get(value, value)
            if "value" in message:
                message["content"] = message.pop("value")
        role = message.get("role")
        if role is None:
            raise BadRowError(
                row_index, f"{where}.role", "missing role", f"give every message a role: one of {', '.join(KNOWN_ROLES)}"
            )
        if role not in KNOWN_ROLES:
            raise BadRowError(
                row_index, f"{where}.role", f"unknown role {role!r}",
                f"use one of {', '.join(KNOWN_ROLES)} (ShareGPT: human, gpt, system)",
            )
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            pass  # an assistant turn that only calls tools
        elif isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
            kinds = sorted({str(p.get("type")) for p in content} - {"text"})
            if kinds or not all(isinstance(p.get("text"), str) for p in content):
                got = ", ".join(kinds) if kinds else "a text part whose text is not a string"
                raise BadRowError(
                    row_index, f"{where}.content",
                    f"content parts must be text parts {{'type': 'text', 'text': str}}; got {got}",
                    "keep only text parts (jsft trains text models), or write the message text as a string",
                )
            # text parts go to the template as they are (TRL's behaviour); the template must handle them
        elif not isinstance(content, str):
            raise BadRowError(
                row_index, f"{where}.content",
                f"content must be a string, got {type(content).__name__} {content!r:.80}",
                "write the message text as a string",
            )
        if role == "assistant" and _empty_turn(message):
            raise BadRowError(
                row_index, f"{where}.content",
                "empty assistant message (no text, reasoning or tool call): it would train only the end-of-turn token",
                "write the assistant's answer, or drop the row (skip_bad_rows=True counts and skips such rows)",
            )
        checked.append(message)
    return checked


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the names chat templates read reasoning under


def _empty_turn(message: dict) -> bool:
    """An assistant message with only whitespace in its content and reasoning fields, and no tool call."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content)
    texts = [content, *(message.get(f) for f in REASONING_FIELDS)]
    return not message.get("tool_calls") and all(not (isinstance(t, str) and t.strip()) for t in texts)


def _string(row: dict, field: str, row_index: int | None) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise BadRowError(
            row_index, field, f"expected a string, got {type(value).__name__} {value!r:.80}", "write the text as a string"
        )
    return value


# apply_chat_template's own arguments: a chat_template_kwargs key with one of these names would not reach the template.
APPLY_CHAT_TEMPLATE_ARGUMENTS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens",
})


def _template_inputs(row: dict, row_index: int | None) -> tuple[list | None, dict]:
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise BadRowError(row_index, "tools", f"malformed JSON: {e.msg}", "write tools as a JSON list") from e
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        got = type(tools).__name__ if not isinstance(tools, list) else \
            f"a list holding {type(next(t for t in tools if not isinstance(t, dict))).__name__}"
        raise BadRowError(
            row_index, "tools", f"expected a list of tool schemas (dicts), got {got}",
            "write tools as a list of JSON schemas (or a JSON string of one)",
        )
    kwargs = row.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise BadRowError(
            row_index, "chat_template_kwargs", f"expected a dict, got {type(kwargs).__name__}",
            'write the template variables as a dict, e.g. {"enable_thinking": false}',
        )
    reserved = sorted(set(kwargs) & APPLY_CHAT_TEMPLATE_ARGUMENTS)
    if reserved:
        raise BadRowError(
            row_index, "chat_template_kwargs", f"{', '.join(map(repr, reserved))} is an argument of "
            "apply_chat_template, not a template variable",
            "remove it (jsft sets the conversation, tools, generation prompt and tokenization itself)",
        )
    return tools, kwargs


# ----------------------------------------------------------------------------------------------- tokenization


def _add_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _eos(tokenizer) -> str:
    if not tokenizer.eos_token:
        raise ConfigError("the tokenizer has no eos_token: set data.eos_token to the token that ends a document")
    return tokenizer.eos_token


def _tokenized(row: dict, tokenizer, completion_only: bool, row_index) -> tuple[list[int], np.ndarray]:
    ids = row["input_ids"]
    if not isinstance(ids, (list, tuple, np.ndarray)) or len(ids) == 0:
        raise BadRowError(row_index, "input_ids", "expected a non-empty list of token ids", "drop the row or tokenize it")
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise BadRowError(
            row_index, "input_ids", "expected a flat list of integers, got " + (
                f"a nested list ({ids.ndim} dimensions)" if ids.ndim != 1 else f"dtype {ids.dtype}"),
            "store token ids as one list of ints per row",
        )
    if ids.min() < 0 or ids.max() >= len(tokenizer):
        raise BadRowError(
            row_index, "input_ids", f"token ids must lie in [0, {len(tokenizer)}), got {ids.min()}..{ids.max()}",
            "tokenize with the same tokenizer the run uses",
        )

    def column(name: str) -> np.ndarray:
        values = np.asarray(row[name])
        if values.shape != ids.shape:
            raise BadRowError(
                row_index, name, f"has {values.size} entries but input_ids has {ids.size}", "give one entry per token"
            )
        return values

    if row.get("labels") is not None:
        labels = column("labels")
        bad = (labels != -100) & (labels != ids)
        if bad.any():
            i = int(np.argmax(bad))
            raise BadRowError(
                row_index, "labels",
                f"labels[{i}]={labels[i]} is neither -100 nor input_ids[{i}]={ids[i]} (labels are unshifted copies)",
                "set labels to input_ids with -100 on untrained tokens; the shift happens later",
            )
        return ids.tolist(), labels != -100
    mask = np.ones(ids.shape, dtype=np.bool_)
    if completion_only and row.get("completion_mask") is not None:
        mask &= column("completion_mask").astype(bool)
    if row.get("assistant_masks") is not None:
        mask &= column("assistant_masks").astype(bool)
    return ids.tolist(), mask


# ----------------------------------------------------------------------------------------------- the example


def truncate(ids: np.ndarray, mask: np.ndarray, max_length: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """keep_start keeps the first max_length tokens, keep_end the last (TRL's truncation_mode).

    >>> truncate(np.arange(5), np.ones(5, bool), 3, "keep_end")[0].tolist()
    [2, 3, 4]
    """
    if mode == "keep_start":
        return ids[:max_length], mask[:max_length]
    if mode == "keep_end":
        return ids[-max_length:], mask[-max_length:]
    raise ConfigError(f"data.truncation_mode={mode!r}: choose keep_start or keep_end")
