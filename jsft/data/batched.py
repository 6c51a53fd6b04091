"""Rows of one format -> token ids and masks, many rows at a time: the only row -> example implementation (one row is
a batch of one; jsft.data.examples sorts rows into these jobs and makes the examples).

Per row, transformers' per-call machinery (a BatchEncoding per tokenizer call; apply_chat_template) would cost most
of the time. Here the jobs of one format are prepared in a few calls:

1. render: conversations through the chat template, all in one transformers `render_jinja_template` call (it compiles
   the template once and returns the {% generation %} character spans); messages of plain strings skip its
   per-conversation sanitizing copy and get the template's globals merged once, not per render (_compiled). A
   template without markers: every prefix of every conversation too (two more calls), and chat.turn_documents
   infers the spans (chat's module doc), splitting a conversation into one document per turn where the template
   renders a turn differently once later turns follow;
2. encode: every text in ONE call of the fast tokenizer (`encode_batch_fast` in Rust; `encode_batch` where the
   assistant mask needs the tokenizer's offsets: not for a byte-level BPE, whose offsets follow from the ids,
   jsft.data.token_bytes);
3. masks with numpy over all documents: assistant tokens are the tokens overlapping a generation span (the rule
   apply_chat_template applies); completion-only masks start where prompt and prompt+completion tokens diverge.

The rules, each written once: a span -> the tokens overlapping it (overlap_mask); text that starts with the BOS
string keeps one BOS (_drop_doubled_bos; TRL would give two); the completion starts where the tokenized prompt and
prompt+completion diverge, with a warning, once, when the prompt is not a token prefix (_prefix_lengths).
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from itertools import chain

import jinja2.runtime
import numpy as np

from jsft.config import ConfigError, DataConfig
from jsft.data import chat, token_bytes

TEXT, PROMPT_COMPLETION, MESSAGES, CONVERSATIONAL_PC = "text", "prompt_completion", "messages", \
    "conversational_prompt_completion"  # formats.FORMATS
REASONING_FIELDS = frozenset({"reasoning_content", "thinking", "reasoning"})  # transformers aliases them to each other


def _groups(options: list[tuple]) -> list[tuple]:
    """[(tools, template kwargs, positions)]: the conversations sharing a row's tools and chat_template_kwargs."""
    if all(tools is None and not kwargs for tools, kwargs in options):
        return [(None, {}, list(range(len(options))))]
    groups: dict[str, tuple] = {}
    for k, (tools, kwargs) in enumerate(options):
        key = json.dumps([tools, kwargs], default=str)  # key order kept: `tojson` writes the keys in their order
        groups.setdefault(key, (tools, kwargs, []))[2].append(k)
    return list(groups.values())


def _only_strings(conversations: list[list[dict]]) -> bool:
    """Only string values and no reasoning field in every message: transformers' sanitizing copy and reasoning
    aliases change nothing."""
    for conversation in conversations:
        for message in conversation:
            if not REASONING_FIELDS.isdisjoint(message):
                return False
            for value in message.values():
                if type(value) is not str:
                    return False
    return True


