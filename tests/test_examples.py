"""The one row -> example path (jsft.data.examples over jsft.data.batched): a chunk of rows gives each row the example
and error it gets alone (a batch of one), in its place; a failing batch pins the failing row; the span, BOS and
completion-start rules. (TRL parity of the examples themselves: test_trl_parity_data.py.)"""

import warnings

import numpy as np
import pytest

from jsft import fixtures
from jsft.config import ConfigError, DataConfig
from jsft.data import batched, examples, formats


@pytest.fixture(scope="module")
def bos_tokenizer(bos_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bos_tokenizer_dir)


def one_by_one(rows, tokenizer, config):
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(examples.prepare_example(row, tokenizer, config, row_index=i))
        except formats.BadRowError as e:
            out.append(e)
    return out


def assert_same(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, Exception):
            assert type(g) is type(w) and str(g) == str(w), f"row {i}"
        else:
            assert g["input_ids"].dtype == np.int32 and g["loss_mask"].dtype == np.bool_
            np.testing.assert_array_equal(g["input_ids"], w["input_ids"], err_msg=f"row {i} ids")
            np.testing.assert_array_equal(g["loss_mask"], w["loss_mask"], err_msg=f"row {i} mask")


LOSS = {  # name -> (completion_only_loss, assistant_only_loss)
    "default": (None, False), "plain": (False, False), "completion_only": (True, False), "assistant_only": (None, True),
    "assistant_and_completion_only": (True, True),
}
CASES = [
    (kind, loss) for kind in fixtures.FORMATS for loss in LOSS
    if not LOSS[loss][1] or kind in ("messages", "conversational_prompt_completion")  # else a ConfigError (below)
]


