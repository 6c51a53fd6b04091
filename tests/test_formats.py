"""Formats, EOS/BOS, truncation and bad rows of prepare_example (TRL parity itself: test_trl_parity_data.py)."""

import copy
import json

import numpy as np
import pytest

from jsft import fixtures
from jsft.config import ConfigError, DataConfig
from jsft.data import BadRowError, prepare_example, read_jsonl
from jsft.data.formats import detect_format


@pytest.fixture(scope="module")
def bos_tokenizer(bos_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bos_tokenizer_dir)


def decode(tokenizer, example, trained_only=False):
    ids = example["input_ids"][example["loss_mask"]] if trained_only else example["input_ids"]
    return tokenizer.decode(ids.tolist())


USER_ASSISTANT = [{"role": "user", "content": "spell: 4 0"}, {"role": "assistant", "content": "four zero"}]


# ----------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "row,expected",
    [
        ({"text": "a"}, "text"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"prompt": USER_ASSISTANT[:1], "completion": USER_ASSISTANT[1:]}, "conversational_prompt_completion"),
        ({"messages": USER_ASSISTANT}, "messages"),
        ({"conversations": [{"from": "human", "value": "x"}]}, "messages"),
        ({"input_ids": [1, 2]}, "tokenized"),
    ],
)
def test_format_is_detected_from_the_columns(row, expected):
    assert detect_format(row, DataConfig()) == expected


def test_dataset_text_field_names_the_text_column(tokenizer):
    example = prepare_example({"body": "spell: 1 => one"}, tokenizer, DataConfig(dataset_text_field="body"))
    assert decode(tokenizer, example) == "spell: 1 => one<|endoftext|>"


def test_example_arrays_have_the_contract_dtypes(tokenizer):
    for kind in fixtures.FORMATS:
        example = prepare_example(fixtures.make_rows(kind, 1, 0)[0], tokenizer, DataConfig())
        assert example["input_ids"].dtype == np.int32 and example["loss_mask"].dtype == np.bool_
        assert example["input_ids"].shape == example["loss_mask"].shape


def test_text_gets_eos_and_is_fully_trained(tokenizer):
    example = prepare_example({"text": "digits: one => 1"}, tokenizer, DataConfig())
    assert decode(tokenizer, example) == "digits: one => 1<|endoftext|>"
    assert example["loss_mask"].all()


def test_prompt_completion_trains_only_the_completion_by_default(tokenizer):
    example = prepare_example({"prompt": "spell: 4 =>", "completion": " four"}, tokenizer, DataConfig())
    assert decode(tokenizer, example, trained_only=True) == " four<|endoftext|>"
    example = prepare_example(
        {"prompt": "spell: 4 =>", "completion": " four"}, tokenizer, DataConfig(completion_only_loss=False)
    )
    assert example["loss_mask"].all()


def test_prompt_that_merges_with_the_completion_warns_once(tokenizer, monkeypatch):
    """'spell: 1' + '2 =>' : the digits merge across the boundary; TRL's rule (common prefix) applies, with a warning."""
    from jsft.data import batched

    monkeypatch.setattr(batched, "_warned_prompt_not_prefix", False)
    row = {"prompt": "spell: 4 =", "completion": "> four"}
    with pytest.warns(UserWarning, match="not a prefix") as caught:
        example = prepare_example(row, tokenizer, DataConfig())
        prepare_example(row, tokenizer, DataConfig())
    assert len([w for w in caught if "not a prefix" in str(w.message)]) == 1
    prompt_ids = tokenizer("spell: 4 =")["input_ids"]
    start = int(np.argmax(example["loss_mask"]))
    assert example["input_ids"][:start].tolist() == prompt_ids[:start] and start < len(prompt_ids)


def test_conversational_prompt_completion_trains_the_assistant_reply(tokenizer):
    row = {"prompt": USER_ASSISTANT[:1], "completion": USER_ASSISTANT[1:]}
    example = prepare_example(row, tokenizer, DataConfig())
    assert decode(tokenizer, example, trained_only=True) == "four zero<|im_end|>\n"  # TRL: all after the prompt


