"""Dataset rows -> examples: token ids and a per-token "trained" mask (TRL's labels != -100, unshifted).

    prepare_examples(rows, tokenizer, config)   # [example or BadRowError] in row order: the pipeline's call
    prepare_example(row, tokenizer, config)     # one row: a batch of one; raises the row's BadRowError

Each row is checked (jsft.data.formats: format, messages, tools) and becomes a job of its format; the jobs of one
format are prepared together (jsft.data.batched, the only implementation of row -> tokens and masks). When a batch
fails (a template that refuses one conversation), its rows are prepared one by one to pin the failing row, which
gets its error: a BadRowError naming the row, the field and why (skippable with skip_bad_rows), or a
ChatTemplateError naming the row when the template cannot give assistant masks at all (never skipped).

TRL semantics:
- text / prompt_completion: EOS appended as a string unless the text already ends with it; tokenized with the
  tokenizer's special tokens (BOS where the tokenizer adds one). Text that already starts with the BOS string keeps
  one BOS (TRL would give two).
- prompt/completion: the completion starts where the tokenized prompt and the tokenized prompt+completion diverge.
  Conversational: the prompt is rendered with add_generation_prompt=True.
- completion_only_loss None: on for prompt/completion rows, off otherwise (a tokenized `completion_mask` is used only
  when completion_only_loss=True). assistant_only_loss: the template's assistant mask (see jsft.data.chat).
- Pre-tokenized `labels` are used as is (trained where != -100); otherwise `assistant_masks` always applies.
- max_length without packing: truncation (keep_start / keep_end). With packing the full example is returned.

A row is one document, except a conversation whose template renders a turn differently once later turns follow
(data.split_conversations="auto", chat.turn_documents): its example then holds several documents end to end and
`document_lengths` says where each ends (the pipeline makes each its own example; never train them as one sequence).
Every document must keep at least one trained token after its first position (the first token of a document is
never a target); otherwise the row is bad.
"""

from __future__ import annotations

import warnings

import numpy as np

from jsft.config import ConfigError, DataConfig
from jsft.data import batched, chat, formats
from jsft.data.batched import CONVERSATIONAL_PC, MESSAGES, PROMPT_COMPLETION, TEXT
from jsft.data.formats import BadRowError

TOKENIZED = "tokenized"
FIELD = {PROMPT_COMPLETION: "completion", CONVERSATIONAL_PC: "completion", MESSAGES: "messages"}


def _job(row, tokenizer, config: DataConfig, row_index: int):
    """(format, inputs of batched.prepare_jobs) of a row; for a pre-tokenized row (format, [(ids, mask)]).
    BadRowError / ConfigError for a row that cannot be one."""
    fmt = formats.detect_format(row, config, row_index)
    completion_only = config.completion_only_loss
    if completion_only is None:
        completion_only = fmt in (PROMPT_COMPLETION, CONVERSATIONAL_PC)
    conversational = fmt in (MESSAGES, CONVERSATIONAL_PC)
    if config.assistant_only_loss and not conversational and not (
            fmt == TOKENIZED and (row.get("assistant_masks") is not None or row.get("labels") is not None)):
        raise ConfigError(
            f"data.assistant_only_loss=True needs conversational rows ('messages' or lists of messages), but row "
            f"{row_index} is {fmt} data. Set assistant_only_loss=False (prompt/completion data: use "
            "completion_only_loss), or convert the data to messages."
        )
    if fmt == TOKENIZED:
        return fmt, [formats._tokenized(row, tokenizer, completion_only, row_index)]
    if fmt == TEXT:
        return fmt, formats._add_eos(formats._string(row, config.dataset_text_field, row_index),
                                     formats._eos(tokenizer))
    if fmt == PROMPT_COMPLETION:
        prompt, completion = formats._string(row, "prompt", row_index), formats._string(row, "completion", row_index)
        if completion == "":
            raise BadRowError(row_index, "completion", "empty completion", "give the row a completion, or drop it")
        return fmt, (prompt, prompt + formats._add_eos(completion, formats._eos(tokenizer)))
    options = formats._template_inputs(row, row_index)  # (tools, template kwargs) of the row
    if not tokenizer.chat_template:
        raise ConfigError(
            f"row {row_index} is conversational but the tokenizer has no chat template: set data.chat_template_path "
            "to a .jinja file or to a tokenizer directory to clone the template from"
        )
    if not tokenizer.eos_token:
        raise ConfigError(no_eos_message(tokenizer))
    if fmt == MESSAGES:
        field = "messages" if "messages" in row else "conversations"
        return fmt, (formats.check_messages(row[field], row_index, field), options)
    prompt = formats.check_messages(row["prompt"], row_index, "prompt")
    return fmt, ((prompt, prompt + formats.check_messages(row["completion"], row_index, "completion")), options)