class TemplateFailure(Exception):
    """The chat template raised while rendering a batch of conversations (`error`: what it raised). Only these
    failures are pinned on a row (jsft.data.examples); any other exception is no row's fault and propagates."""

    def __init__(self, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


def _render_group(tokenizer, conversations: list[list[dict]], tools, kwargs: dict, spans: bool,
                  add_generation_prompt: bool = False, only_strings: bool = False) -> tuple[list[str], list | None]:
    """apply_chat_template(..., tokenize=False) of conversations sharing tools and template kwargs, in one call:
    (texts, {% generation %} character spans or None). Whatever the template raises comes as a TemplateFailure.

    As apply_chat_template does: keys whose value is None are dropped first (by the caller, _render: datasets fills a
    missing key with None), the tokenizer's special tokens are template variables (the row's kwargs win), tools choose
    the template. only_strings: _only_strings(conversations).
    """
    try:
        return _render_unchecked(tokenizer, conversations, tools, kwargs, spans, add_generation_prompt, only_strings)
    except Exception as e:  # noqa: BLE001 (the template's own code raised: jsft.data.examples pins it on a row)
        raise TemplateFailure(e) from e


def _render_unchecked(tokenizer, conversations, tools, kwargs, spans, add_generation_prompt, only_strings):
    from transformers.utils import chat_template_utils as rendering

    if not conversations:
        return [], []
    template, variables = tokenizer.get_chat_template(None, tools), {**tokenizer.special_tokens_map, **kwargs}
    if not only_strings:
        texts, generation = rendering.render_jinja_template(
            conversations=conversations, tools=tools, chat_template=template, return_assistant_tokens_mask=spans,
            add_generation_prompt=add_generation_prompt, **variables,
        )
        return texts, (generation if spans else None)
    # render_jinja_template's own loop, minus its per-conversation sanitizing deep copy (a third of its time), which
    # leaves messages of plain strings as they are
    compiled, template_globals = _compiled(template)
    inputs = dict(template_globals, tools=rendering._plain_template_data(tools), documents=None,
                  add_generation_prompt=add_generation_prompt, **rendering._plain_template_data(variables))
    if not spans:
        return [_render_text(compiled, {**inputs, "messages": c}) for c in conversations], None
    rendered = [_render_with_spans(compiled, {**inputs, "messages": c}) for c in conversations]
    return [text for text, _ in rendered], [generation for _, generation in rendered]


@lru_cache(maxsize=32)
def _compiled(template: str):
    """(transformers' compiled template, its globals as one plain dict). Template.render merges the globals (a
    ChainMap over the environment's) into every call's variables; merged once here (it was more than half the time
    of rendering a short conversation)."""
    from transformers.utils import chat_template_utils as rendering

    compiled = rendering._compile_jinja_template(template)
    return compiled, dict(compiled.globals)


def _context(compiled, variables: dict):
    """Template.new_context(variables, shared=True) (the variables as they are, no globals added) without the set of
    the globals' names it builds for `{% import %}` of the template itself, which no chat template does."""
    return jinja2.runtime.new_context(compiled.environment, compiled.name, compiled.blocks, variables, shared=True)


def _render_text(compiled, variables: dict) -> str:
    """compiled.render(**variables) for variables that already hold the template's globals (_compiled)."""
    context = _context(compiled, variables)
    try:
        return compiled.environment.concat(compiled.root_render_func(context))
    except Exception:  # noqa: BLE001 (as Template.render: jinja rewrites the traceback to the template's lines)
        compiled.environment.handle_exception()


def _render_with_spans(compiled, variables: dict) -> tuple[str, list]:
    """transformers' _render_with_assistant_indices (the text and its {% generation %} character spans) for variables
    that already hold the template's globals (_compiled)."""
    blocks, generation = [], []
    context = _context(compiled, variables)
    with compiled.environment.activate_tracker(blocks, generation):  # a span starts at the length of the blocks so far
        try:
            for block in compiled.root_render_func(context):
                blocks.append(block)
        except Exception:  # noqa: BLE001 (as Template.generate)
            compiled.environment.handle_exception()
        return "".join(blocks), generation


def _infer_group(tokenizer, conversations: list[list[dict]], tools, kwargs: dict, only_strings: bool,
                 split: bool, first_trained: list[int]) -> list[list[tuple[str, list]]]:
    """Per conversation, its documents and their assistant spans with a template without {% generation %} markers
    (chat.turn_documents), with every prefix of every conversation rendered in two more calls (one with the
    generation prompt)."""
    turns = [chat.assistant_turns(conversation) for conversation in conversations]
    if any(ts[:1] == [0] for ts in turns):  # the empty conversation is rendered: the template may fail on it
        try:
            _render_group(tokenizer, [[]], tools, kwargs, spans=False, add_generation_prompt=True)
        except TemplateFailure as e:  # the template fails on no messages: this row's problem
            raise chat.AssistantFirstError(chat.ASSISTANT_FIRST.format(how=f"fails on an empty conversation ({e})")) \
                from e.error
    before, _ = _render_group(tokenizer, [c[:i] for c, ts in zip(conversations, turns) for i in ts], tools, kwargs,
                              spans=False, add_generation_prompt=True, only_strings=only_strings)
    texts, _ = _render_group(tokenizer, conversations, tools, kwargs, spans=False, only_strings=only_strings)
    # through turn i: the whole conversation when i is its last message (most rows end with the assistant)
    upto_needed = [c[: i + 1] for c, ts in zip(conversations, turns) for i in ts if i + 1 < len(c)]
    upto_rendered = iter(_render_group(tokenizer, upto_needed, tools, kwargs, spans=False,
                                       only_strings=only_strings)[0])
    documents, j, special = [], 0, tokenizer.all_special_tokens
    opening = chat.generation_prompt(tokenizer, tools, kwargs) if any(ts[:1] == [0] for ts in turns) else None
    for conversation, ts, text, first in zip(conversations, turns, texts, first_trained):
        upto = [text if i + 1 == len(conversation) else next(upto_rendered) for i in ts]
        documents.append(chat.turn_documents(ts, before[j:j + len(ts)], upto, text, special, opening, split, first))
        j += len(ts)
    return documents


def _render(tokenizer, conversations: list[list[dict]], options: list[tuple], assistant_spans: bool = False,
            add_generation_prompt: bool = False, split: bool = True, first_trained: list[int] | None = None):
    """(texts, spans, owner): the documents of conversations (each with its row's (tools, template kwargs)), one
    render call per group of equal options. One document per conversation, except where inferred assistant spans
    split one (chat.turn_documents): owner[d] is the conversation of document d, in order, its full rendering first.
    spans (with assistant_spans, else None): each document's assistant character spans, the template's
    {% generation %} markers or inferred where it has none."""
    per_conversation: list = [None] * len(conversations)
    first_trained = first_trained or [0] * len(conversations)
    for tools, kwargs, where in _groups(options):
        group = [[{k: v for k, v in m.items() if v is not None} for m in conversations[j]] for j in where]
        only_strings = _only_strings(group)
        if assistant_spans and not chat.has_generation_markers(tokenizer.get_chat_template(None, tools)):
            documents = _infer_group(tokenizer, group, tools, kwargs, only_strings, split,
                                     [first_trained[j] for j in where])
        else:
            group_texts, group_spans = _render_group(tokenizer, group, tools, kwargs, assistant_spans,
                                                     add_generation_prompt, only_strings)
            documents = [[(t, group_spans[j] if assistant_spans else None)] for j, t in enumerate(group_texts)]
        for j, k in enumerate(where):
            per_conversation[k] = documents[j]
    owner = [k for k, documents in enumerate(per_conversation) for _ in documents]
    texts = [text for documents in per_conversation for text, _ in documents]
    spans = [s for documents in per_conversation for _, s in documents] if assistant_spans else None
    return texts, spans, owner


def _encode(tokenizer, texts: list[str], add_special_tokens: bool, encodings: bool = False):
    """Token ids (flat int32), lengths, and (if asked) the tokenizers Encoding objects of texts, in one tokenizer call.

    This is `tokenizer(texts, add_special_tokens=...)` without transformers building a BatchEncoding per row; as that
    call does, it first turns off truncation and padding set on the backend (the pipeline truncates after). A slow
    (Python) tokenizer is called per text and has no Encoding objects.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        if encodings:
            raise ConfigError(f"assistant_only_loss needs a fast tokenizer (character offsets); "
                              f"{type(tokenizer).__name__} is a slow one. Fix: load the model's tokenizer.json")
        encoded = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        return np.fromiter(chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum())), lengths, None
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    if encodings or not hasattr(backend, "encode_batch_fast"):
        encoded = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
    else:  # no character offsets computed
        encoded = backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter(chain.from_iterable(e.ids for e in encoded), dtype=np.int32, count=int(lengths.sum()))
    return ids, lengths, (encoded if encodings else None)


def overlap_mask(offsets: np.ndarray, spans) -> np.ndarray:
    """True for each token [start, end) that overlaps a character span (spans sorted, disjoint).

    >>> overlap_mask(np.array([[0, 3], [3, 5], [5, 9]]), [(4, 6)]).tolist()
    [False, True, True]
    """
    mask = np.zeros(len(offsets), dtype=np.bool_)
    if len(spans) == 0:
        return mask
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    first = np.searchsorted(spans[:, 1], offsets[:, 0], side="right")  # the first span ending after the token starts
    inside = first < len(spans)
    mask[inside] = offsets[inside, 1] > spans[first[inside], 0]
    return mask


def overlapping_tokens(encoding, start: int, end: int) -> tuple[int, int] | None:
    """[first, stop): the tokens of a tokenizers Encoding overlapping characters [start, end), found from the tokens at
    the span's two ends (token offsets are in text order); None for an empty span or an end character that no token
    covers (a normalizer removed it): then overlap_mask over every token's offsets decides."""
    if end <= start:
        return None
    first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)  # the first token holding the char
    if first is None or last is None:
        return None
    stop, n = last + 1, len(encoding)
    while stop < n and encoding.token_to_chars(stop)[0] < end:  # bytes of one character split over tokens
        stop += 1
    return first, stop