def test_sharegpt_human_gpt_become_user_assistant(tokenizer):
    conversations = [
        {"from": "system", "value": "Answer with the words only."},
        {"from": "human", "value": "spell: 4 0"},
        {"from": "gpt", "value": "four zero"},
    ]
    messages = [{"role": r, "content": c} for r, c in zip(("system", "user", "assistant"), ("Answer with the words "
                "only.", "spell: 4 0", "four zero"))]
    config = DataConfig(assistant_only_loss=True)
    a = prepare_example({"conversations": conversations}, tokenizer, config)
    b = prepare_example({"messages": messages}, tokenizer, config)
    assert a["input_ids"].tolist() == b["input_ids"].tolist() and a["loss_mask"].tolist() == b["loss_mask"].tolist()
    assert "<|im_start|>user\n" in decode(tokenizer, a)


# ----------------------------------------------------------------------------------------------- BOS


def test_bos_tokenizer_adds_one_bos_to_text_and_never_two(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    plain = prepare_example({"text": "spell: 1 => one"}, bos_tokenizer, DataConfig())
    already = prepare_example({"text": fixtures.BOS + "spell: 1 => one"}, bos_tokenizer, DataConfig())
    assert plain["input_ids"][0] == bos and plain["input_ids"][1] != bos
    assert already["input_ids"].tolist() == plain["input_ids"].tolist()  # TRL would give two BOS here


def test_bos_prompt_completion_never_doubles_and_masks_the_same(bos_tokenizer):
    row = {"prompt": fixtures.BOS + "spell: 4 =>", "completion": " four"}
    example = prepare_example(row, bos_tokenizer, DataConfig())
    assert example["input_ids"].tolist().count(bos_tokenizer.bos_token_id) == 1
    assert decode(bos_tokenizer, example, trained_only=True) == " four<|endoftext|>"


def test_chat_template_decides_bos_for_conversations(bos_tokenizer):
    """apply_chat_template adds no special tokens (TRL): the ChatML fixture template writes no BOS."""
    example = prepare_example({"messages": USER_ASSISTANT}, bos_tokenizer, DataConfig())
    assert bos_tokenizer.bos_token_id not in example["input_ids"].tolist()


# ----------------------------------------------------------------------------------------------- truncation


def test_truncation_keep_start_and_keep_end(tokenizer):
    row = {"text": "spell: 1 2 3 4 5 6 => one two three four five six"}
    full = prepare_example(row, tokenizer, DataConfig(max_length=None))["input_ids"]
    start = prepare_example(row, tokenizer, DataConfig(max_length=5))["input_ids"]
    end = prepare_example(row, tokenizer, DataConfig(max_length=5, truncation_mode="keep_end"))["input_ids"]
    assert len(full) > 5
    assert start.tolist() == full[:5].tolist() and end.tolist() == full[-5:].tolist()


def test_packing_returns_the_full_example(tokenizer):
    row = {"text": "spell: 1 2 3 4 5 6 => one two three four five six"}
    full = prepare_example(row, tokenizer, DataConfig(max_length=None))["input_ids"]
    packed = prepare_example(row, tokenizer, DataConfig(max_length=5, packing=True))["input_ids"]
    assert packed.tolist() == full.tolist()


# ----------------------------------------------------------------------------------------------- pre-tokenized


def test_pretokenized_labels_mark_trained_tokens(tokenizer):
    row = {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}
    example = prepare_example(row, tokenizer, DataConfig())
    assert example["input_ids"].tolist() == [5, 6, 7, 8]
    assert example["loss_mask"].tolist() == [False, False, True, True]


def test_pretokenized_completion_mask_applies_only_with_completion_only_loss(tokenizer):
    """TRL: completion_only_loss=None is off for pre-tokenized rows, so their completion_mask is ignored."""
    row = {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]}
    assert prepare_example(row, tokenizer, DataConfig())["loss_mask"].all()
    on = prepare_example(row, tokenizer, DataConfig(completion_only_loss=True))
    assert on["loss_mask"].tolist() == [False, False, True, True]