def no_eos_message(tokenizer) -> str:
    """The tokenizer has no EOS: an exported model's generate() would never stop (config.json eos_token_id null)."""
    turn_end = end_of_turn_token(tokenizer)
    example = f"data.eos_token={turn_end!r} (the template's end-of-turn token)" if turn_end else \
        "data.eos_token to the token that ends an assistant turn in the template"
    return ("the tokenizer has no eos_token, so the exported model's config would say eos_token_id: null and "
            f"generate() would never stop. Fix: set {example}")


def _row_error(e: Exception, row_index: int, field: str) -> BadRowError:
    """A row's failure inside the template as its BadRowError; a ChatTemplateError is raised with the row's index, a
    template that does not compile as a ConfigError."""
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    if isinstance(e, batched.TemplateFailure):
        if isinstance(e.error, TemplateSyntaxError):
            raise ConfigError(f"the chat template does not compile: {e.error} (line {e.error.lineno}). Fix: repair "
                              "the template (data.chat_template_path, or the tokenizer's chat_template)") from e.error
        e = e.error
    if isinstance(e, chat.AssistantFirstError):
        return BadRowError(
            row_index, f"{field}[0]", str(e),
            "start the conversation with a user (or system) message, add {% generation %} markers to the template, "
            "or drop the row",
        )
    if isinstance(e, chat.ChatTemplateError):
        raise chat.ChatTemplateError(f"row {row_index}: {e}") from e
    if isinstance(e, TemplateError):  # the template itself refused this conversation (raise_exception in it)
        return BadRowError(
            row_index, field, f"the chat template refused this conversation: {e}",
            "fix the conversation (e.g. roles must alternate for this template), or drop the row",
        )
    return BadRowError(
        row_index, field, f"the chat template failed on this conversation: {type(e).__name__}: {e}",
        "check the row's messages (roles, content, tool_calls) and tools against what the template expects, "
        "or drop the row",
    )


def _documents(fmt: str, inputs: list, tokenizer, config: DataConfig, rows: list[tuple]) -> list:
    """Per job, its documents [(ids, mask)], or its row's BadRowError (rows: each job's (row index, field)). A batch
    whose template fails is retried row by row, so the error lands on the row that caused it; any other exception is
    no row's and propagates."""
    try:
        ids, mask, lengths, owner = batched.prepare_jobs(fmt, inputs, tokenizer, config)
    except (batched.TemplateFailure, chat.ChatTemplateError) as e:  # the template's, on one of these rows
        if len(inputs) == 1:
            error = _row_error(e, *rows[0])
            error.__cause__ = e
            return [error]
        return [d for job, row in zip(inputs, rows) for d in _documents(fmt, [job], tokenizer, config, [row])]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    per_job: list[list] = [[] for _ in inputs]
    for d, j in enumerate(owner):
        per_job[j].append((ids[bounds[d]:bounds[d + 1]], mask[bounds[d]:bounds[d + 1]]))
    return per_job