@pytest.mark.parametrize("tokenizer_kind", ["plain", "bos"])
@pytest.mark.parametrize("kind,loss", CASES)
def test_batched_equals_one_by_one_on_every_fixture_format(tokenizer, bos_tokenizer, kind, loss, tokenizer_kind,
                                                           monkeypatch):
    tok = tokenizer if tokenizer_kind == "plain" else bos_tokenizer
    rows = fixtures.make_rows(kind, 300, 7)
    completion_only, assistant_only = LOSS[loss]
    config = DataConfig(completion_only_loss=completion_only, assistant_only_loss=assistant_only, max_length=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a prompt that is not a token prefix warns once, on either side
        want = one_by_one(rows, tok, config)
        assert_same(examples.prepare_examples(rows, tok, config), want)


def test_mixed_and_bad_rows_keep_their_place_and_their_errors(tokenizer):
    good = fixtures.make_rows("messages", 6, 3)
    rows = [
        good[0],
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": "a question, no answer"}]},  # no assistant token
        dict(good[1], tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        {"conversations": [{"from": "human", "value": "spell: 1"}, {"from": "gpt", "value": "one"}]},
        fixtures.make_rows("conversational_prompt_completion", 1, 0)[0],
        {"prompt": fixtures.make_rows("messages", 1, 0)[0]["messages"][:1], "completion": []},
        good[2],
    ]
    config = DataConfig(assistant_only_loss=True, max_length=None)
    got = examples.prepare_examples(rows, tokenizer, config, first_index=0)
    assert_same(got, one_by_one(rows, tokenizer, config))
    assert isinstance(got[1], formats.BadRowError) and isinstance(got[2], formats.BadRowError)
    assert isinstance(got[6], formats.BadRowError)


@pytest.mark.parametrize("tokenizer_kind", ["plain", "bos"])
def test_bad_and_edge_text_and_prompt_completion_rows(tokenizer, bos_tokenizer, tokenizer_kind):
    """Errors in their place; BOS never doubled; a prompt that merges with its completion (not a token prefix)."""
    tok = tokenizer if tokenizer_kind == "plain" else bos_tokenizer
    rows = [
        {"text": "spell: 1 => one"},
        {"text": ""},  # only EOS: nothing trained after the first token
        {"text": ["not", "a", "string"]},
        {"text": fixtures.BOS + "spell: 2 => two"},
        {"text": "spell: 3 => three" + tok.eos_token},  # EOS already there: not added twice
        {"prompt": "spell: 4 =>", "completion": " four"},
        {"prompt": "spell: 4 =>", "completion": ""},
        {"prompt": "spell: 4 =>", "completion": 4},
        {"prompt": fixtures.BOS + "spell: 5 =>", "completion": " five"},
        {"prompt": "spell: 4 =", "completion": "> four"},  # '=>' merges across the boundary
        {"prompt": "spell: 6 =>"},
        {"question": "?"},
    ]
    for completion_only in (None, False, True):
        config = DataConfig(completion_only_loss=completion_only, max_length=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert_same(examples.prepare_examples(rows, tok, config, first_index=0), one_by_one(rows, tok, config))


def test_the_prompt_not_a_prefix_warning_still_shows(tokenizer, monkeypatch):
    monkeypatch.setattr(batched, "_warned_prompt_not_prefix", False)
    rows = [{"prompt": "spell: 4 =", "completion": "> four"}] * 3
    with pytest.warns(UserWarning, match="not a prefix") as caught:
        examples.prepare_examples(rows, tokenizer, DataConfig(max_length=None))
    assert len([w for w in caught if "not a prefix" in str(w.message)]) == 1


def test_config_errors_still_raise(tokenizer):
    with pytest.raises(ConfigError, match="assistant_only_loss=True needs conversational rows"):
        examples.prepare_examples([{"text": "a"}], tokenizer, DataConfig(assistant_only_loss=True, max_length=None))


def test_truncation_without_packing_is_per_row(tokenizer):
    """max_length without packing truncates each row's example after the batch (keep_end here)."""
    rows = fixtures.make_rows("prompt_completion", 40, 1) + fixtures.make_rows("messages", 40, 1)
    config = DataConfig(max_length=12, truncation_mode="keep_end")
    got = examples.prepare_examples(rows, tokenizer, config)
    full = examples.prepare_examples(rows, tokenizer, DataConfig(max_length=None))
    for g, f in zip(got, full):
        if isinstance(g, Exception):
            assert "truncation" in str(g) and not f["loss_mask"][-12:][1:].any()
            continue
        np.testing.assert_array_equal(g["input_ids"], f["input_ids"][-12:])
    assert_same(got, one_by_one(rows, tokenizer, config))


def test_a_failing_batch_pins_the_failing_row_and_says_why(tokenizer_dir):
    """One conversation the template refuses among good ones: only that row is bad, its error says why (the
    template's own message); the others get the examples they get alone."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom here') }}"
                         "{% endif %}{% endfor %}" + tok.chat_template)
    rows = fixtures.make_rows("messages", 12, 2)
    rows[5] = {"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "x"}]}
    for assistant_only in (False, True):
        config = DataConfig(assistant_only_loss=assistant_only, max_length=None)
        got = examples.prepare_examples(rows, tok, config, first_index=100)
        assert isinstance(got[5], formats.BadRowError) and "row 105" in str(got[5]) and "no boom here" in str(got[5])
        assert all(not isinstance(g, Exception) for k, g in enumerate(got) if k != 5)
        assert_same(got, [examples.prepare_examples([r], tok, config, first_index=100 + k)[0]
                          for k, r in enumerate(rows)])


def test_an_error_outside_the_template_is_not_swallowed(tokenizer, monkeypatch):
    """No silent per-row fallback: a failure that is no row's (here the encoder) propagates."""
    def broken(*args, **kwargs):
        raise RuntimeError("encoder broke")

    monkeypatch.setattr(batched, "_encode", broken)
    with pytest.raises(RuntimeError, match="encoder broke"):
        examples.prepare_examples(fixtures.make_rows("messages", 4, 0), tokenizer, DataConfig(max_length=None))


def _deleting_tokenizer():
    """A word-level tokenizer whose normalizer deletes every 'q': those characters belong to no token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = ["[UNK]", "ab", "cd", "é", "😀", "x"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Replace("q", "")
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@pytest.mark.parametrize("kind", ["byte_level_bpe", "deleting_normalizer"])
def test_assistant_mask_from_span_ends_equals_overlap_mask_of_every_token(tokenizer, kind):
    """_assistant_mask looks up only the tokens at each span's ends; it must mark exactly the tokens overlap_mask marks
    from every token's offsets, on spans that start and end inside tokens and inside multi-byte characters split over
    byte tokens, on empty spans, and where characters belong to no token."""
    backend = tokenizer.backend_tokenizer if kind == "byte_level_bpe" else _deleting_tokenizer()
    rng = np.random.default_rng(0)
    pieces = ["ab", "cd", " ", "é", "😀", "x", "q", "\n", "<|im_end|>", "hello", " world"]
    texts = ["".join(rng.choice(pieces, size=rng.integers(1, 40))) for _ in range(300)]
    generation = []
    for text in texts:
        cuts = np.sort(rng.choice(len(text) + 1, size=2 * rng.integers(0, 4), replace=True))
        generation.append([(int(a), int(b)) for a, b in cuts.reshape(-1, 2)])
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    lengths = np.array([len(e) for e in encodings], dtype=np.int64)
    got = batched._assistant_mask(encodings, generation, lengths)
    want = np.concatenate([batched.overlap_mask(np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2), spans)
                           for e, spans in zip(encodings, generation)])
    np.testing.assert_array_equal(got, want)
    assert want.any() and not want.all()
    if kind == "deleting_normalizer":  # the fallback ran: some span end is a deleted character
        assert any(batched.overlapping_tokens(e, a, b) is None
                   for e, spans in zip(encodings, generation) for a, b in spans if b > a)


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
def test_templates_without_markers_infer_the_same_masks_batched(bos_tokenizer_dir, style, monkeypatch):
    """assistant_only_loss with a template without {% generation %}: the batched path renders every prefix of every
    conversation at once and gives prepare_example's examples (which infers them one conversation at a time)."""
    from test_templates import LLAMA3_TOKENS, TEMPLATES, without_markers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": [fixtures.IM_START, fixtures.IM_END, *LLAMA3_TOKENS]})
    tok.chat_template = without_markers(TEMPLATES[style])
    rows = fixtures.make_rows("messages", 150, 3) + fixtures.make_rows("conversational_prompt_completion", 50, 3)
    rows.append({"messages": [{"role": "user", "content": "no answer"}]})  # no assistant token: the row's error
    config = DataConfig(assistant_only_loss=True, max_length=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = one_by_one(rows, tok, config)
        got = examples.prepare_examples(rows, tok, config)
    assert_same(got, want)
    assert isinstance(want[-1], formats.BadRowError)
    assert sum(int(w["loss_mask"].sum()) for w in want[:-1]) > 0


def test_a_template_inference_refuses_names_its_first_row(bos_tokenizer_dir):
    from test_templates import THINKING, THINKING_GENERATION_PROMPT
    from transformers import AutoTokenizer

    from jsft.data.chat import ChatTemplateError

    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    tok.chat_template = THINKING_GENERATION_PROMPT
    rows = [{"messages": THINKING[:1]}] * 3 + [{"messages": THINKING}] * 2  # no assistant turn: nothing to infer
    with pytest.raises(ChatTemplateError, match="row 13: .*generation prompt is not how it opens that turn"):
        examples.prepare_examples(rows, tok, DataConfig(assistant_only_loss=True, max_length=None), first_index=10)


@pytest.mark.parametrize("markers", [True, False])
def test_rows_with_tools_and_template_kwargs_are_batched_by_equal_values(tokenizer_dir, markers, monkeypatch):
    """A `tools` column (a list, or a JSON string of one) and a `chat_template_kwargs` column: each row renders with its
    own values, rows with equal values in one call; bad values stay their row's error."""
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = "{%- if greeting %}{{ greeting + '\\n' }}{%- endif %}" + fixtures.CHATML_TEMPLATE
    tok.chat_template = template if markers else template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")

    def tool(name):
        return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}

    rows = []
    for i, row in enumerate(fixtures.make_rows("messages", 60, 5) + fixtures.make_rows(
            "conversational_prompt_completion", 30, 5)):
        extra = {}
        if i % 3 == 0:
            extra["tools"] = [tool(f"tool_{i % 4}")]
        elif i % 3 == 1:
            extra["tools"] = json.dumps([tool("spell")])
        if i % 2 == 0:
            extra["chat_template_kwargs"] = {"greeting": f"hello {i % 5}"}
        rows.append({**row, **extra})
    rows[7] = {**rows[7], "tools": "[{"}  # malformed JSON
    rows[8] = {**rows[8], "chat_template_kwargs": "not a dict"}
    for assistant_only in (False, True):
        config = DataConfig(assistant_only_loss=assistant_only, max_length=None)
        want = one_by_one(rows, tok, config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = examples.prepare_examples(rows, tok, config)
        monkeypatch.undo()
        assert_same(got, want)
        assert isinstance(want[7], formats.BadRowError) and isinstance(want[8], formats.BadRowError)
        text = tok.decode(got[0]["input_ids"].tolist())
        assert "tool_0" in text and "hello 0" in text


@pytest.mark.parametrize("markers", [True, False])
def test_messages_with_reasoning_or_non_string_fields_render_as_apply_chat_template_renders_them(tokenizer_dir,
                                                                                                markers):
    """Messages of plain strings skip transformers' sanitizing copy (batched._render_group); messages with a reasoning
    field (transformers aliases reasoning_content to `thinking`) or a non-string value must still render exactly as
    apply_chat_template renders them, mixed in one chunk with plain rows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = fixtures.CHATML_TEMPLATE.replace(
        "{% generation %}{{ message['content']",
        "{% generation %}{{ ('<think>' + message.thinking + '</think>' if message.thinking else '') + "
        "(message.score | string if message.score is defined else '') + message['content']",
    )
    assert template != fixtures.CHATML_TEMPLATE
    tok.chat_template = template if markers else template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    rows = fixtures.make_rows("messages", 30, 7)
    for i, row in enumerate(rows):
        answer = row["messages"][-1]
        if i % 3 == 0:
            row["messages"][-1] = {**answer, "reasoning_content": f"think {i}"}
        elif i % 3 == 1:
            row["messages"][-1] = {**answer, "score": i}
    config = DataConfig(assistant_only_loss=True, max_length=None)
    got, want = examples.prepare_examples(rows, tok, config), one_by_one(rows, tok, config)
    assert_same(got, want)
    assert "<think>think 0</think>" in tok.decode(got[0]["input_ids"].tolist())
    assert tok.decode(got[1]["input_ids"][got[1]["loss_mask"]].tolist()).startswith("1")
    strings_only = rows[::3] + rows[2::3]  # reasoning rows among plain ones, every value a string
    assert_same(examples.prepare_examples(strings_only, tok, config), one_by_one(strings_only, tok, config))


def test_rows_whose_tools_differ_only_in_key_order_render_their_own_tools(tokenizer_dir):
    """`tojson` writes keys in their order, so two rows whose tools hold the same schema with keys in another order
    render differently and must not share one render call."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    rows = [{"messages": messages, "tools": '[{"type": "function", "function": {"name": "f", "description": "d"}}]'},
            {"messages": messages, "tools": '[{"function": {"description": "d", "name": "f"}, "type": "function"}]'},
            {"messages": messages, "tools": [{"type": "function", "function": {"name": "f"}}],
             "chat_template_kwargs": {"a": "1", "b": "2"}},
            {"messages": messages, "tools": [{"type": "function", "function": {"name": "f"}}],
             "chat_template_kwargs": {"b": "2", "a": "1"}}]
    config = DataConfig(max_length=None)
    got = examples.prepare_examples(rows, tok, config)
    assert_same(got, one_by_one(rows, tok, config))
    assert not np.array_equal(got[0]["input_ids"], got[1]["input_ids"])


def test_a_template_that_does_not_compile_is_a_config_error_not_a_bad_row(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = "{% for m in messages %}{{ m.content }"
    with pytest.raises(ConfigError, match="chat template does not compile"):
        examples.prepare_examples(fixtures.make_rows("messages", 3, 0), tok,
                                  DataConfig(max_length=None, skip_bad_rows=True))


@pytest.mark.parametrize("markers", [True, False])
def test_plain_string_rendering_gives_transformers_text_and_generation_spans(tokenizer_dir, markers):
    """batched renders messages of plain strings itself (the template's globals merged once, not per call): same
    texts and {% generation %} spans as transformers' render_jinja_template, with the template's globals
    (namespace, raise_exception) and the special tokens as variables; what the template raises still comes out."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = "{%- set ns = namespace(n=0) %}{{ bos_token or '' }}" + fixtures.CHATML_TEMPLATE + \
        "{%- for m in messages %}{%- set ns.n = ns.n + 1 %}{%- endfor %}{{ '#' ~ ns.n ~ eos_token }}"
    tok.chat_template = template if markers else template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    conversations = [formats.check_messages(row["messages"], k, "messages")
                     for k, row in enumerate(fixtures.make_rows("messages", 12, 5))]
    for prompt in (False, True):
        got = batched._render_group(tok, conversations, None, {}, markers, prompt, only_strings=True)
        want = batched._render_group(tok, conversations, None, {}, markers, prompt, only_strings=False)
        assert got == want
        assert got[0][0].endswith(f"#{len(conversations[0])}{tok.eos_token}")
    tok.chat_template = "{{ raise_exception('no ' + messages[0]['role']) }}"
    with pytest.raises(batched.TemplateFailure, match="no user"):
        batched._render_group(tok, conversations[:1], None, {}, markers, only_strings=True)


def test_divergence_is_the_common_prefix_length():
    import os
    import random

    from jsft.data import chat

    generator = random.Random(0)
    for _ in range(2000):
        a, b = ("".join(generator.choice("ab") for _ in range(generator.randint(0, 12))) for _ in range(2))
        assert chat._divergence(a, b) == len(os.path.commonprefix([a, b])), (a, b)