def _assistant_mask(encodings: list, generation: list, lengths: np.ndarray) -> np.ndarray:
    """overlap_mask of every conversation (tokens overlapping its generation spans), laid end to end.

    Only the tokens at each span's ends are looked up (overlapping_tokens), not every token's offsets: building a
    Python tuple per token cost as much as rendering the templates.
    """
    row_start = np.cumsum(lengths) - lengths
    change = np.zeros(int(lengths.sum()) + 1, dtype=np.int64)  # +1 where a masked run starts, -1 where it stops
    for k, (encoding, spans) in enumerate(zip(encodings, generation)):
        runs = [overlapping_tokens(encoding, start, end) for start, end in spans]
        if None in runs:
            offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
            inside = np.flatnonzero(overlap_mask(offsets, spans))
            runs = [(int(t), int(t) + 1) for t in inside]
        for first, stop in runs:
            change[row_start[k] + first] += 1
            change[row_start[k] + stop] -= 1
    return np.cumsum(change[:-1]) > 0


def _prefix_lengths(prompt_ids, prompt_lengths, ids, lengths) -> np.ndarray:
    """Per row, the length of the common prefix of its prompt tokens and its prompt+completion tokens.

    >>> _prefix_lengths(np.array([1, 2, 7, 8]), np.array([2, 2]), np.array([1, 2, 3, 7, 9]), np.array([3, 2])).tolist()
    [2, 1]
    """
    n = np.minimum(prompt_lengths, lengths)  # compare the first n tokens of both
    row = np.repeat(np.arange(len(n)), n)
    j = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    p_start = np.cumsum(prompt_lengths) - prompt_lengths
    f_start = np.cumsum(lengths) - lengths
    differ = prompt_ids[p_start[row] + j] != ids[f_start[row] + j]
    starts = n.astype(np.int64)
    np.minimum.at(starts, row[differ], j[differ])  # the first differing position, where there is one
    return starts