def test_pretokenized_assistant_masks_always_apply(tokenizer):
    row = {"input_ids": [5, 6, 7, 8], "assistant_masks": [0, 1, 1, 0]}
    assert prepare_example(row, tokenizer, DataConfig())["loss_mask"].tolist() == [False, True, True, False]


# ----------------------------------------------------------------------------------------------- bad rows


def assert_bad_row(excinfo, row_index, field):
    error = excinfo.value
    assert error.row_index == row_index and error.field == field
    message = str(error)
    assert f"row {row_index}" in message and repr(field) in message and "Fix:" in message


def test_malformed_json_line_names_line_and_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c\n{"text": "d"}\n')
    rows = read_jsonl(path)
    assert next(rows) == {"text": "a"} and next(rows) == {"text": "b"}
    with pytest.raises(BadRowError) as excinfo:
        next(rows)
    assert_bad_row(excinfo, 2, "json")
    assert "line 4" in str(excinfo.value) and str(path) in str(excinfo.value)


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["text", "a"]\n')
    with pytest.raises(BadRowError) as excinfo:
        list(read_jsonl(path))
    assert excinfo.value.row_index == 0 and excinfo.value.field == "json" and "line 1" in str(excinfo.value)


def test_read_jsonl_reads_the_fixture_files(data_dir):
    rows = list(read_jsonl(data_dir / "messages_test.jsonl"))
    assert len(rows) == 200 and rows[0] == json.loads((data_dir / "messages_test.jsonl").read_text().splitlines()[0])


