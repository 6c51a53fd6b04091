"""Conversations -> token ids and a per-token assistant mask, for any chat template.

Two ways to find what the assistant wrote:

- markers: the template wraps assistant text in `{% generation %} ... {% endgeneration %}`; transformers returns
  the mask (`return_assistant_tokens_mask=True`). This is TRL's path, used whenever the markers are present.
- inference (beyond TRL): render the conversation prefix by prefix. Assistant turn i is the text that rendering
  `messages[:i + 1]` adds after rendering `messages[:i]` with `add_generation_prompt=True`, minus trailing
  whitespace. Spans are character spans of the full rendering; a token is an assistant token when it overlaps a span
  (the same rule transformers applies to generation markers), so both ways give the same mask.

Worked example (ChatML, no markers):

    messages[:1] + generation prompt  "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n"
    messages[:2]                      "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\nhello<|im_end|>\\n"
    assistant span                                                                         "hello<|im_end|>"

A template may close a conversation with a special token it does not write between turns (Phi-3 ends with EOS):
a prefix is compared without such closing tokens. The inference needs a template that renders earlier turns the
same whatever follows them. A template that drops the
reasoning of earlier assistant turns, or that opens the assistant turn differently in the generation prompt, is
refused with a ChatTemplateError that says which of the two it is.
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """The chat template cannot give assistant masks; the message names the template's problem and the fix."""


class AssistantFirstError(ChatTemplateError):
    """One conversation opens with the assistant and the template cannot show where that turn starts (the row's
    problem, not the template's: jsft.data.formats makes it the row's BadRowError)."""


ASSISTANT_FIRST = (
    "the conversation opens with an assistant message, and the template {how}, so assistant_only_loss cannot find "
    "where that turn starts by rendering prefixes"
)


def generation_prompt(tokenizer, tools=None, template_kwargs: dict | None = None) -> str | None:
    """What add_generation_prompt adds after a one-message user conversation ('<|im_start|>assistant\n'); None when
    that probe does not render as a prefix plus the prompt."""
    probe = [{"role": "user", "content": "x"}]
    try:
        plain = render(tokenizer, probe, tools, template_kwargs)
        prompted = render(tokenizer, probe, tools, template_kwargs, add_generation_prompt=True)
    except Exception:
        return None
    plain = _without_closing_tokens(plain, prompted, tokenizer.all_special_tokens)  # Phi-3 closes with EOS
    return prompted[len(plain):] if prompted.startswith(plain) and len(prompted) > len(plain) else None


def has_generation_markers(chat_template: str | dict | None) -> bool:
    """True when the template contains `{% generation %}` (any whitespace-trim variant)."""
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default", "")
    return bool(chat_template) and GENERATION_MARKER.search(chat_template) is not None