def _example(documents: list, fmt: str, config: DataConfig, row_index: int, field: str):
    """The row's example from its documents, truncated per document (max_length without packing), or its
    BadRowError when a document has no trained target."""
    pieces = []
    for ids, mask in documents:
        ids, mask = np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.bool_)
        full_length, trained_before = len(ids), bool(mask[1:].any())
        trained = trained_before
        if config.max_length is not None and not config.packing:
            ids, mask = formats.truncate(ids, mask, config.max_length, config.truncation_mode)
            trained = bool(mask[1:].any())
        if not trained:
            if trained_before:
                problem = (
                    f"no trained token is left after truncation to max_length={config.max_length} "
                    f"({config.truncation_mode}; the row has {full_length} tokens)"
                )
                fix = "raise max_length, switch truncation_mode, or set skip_bad_rows=True to count and skip such rows"
            else:
                problem = "the row has no trained token after its first position (nothing to learn)"
                fix = "check the masks / completion of this row, or set skip_bad_rows=True to count and skip it"
                if fmt in (MESSAGES, CONVERSATIONAL_PC) and config.assistant_only_loss and not mask.any():
                    problem = "assistant_only_loss=True but the conversation has no assistant tokens"
                    fix = "add an assistant message, or drop the row"
            return BadRowError(row_index, "loss_mask" if fmt == TOKENIZED else field, problem, fix)
        pieces.append((ids, mask))
    if len(pieces) == 1:
        return {"input_ids": pieces[0][0], "loss_mask": pieces[0][1]}
    example = {"input_ids": np.concatenate([i for i, _ in pieces]), "loss_mask": np.concatenate([m for _, m in pieces])}
    example["document_lengths"] = np.array([len(i) for i, _ in pieces], dtype=np.int64)
    return example


def prepare_examples(rows: list[dict], tokenizer, config: DataConfig, first_index: int = 0) -> list:
    """Per row (row index first_index + k), its example {"input_ids": int32[n], "loss_mask": bool[n]} (and
    "document_lengths" for a split conversation, module doc), or its BadRowError. ConfigError and ChatTemplateError
    are raised: they are no row's fault."""
    results: list = [None] * len(rows)

    def index(k: int) -> int | None:
        return None if first_index is None else first_index + k

    jobs: dict[str, tuple[list, list]] = {}  # format -> (row positions, inputs)
    for k, row in enumerate(rows):
        try:
            fmt, inputs = _job(row, tokenizer, config, index(k))
        except BadRowError as e:
            results[k] = e
            continue
        if fmt == TOKENIZED:
            results[k] = _example(inputs, fmt, config, index(k), "loss_mask")
            continue
        where, job_inputs = jobs.setdefault(fmt, ([], []))
        where.append(k)
        job_inputs.append(inputs)
    if config.assistant_only_loss and (MESSAGES in jobs or CONVERSATIONAL_PC in jobs):
        warn_once_if_stop_token_untrained(tokenizer)
    for fmt, (where, inputs) in jobs.items():
        fields = [_field(fmt, rows[k], config) for k in where]
        prepared = _documents(fmt, inputs, tokenizer, config, [(index(k), f) for k, f in zip(where, fields)])
        for k, field, documents in zip(where, fields, prepared):
            results[k] = documents if isinstance(documents, BadRowError) else \
                _example(documents, fmt, config, index(k), field)
    return results


def _field(fmt: str, row: dict, config: DataConfig) -> str:
    if fmt == MESSAGES:
        return "messages" if "messages" in row else "conversations"
    return {TEXT: config.dataset_text_field}.get(fmt) or FIELD[fmt]