BAD_ROWS = {
    "missing role": ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages[0].role"),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    "unknown sharegpt role": ({"conversations": [{"from": "alien", "value": "hi"}]}, "conversations[0].role"),
    "non-string content": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 4}]},
        "messages[1].content",
    ),
    "image content part": ({"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]},
                           "messages[0].content"),
    "message not a dict": ({"messages": ["hi"]}, "messages[0]"),
    "messages not a list": ({"messages": "hi"}, "messages"),
    "empty messages": ({"messages": []}, "messages"),
    "empty completion": ({"prompt": "spell: 1 =>", "completion": ""}, "completion"),
    "empty conversational completion": ({"prompt": USER_ASSISTANT[:1], "completion": []}, "completion"),
    "mixed prompt/completion": ({"prompt": USER_ASSISTANT[:1], "completion": "four zero"}, "completion"),
    "bad prompt message": ({"prompt": [{"role": "user"}], "completion": USER_ASSISTANT[1:]}, "prompt[0].content"),
    "unknown columns": ({"question": "a", "answer": "b"}, "columns"),
    "prompt only": ({"prompt": "spell: 1 =>"}, "completion"),
    "text not a string": ({"text": ["a"]}, "text"),
    "completion not a string": ({"prompt": "a", "completion": 3}, "completion"),
    "empty text": ({"text": ""}, "text"),
    "tools malformed JSON": ({"messages": USER_ASSISTANT, "tools": "[{"}, "tools"),
    "tools not a list": ({"messages": USER_ASSISTANT, "tools": {"name": "x"}}, "tools"),
    "kwargs not a dict": ({"messages": USER_ASSISTANT, "chat_template_kwargs": "x"}, "chat_template_kwargs"),
    "tools not schemas": ({"messages": USER_ASSISTANT, "tools": ["get_weather"]}, "tools"),
    "kwargs an apply_chat_template argument": (
        {"messages": USER_ASSISTANT, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    "labels not a copy": ({"input_ids": [5, 6, 7], "labels": [-100, 9, 7]}, "labels"),
    "labels wrong length": ({"input_ids": [5, 6, 7], "labels": [-100, 6]}, "labels"),
    "input ids out of vocab": ({"input_ids": [5, 6, 100_000]}, "input_ids"),
    "input ids empty": ({"input_ids": []}, "input_ids"),
    "input ids not integers": ({"input_ids": [1.5, 2.0]}, "input_ids"),
    "input ids nested": ({"input_ids": [[5, 6], [7, 8]]}, "input_ids"),
    "nothing trained": ({"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}, "loss_mask"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_error_names_row_and_field(tokenizer, case):
    row, field = BAD_ROWS[case]
    with pytest.raises(BadRowError) as excinfo:
        prepare_example(row, tokenizer, DataConfig(), row_index=17)
    assert_bad_row(excinfo, 17, field)


def test_unknown_format_lists_columns_found_and_expected(tokenizer):
    with pytest.raises(BadRowError, match=r"\['answer', 'question'\].*'prompt'\+'completion'.*'messages'"):
        prepare_example({"question": "a", "answer": "b"}, tokenizer, DataConfig(), row_index=3)


def test_conversation_without_assistant_turn_is_bad_for_assistant_only(tokenizer):
    row = {"messages": [{"role": "user", "content": "spell: 1"}]}
    with pytest.raises(BadRowError) as excinfo:
        prepare_example(row, tokenizer, DataConfig(assistant_only_loss=True), row_index=5)
    assert_bad_row(excinfo, 5, "messages")
    assert "no assistant tokens" in str(excinfo.value)


@pytest.mark.parametrize("mode,field", [("keep_start", "completion")])
def test_row_whose_trained_tokens_are_truncated_away_is_bad(tokenizer, mode, field):
    row = {"prompt": "notes: " + "the " * 40 + "spell: 1 =>", "completion": " one"}
    with pytest.raises(BadRowError) as excinfo:
        prepare_example(row, tokenizer, DataConfig(max_length=16, truncation_mode=mode), row_index=9)
    assert_bad_row(excinfo, 9, field)
    assert "truncation to max_length=16" in str(excinfo.value)
    # keep_end keeps the completion, and packing leaves the length to the packer
    assert prepare_example(row, tokenizer, DataConfig(max_length=16, truncation_mode="keep_end"))["loss_mask"].any()
    assert prepare_example(row, tokenizer, DataConfig(max_length=16, packing=True))["loss_mask"].sum() == 3


def test_skip_bad_rows_still_raises_so_the_pipeline_counts(tokenizer):
    """The contract: prepare_example always raises BadRowError; the pipeline catches it when skip_bad_rows."""
    with pytest.raises(BadRowError):
        prepare_example({"prompt": "a", "completion": ""}, tokenizer, DataConfig(skip_bad_rows=True), row_index=0)


def test_assistant_only_loss_on_plain_text_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="assistant_only_loss=True needs conversational rows") as excinfo:
        prepare_example({"text": "a"}, tokenizer, DataConfig(assistant_only_loss=True), row_index=0)
    assert not isinstance(excinfo.value, BadRowError)  # never skipped as a bad row


ALTERNATING = (
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{%- endif %}"
    "{{ message['role'] + ': ' + message['content'] + '<|im_end|>' }}"
    "{%- endfor %}"
)


def test_conversation_the_template_refuses_is_a_bad_row(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = ALTERNATING
    with pytest.raises(BadRowError) as excinfo:
        prepare_example({"messages": USER_ASSISTANT[::-1]}, tok, DataConfig(), row_index=2)
    assert_bad_row(excinfo, 2, "messages")
    assert "roles must alternate" in str(excinfo.value)


def test_conversational_rows_need_a_chat_template(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template: set data.chat_template_path"):
        prepare_example({"messages": USER_ASSISTANT}, tok, DataConfig(), row_index=0)


def test_bad_row_error_pickles_whole():
    import pickle

    error = pickle.loads(pickle.dumps(BadRowError(3, "completion", "empty completion", "give it one")))
    assert (error.row_index, error.field, error.problem, error.fix) == (3, "completion", "empty completion", "give it one")
    assert str(error) == "row 3, field 'completion': empty completion. Fix: give it one"


def test_row_index_unknown_still_names_the_field(tokenizer):
    with pytest.raises(BadRowError, match=r"row \(index unknown\), field 'completion'"):
        prepare_example({"prompt": "a", "completion": ""}, tokenizer, DataConfig())


def test_a_template_that_fails_on_a_rows_data_is_that_rows_error(tokenizer):
    """Not only raise_exception: a Python error inside the template (here len() of an int tool-call id) is a
    BadRowError naming the row, which skip_bad_rows can skip."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m.tool_calls %}{{ m.tool_calls[0]['id'] | length }}{% endif %}"
                         "{{ m['content'] }}{% endfor %}")
    row = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "", "tool_calls": [{"id": 123, "type": "function"}]}]}
    for assistant_only in (False, True):
        with pytest.raises(BadRowError) as excinfo:
            prepare_example(row, tok, DataConfig(assistant_only_loss=assistant_only), row_index=9)
        assert_bad_row(excinfo, 9, "messages")
        assert "TypeError" in str(excinfo.value)


PARTS_TEMPLATE = (  # ChatML that also renders content given as a list of text parts
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_content_as_text_parts_renders_like_the_same_string(tokenizer):
    """OpenAI-style content [{"type": "text", "text": ...}, ...] goes to the template as TRL passes it; with a template
    that joins the parts, the example equals the one with the joined string (both paths, assistant masks inferred)."""
    from jsft.data import examples

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = PARTS_TEMPLATE
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "spell: "}, {"type": "text", "text": "4"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "four"}]}]}
    joined = {"messages": [{"role": "user", "content": "spell: 4"}, {"role": "assistant", "content": "four"}]}
    config = DataConfig(assistant_only_loss=True, max_length=None)
    want = prepare_example(joined, tok, config)
    for got in (prepare_example(parts, tok, config), examples.prepare_examples([parts], tok, config)[0]):
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["loss_mask"], want["loss_mask"])
    assert tok.decode(want["input_ids"][want["loss_mask"]].tolist()) == "four<|im_end|>"


def test_a_file_mixing_formats_takes_each_row_by_its_own_columns(tokenizer):
    """datasets gives every row every column (None where a row lacks it): a text row is not a bad prompt/completion."""
    config = DataConfig(max_length=None)
    text_row = {"text": "spell: 1 => one", "prompt": None, "completion": None}
    pc_row = {"text": None, "prompt": "spell: 1 =>", "completion": " one"}
    assert detect_format(text_row, config) == "text" and detect_format(pc_row, config) == "prompt_completion"
    assert prepare_example(text_row, tok := tokenizer, config)["loss_mask"].all()
    assert not prepare_example(pc_row, tok, config)["loss_mask"].all()
    with pytest.raises(BadRowError) as excinfo:  # a row whose only format column is None: its own error
        prepare_example({"text": None, "other": 1}, tokenizer, config, row_index=4)
    assert_bad_row(excinfo, 4, "text")


def test_a_nested_input_ids_row_is_named_nested():
    with pytest.raises(BadRowError, match=r"expected a flat list of integers, got a nested list \(2 dimensions\)"):
        prepare_example({"input_ids": [[5, 6], [7, 8]]}, None, DataConfig(), row_index=3)


def test_a_single_compressed_jsonl_file_reads_like_the_plain_one(tmp_path):
    import gzip

    from jsft.config import DataConfig
    from jsft.data.sources import load_rows

    rows = fixtures.make_rows("prompt_completion", 5, seed=1)
    plain = fixtures.write_jsonl(rows, tmp_path / "rows.jsonl")
    packed = tmp_path / "rows.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    got = load_rows(DataConfig(dataset_name=str(packed)), "train")
    assert got.to_list() == load_rows(DataConfig(dataset_name=str(plain)), "train").to_list()