def _drop_doubled_bos(tokenizer, texts: list[str], ids: np.ndarray, lengths: np.ndarray):
    """Text that already starts with the BOS string keeps one BOS (TRL would give two)."""
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if not bos or bos_id is None:
        return ids, lengths
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    drop = [
        k for k, text in enumerate(texts)
        if text.startswith(bos) and lengths[k] >= 2 and ids[starts[k]] == ids[starts[k] + 1] == bos_id
    ]
    if not drop:
        return ids, lengths
    lengths = lengths.copy()
    lengths[drop] -= 1
    return np.delete(ids, starts[drop]), lengths


_warned_prompt_not_prefix = False


def _warn_prompt_not_prefix(tokenizer, prompt_ids: np.ndarray, start: int) -> None:
    """The prompt is not a token prefix of prompt+completion: TRL's warning, shown once."""
    global _warned_prompt_not_prefix
    if _warned_prompt_not_prefix:
        return
    _warned_prompt_not_prefix = True
    warnings.warn(
        "The tokenized prompt is not a prefix of the tokenized prompt+completion (tokens merge across the "
        f"boundary, or the chat template renders the prompt differently); the completion starts where they "
        f"diverge and {tokenizer.decode(prompt_ids[start:].tolist())!r} of the prompt is not in the training "
        "sequence. Fix: end prompts on a token boundary, or use a template that renders the prompt the same way. "
        "Shown once.", UserWarning, stacklevel=5,
    )