def prepare_example(row: dict, tokenizer, config: DataConfig, row_index: int | None = None) -> dict[str, np.ndarray]:
    """One dataset row -> {"input_ids": int32[n], "loss_mask": bool[n]}; loss_mask[i] = token i is a trained label.

    The mask is unshifted (TRL's labels != -100); the pipeline shifts it per document. Example, prompt/completion
    with the fixture tokenizer (no BOS), completion_only_loss on by default:

        {"prompt": "spell: 4 =>", "completion": " four"}
        -> tokens  "s" "pe" "ll" ":" " " "4" " =>" " f" "our" "<|endoftext|>"
           mask     0   0    0    0   0   0    0    1    1         1

    Raises BadRowError (row index, field, fix) for a row that cannot be trained, including one whose trained tokens
    are all cut away by truncation; the pipeline catches it when config.skip_bad_rows and counts the row.
    """
    (result,) = prepare_examples([row], tokenizer, config, first_index=row_index)
    if isinstance(result, BadRowError):
        raise result
    return result


# ----------------------------------------------------------------------------------------------- stop-token check

_CHECKED_TEMPLATES: dict[str, bool] = {}
_PROBE = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "dummy"},
          {"role": "user", "content": "dummy"}]


def _probe_trained_tokens(tokenizer) -> list[int]:
    """The assistant-masked tokens of a user / assistant / user probe (TRL's check); with a system message first
    when the template refuses that."""
    config = DataConfig(assistant_only_loss=True, max_length=None, split_conversations="auto")
    for probe in (_PROBE, [{"role": "system", "content": "dummy"}, *_PROBE]):
        try:
            (documents,) = _documents(MESSAGES, [(probe, (None, {}))], tokenizer, config, [(0, "messages")])
        except chat.ChatTemplateError:
            continue
        if not isinstance(documents, BadRowError):  # the one assistant turn: in the full document or its own
            return [int(t) for ids, mask in documents for t in ids[mask]]
    raise chat.ChatTemplateError("the template refuses both stop-token probes")


def end_of_turn_token(tokenizer) -> str | None:
    """The added token that ends the assistant's turn in the template (e.g. <|im_end|>), if the probe finds one."""
    if not tokenizer.chat_template:
        return None
    try:
        trained = _probe_trained_tokens(tokenizer)
    except Exception:  # noqa: BLE001 (only a suggestion for an error message)
        return None
    added = set(tokenizer.get_added_vocab().values())
    for token_id in reversed(trained):
        if tokenizer.decode([token_id]).strip():
            return tokenizer.convert_ids_to_tokens(token_id) if token_id in added else None
    return None


def stop_token_trained(tokenizer) -> bool:
    """Does the assistant mask end on the turn-ending token (e.g. <|im_end|>, <|eot_id|>, </s>)?

    Ignoring whitespace-only tokens, the last assistant token of the probe must be an added (special) token.
    Otherwise the model is never trained to stop.
    """
    added = set(tokenizer.get_added_vocab().values())
    for token_id in reversed(_probe_trained_tokens(tokenizer)):
        if tokenizer.decode([token_id]).strip() == "":
            continue
        return token_id in added
    return False


def warn_once_if_stop_token_untrained(tokenizer) -> None:
    """Warn (once per template) when assistant-only loss would leave the turn-ending token untrained."""
    template = tokenizer.get_chat_template()
    if template in _CHECKED_TEMPLATES:
        return
    try:
        trained = stop_token_trained(tokenizer)
    except Exception:  # noqa: BLE001 (the template refuses both probes: the real rows will show its problem)
        trained = True
    _CHECKED_TEMPLATES[template] = trained
    if not trained:
        warnings.warn(
            "The chat template does not put the assistant turn's end-of-turn token (e.g. <|im_end|>, <|eot_id|>, "
            "</s>) in the assistant mask, so with assistant_only_loss the model is never trained to stop. Fix: "
            "put the end-of-turn token inside {% generation %}...{% endgeneration %}, write it right after the "
            "assistant content in the template, or set assistant_only_loss=False.",
            UserWarning,
            stacklevel=3,
        )