def render(tokenizer, messages: list[dict], tools=None, template_kwargs: dict | None = None, **options) -> str:
    """The template's text for `messages` (no tokenization). An empty list renders the template with no messages."""
    kwargs = dict(template_kwargs or {})
    if not messages:  # transformers refuses an empty conversation; the template itself may not
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[[]],
            tools=tools,
            chat_template=tokenizer.get_chat_template(None, tools),
            **{**tokenizer.special_tokens_map, **kwargs, **options},
        )
        return rendered[0]
    return tokenizer.apply_chat_template(messages, tokenize=False, tools=tools, **kwargs, **options)


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`, with no special tokens added (as apply_chat_template does)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]


def spans_to_token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for every token that overlaps a character span (spans sorted, non-overlapping).

    >>> spans_to_token_mask([(0, 3), (3, 5), (5, 9)], [(4, 6)]).tolist()
    [False, True, True]
    """
    mask = np.zeros(len(offsets), dtype=np.bool_)
    span_index = 0
    for token_index, (start, end) in enumerate(offsets):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        if end > spans[span_index][0]:
            mask[token_index] = True
    return mask


def _divergence(a: str, b: str) -> int:
    """Length of the common prefix of two strings."""
    return len(os.path.commonprefix([a, b]))


def assistant_turns(messages: list[dict]) -> list[int]:
    """Indices of the assistant messages: the turns whose spans inference looks for."""
    return [i for i, message in enumerate(messages) if message.get("role") == "assistant"]


def _without_closing_tokens(upto: str, full_text: str, special_tokens) -> str:
    """`upto` less the fewest special tokens (and whitespace) at its end that make it a prefix of `full_text`: some
    templates close a conversation with a token they do not write between turns (Phi-3 ends with EOS). `upto` itself
    when that does not help (the caller names the problem)."""
    text = upto
    while not full_text.startswith(text):
        stripped = text.rstrip()
        closing = next((t for t in special_tokens if t and stripped.endswith(t)), None)
        if closing is None:
            return upto
        text = stripped[: -len(closing)]
    return text


def spans_from_prefixes(turns: list[int], before: list[str], upto: list[str], full_text: str,
                        special_tokens=(), opening: str | None = None) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `full_text`, from the renderings of each turn's prefixes (module doc):
    before[j] renders messages[:turns[j]] with the generation prompt, upto[j] renders messages[:turns[j] + 1].
    special_tokens: the tokens a template may close a conversation with (see _without_closing_tokens).
    opening: generation_prompt(), needed when the conversation opens with the assistant (turns[0] == 0): the empty
    conversation's rendering must end with it (a template that writes its generation prompt inside the message loop
    renders nothing there, and the turn would seem to start before its header)."""
    spans = []
    for i, before_i, upto_i in zip(turns, before, upto):
        if i == 0 and not (opening and before_i.endswith(opening)):
            raise AssistantFirstError(ASSISTANT_FIRST.format(how="renders no generation prompt for an empty "
                                                                 f"conversation (it renders {before_i[-60:]!r})"))
        upto_i = _without_closing_tokens(upto_i, full_text, special_tokens)
        if not upto_i.startswith(before_i):
            at = _divergence(before_i, upto_i)
            raise ChatTemplateError(
                f"cannot find assistant turn {i} by rendering prefixes: the template's generation prompt is not how "
                f"it opens an assistant turn in the conversation (the generation prompt has {before_i[at:at + 60]!r} "
                f"where the conversation has {upto_i[at:at + 60]!r}; e.g. an empty thinking block only in the "
                "generation prompt, or a system prompt placed by the number of turns). Fix: add "
                "{% generation %}...{% endgeneration %} markers around the assistant text in the template, or use a "
                "template whose generation prompt matches the rendered turn."
            )
        if not full_text.startswith(upto_i):
            at = _divergence(upto_i, full_text)
            raise ChatTemplateError(
                f"cannot find assistant turn {i} by rendering prefixes: the template changes earlier turns when a "
                "later turn is added (e.g. it drops reasoning/thinking from earlier assistant turns, or moves the "
                "system prompt to the last user turn): rendered alone "
                f"the conversation up to turn {i} has {upto_i[at:at + 60]!r} where the full conversation has "
                f"{full_text[at:at + 60]!r}. Fix: add {{% generation %}}...{{% endgeneration %}} markers around the "
                "assistant text in the template, or use a template that renders earlier turns unchanged."
            )
        end = max(len(before_i), len(upto_i.rstrip()))
        if end > len(before_i):
            spans.append((len(before_i), end))
    return spans


def infer_assistant_spans(
    tokenizer, messages: list[dict], full_text: str, tools=None, template_kwargs: dict | None = None
) -> list[tuple[int, int]]:
    """Character spans of each assistant turn in `full_text` (the rendering of all `messages`); see module doc."""
    turns = assistant_turns(messages)
    opening = None
    if turns and turns[0] == 0:
        opening = generation_prompt(tokenizer, tools, template_kwargs)
        try:
            render(tokenizer, [], tools, template_kwargs, add_generation_prompt=True)
        except Exception as e:
            raise AssistantFirstError(ASSISTANT_FIRST.format(how=f"fails on an empty conversation ({e})")) from e
    before = [render(tokenizer, messages[:i], tools, template_kwargs, add_generation_prompt=True) for i in turns]
    upto = [render(tokenizer, messages[: i + 1], tools, template_kwargs) for i in turns]
    return spans_from_prefixes(turns, before, upto, full_text, tokenizer.all_special_tokens, opening)


def tokenize_conversation(
    tokenizer,
    messages: list[dict],
    tools=None,
    template_kwargs: dict | None = None,
    assistant_mask: bool = False,
    add_generation_prompt: bool = False,
) -> tuple[list[int], np.ndarray | None]:
    """Token ids of the rendered conversation, and (if asked) the assistant mask: markers when present, else inferred.

    No special tokens are added beyond what the template writes (as TRL / transformers do), so BOS comes from the
    template (Llama 3 writes `{{ bos_token }}`) and is never doubled.
    """
    kwargs = dict(template_kwargs or {})
    if not assistant_mask:
        text = render(tokenizer, messages, tools, kwargs, add_generation_prompt=add_generation_prompt)
        return encode_with_offsets(tokenizer, text)[0], None
    if has_generation_markers(tokenizer.get_chat_template(None, tools)):
        out = tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
        return list(out["input_ids"]), np.asarray(out["assistant_masks"], dtype=np.bool_)
    text = render(tokenizer, messages, tools, kwargs, add_generation_prompt=add_generation_prompt)
    spans = infer_assistant_spans(tokenizer, messages, text, tools, kwargs)
    ids, offsets = encode_with_offsets(tokenizer, text)
    return ids, spans_to_token_mask(offsets, spans)


# ----------------------------------------------------------------------------------------------- stop-token check

_CHECKED_TEMPLATES: dict[str, bool] = {}


def stop_token_trained(tokenizer) -> bool:
    """Does the assistant mask end on the turn-ending token (e.g. <|im_end|>, <|eot_id|>, </s>)?

    Probe user / assistant / user (TRL's check): ignoring whitespace-only tokens, the last assistant token must be an
    added (special) token. Otherwise the model is never trained to stop.
    """
    probe = [
        {"role": "user", "content": "dummy"},
        {"role": "assistant", "content": "dummy"},
        {"role": "user", "content": "dummy"},
    ]
    try:
        ids, mask = tokenize_conversation(tokenizer, probe, assistant_mask=True)
    except Exception:  # e.g. a template that wants a system message first
        ids, mask = tokenize_conversation(tokenizer, [{"role": "system", "content": "dummy"}, *probe],
                                          assistant_mask=True)
    added = set(tokenizer.get_added_vocab().values())
    for token_id in reversed([t for t, m in zip(ids, mask) if m]):
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
    except Exception:  # the template refuses both probes: the real rows will show its problem, not a probe
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
