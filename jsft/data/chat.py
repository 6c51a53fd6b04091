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
a prefix is compared without such closing tokens.

Templates whose rendering of a turn depends on what follows it (Qwen3 drops the reasoning of earlier assistant
turns; Mistral-Nemo moves the system prompt into the last user turn): a turn is trained as it renders when it is the
last turn, which is how the model sees it at inference. Where the full conversation renders a turn that way, it is
trained there; each other turn gets a document of its own (the conversation up to it, only it trained:
turn_documents). A generation prompt that ends with whitespace the rendered turn lacks (Nemotron's `<think>\n`
where an empty thought renders `<think></think>`): the turn is trained in a document of its own, the generation
prompt followed by the rest of the rendered turn (what the model writes after it). A generation prompt that opens the
turn with other text the rendered turn lacks (DeepSeek-R1-Distill's `<think>\n` before a turn rendered without its
reasoning) cannot show what the model must write after it: refused with a ChatTemplateError naming the fix.
"""

from __future__ import annotations

import re

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


def _divergence(a: str, b: str) -> int:
    """Length of the common prefix of two strings. Mostly one is a prefix of the other (one C-level startswith);
    otherwise a binary search over slice comparisons (os.path.commonprefix compares in a Python loop per character,
    which cost as much as rendering the templates).

    >>> _divergence("<|im_start|>assistant\\n", "<|im_start|>assistant\\nhello"), _divergence("abcx", "abcy")
    (22, 3)
    """
    if b.startswith(a):
        return len(a)
    low, high = 0, min(len(a), len(b))  # a[:low] == b[:low]; they differ within [:high + 1] (or one ends there)
    while low < high:
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


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


def turn_documents(turns: list[int], before: list[str], upto: list[str], full_text: str, special_tokens=(),
                   opening: str | None = None, split: bool = True, first_trained: int = 0) -> list[tuple[str, list]]:
    """The documents of one conversation, each with its assistant character spans, from the renderings of each
    turn's prefixes (module doc): before[j] renders messages[:turns[j]] with the generation prompt, upto[j] renders
    messages[:turns[j] + 1] (the conversation as it stands when turn j is the last one).

    [(full_text, spans)] when every turn renders in full_text as it does as the last turn (its inference form).
    Otherwise (split) full_text trains the turns that do (it is left out when that is none), and each other turn
    gets a document of its own, upto[j], trained on that turn only; without split, ChatTemplateError. Turns before
    message first_trained (the prompt of a conversational prompt/completion row under completion-only loss) get no
    document of their own. Every span is
    checked: before[j] must be a prefix of upto[j], and upto[j] of the text the span is in.
    special_tokens: the tokens a template may close a conversation with (see _without_closing_tokens).
    opening: generation_prompt(), needed when the conversation opens with the assistant (turns[0] == 0): the empty
    conversation's rendering must end with it (a template that writes its generation prompt inside the message loop
    renders nothing there, and the turn would seem to start before its header)."""
    spans, extra = [], []
    for i, before_i, upto_raw in zip(turns, before, upto):
        if i == 0 and not (opening and before_i.endswith(opening)):
            raise AssistantFirstError(ASSISTANT_FIRST.format(how="renders no generation prompt for an empty "
                                                                 f"conversation (it renders {before_i[-60:]!r})"))
        upto_i = _without_closing_tokens(upto_raw, full_text, special_tokens)
        at = _divergence(before_i, upto_i)
        if at < len(before_i) and split and i >= first_trained and not before_i[at:].strip():
            # the generation prompt ends with whitespace the rendered turn lacks (Nemotron's '<think>\n' where the
            # turn renders '<think></think>'): what the model writes after it is the rest of the rendered turn
            rest = upto_raw[at:]
            if rest.rstrip():
                extra.append((before_i + rest, [(len(before_i), len(before_i) + len(rest.rstrip()))]))
            continue
        if at < len(before_i) and i < first_trained:  # an untrained prompt turn: nothing to find
            continue
        if at < len(before_i):
            raise ChatTemplateError(
                f"cannot train assistant turn {i} as the model writes it: the template's generation prompt is not "
                f"how it opens that turn (the generation prompt has {before_i[at:at + 60]!r} where the rendered turn "
                f"has {upto_i[at:at + 60]!r}; e.g. a generation prompt that opens a thinking block the rendered turn "
                "lacks, as DeepSeek-R1-Distill's '<think>\\n', or an empty thinking block only in the generation "
                "prompt), so what the model must write after the generation prompt cannot be rendered. Fix: a .jinja "
                "template (data.chat_template_path) whose assistant turn renders what the model writes, reasoning "
                "included, inside {% generation %}...{% endgeneration %} markers (TRL ships such `_training` variants "
                "in trl/chat_templates), or a template whose generation prompt matches its rendered turn."
            )
        if full_text.startswith(upto_i):
            end = max(len(before_i), len(upto_i.rstrip()))
            if end > len(before_i):
                spans.append((len(before_i), end))
            continue
        if not split:
            at = _divergence(upto_i, full_text)
            raise ChatTemplateError(
                f"cannot find assistant turn {i} in one document: the template changes earlier turns when a later "
                "turn is added (e.g. it drops reasoning/thinking from earlier assistant turns, or moves the system "
                f"prompt to the last user turn): rendered as the last turn it has {upto_i[at:at + 60]!r} where the "
                f"full conversation has {full_text[at:at + 60]!r}. Fix: data.split_conversations='auto' (each such "
                "turn trained in a document of its own, as the model sees it at inference), or add "
                "{% generation %}...{% endgeneration %} markers around the assistant text in the template."
            )
        if i < first_trained:
            continue
        end = len(upto_raw.rstrip())
        if end > len(before_i):
            extra.append((upto_raw, [(len(before_i), end)]))
    return [(full_text, spans), *extra] if spans or not extra else extra  # a full text training nothing: dropped