def _split(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def prepare_jobs(fmt: str, inputs: list, tokenizer, config: DataConfig):
    """(ids, loss_mask, lengths, owner) of the jobs of one format (jsft.data.examples builds the inputs): ids and
    mask flat over all documents, lengths per document, owner[d] the job of document d (documents in job order; a
    conversation split into one document per turn has several, its full rendering first).

    inputs per format: text -> the text (EOS added); prompt_completion -> (prompt, prompt + completion + EOS);
    messages -> (messages, (tools, template kwargs)); conversational prompt/completion -> ((prompt, prompt +
    completion), (tools, template kwargs)).
    """
    assistant_only = config.assistant_only_loss
    completion_only = config.completion_only_loss
    if completion_only is None:
        completion_only = fmt in (PROMPT_COMPLETION, CONVERSATIONAL_PC)
    if fmt == TEXT:
        ids, lengths, _ = _encode(tokenizer, inputs, add_special_tokens=True)
        ids, lengths = _drop_doubled_bos(tokenizer, inputs, ids, lengths)
        return ids, np.ones(len(ids), dtype=np.bool_), lengths, np.arange(len(inputs))
    prompt_lengths = None  # set when the completion-only mask needs the prompt's tokens
    if fmt == PROMPT_COMPLETION:
        prompts, fulls = [p for p, _ in inputs], [f for _, f in inputs]
        if completion_only:
            prompt_ids, prompt_lengths, _ = _encode(tokenizer, prompts, add_special_tokens=True)
            prompt_ids, prompt_lengths = _drop_doubled_bos(tokenizer, prompts, prompt_ids, prompt_lengths)
        ids, lengths, _ = _encode(tokenizer, fulls, add_special_tokens=True)
        ids, lengths = _drop_doubled_bos(tokenizer, fulls, ids, lengths)
        owner = np.arange(len(inputs))
    else:
        options = [o for _, o in inputs]
        split = config.split_conversations == "auto"
        first_trained = None
        if fmt == CONVERSATIONAL_PC:
            prompts, conversations = [p for (p, _), _ in inputs], [c for (_, c), _ in inputs]
            if completion_only:
                prompt_texts, _, _ = _render(tokenizer, prompts, options, add_generation_prompt=True)
                prompt_ids, prompt_lengths, _ = _encode(tokenizer, prompt_texts, add_special_tokens=False)
                first_trained = [len(p) for p in prompts]
        else:
            conversations = [c for c, _ in inputs]
        texts, generation, owner = _render(tokenizer, conversations, options, assistant_spans=assistant_only,
                                           split=split, first_trained=first_trained)
        owner = np.asarray(owner, dtype=np.int64)
        fast_offsets = assistant_only and token_bytes.byte_lengths(tokenizer) is not None
        ids, lengths, encodings = _encode(tokenizer, texts, add_special_tokens=False,
                                          encodings=assistant_only and not fast_offsets)
        if prompt_lengths is not None and len(owner) > len(inputs):  # a split conversation's later documents:
            main = np.r_[True, owner[1:] != owner[:-1]]  # trained after their own generation prompt, not the prompt's
            per_job = _split(prompt_ids, prompt_lengths)
            prompt_ids = np.concatenate([per_job[k] if m else per_job[k][:0] for k, m in zip(owner, main)])
            prompt_lengths = np.where(main, prompt_lengths[owner], 0)
    mask = np.ones(len(ids), dtype=np.bool_)
    if prompt_lengths is not None:
        starts = _prefix_lengths(prompt_ids, prompt_lengths, ids, lengths)
        for k in np.flatnonzero(starts < prompt_lengths)[:1]:  # prompt not a token prefix: warn, once
            p0 = int(np.sum(prompt_lengths[:k]))
            _warn_prompt_not_prefix(tokenizer, prompt_ids[p0:p0 + prompt_lengths[k]], int(starts[k]))
        row_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        position = np.arange(len(ids)) - np.repeat(row_start, lengths)
        mask &= position >= np.repeat(starts, lengths)
    if fmt in (MESSAGES, CONVERSATIONAL_PC) and assistant_only:
        on_one_axis = token_bytes.token_offsets(tokenizer, ids, lengths, texts, generation) if fast_offsets else None
        if on_one_axis is not None:
            mask &= overlap_mask(*on_one_axis)
        else:
            if encodings is None:  # a row's tokens did not add up to its text: ask the tokenizer for the offsets
                _, _, encodings = _encode(tokenizer, texts, add_special_tokens=False, encodings=True)
            mask &= _assistant_mask(encodings, generation, lengths)
    return ids, mask, lengths, owner
