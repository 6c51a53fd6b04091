"""Chat templates: inferred assistant masks equal {% generation %} masks; templates that cannot be inferred are named;
loading a template from a .jinja file or cloning it (with new tokens) from another tokenizer directory."""

import warnings

import numpy as np
import pytest

from jsft import fixtures
from jsft.config import ConfigError, DataConfig
from jsft.data import load_tokenizer, prepare_example
from jsft.data.chat import ChatTemplateError, has_generation_markers
from jsft.data.examples import stop_token_trained

LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CHATML = fixtures.CHATML_TEMPLATE
LLAMA3 = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}{{ message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MISTRAL = (  # the system prompt goes in front of the first user message; the assistant turn ends with </s> (EOS)
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{%- endif %}"
    "{%- endfor %}"
)
USER_ASSISTANT_PAIR = [{"role": "user", "content": "spell: 4"}, {"role": "assistant", "content": "four"}]
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}


def without_markers(template: str) -> str:
    return template.replace("{% generation %}", "").replace("{% endgeneration %}", "")


@pytest.fixture(scope="module")
def chat_tokenizer(bos_tokenizer_dir):
    """The BOS fixture tokenizer plus Llama-3 header tokens (all three templates tokenize with it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": [fixtures.IM_START, fixtures.IM_END, *LLAMA3_TOKENS]})
    return tok


def tokenize_conversation(tokenizer, messages, assistant_mask=True):
    """(ids, assistant mask) of one conversation through the one row -> example path."""
    example = prepare_example({"messages": messages}, tokenizer, DataConfig(assistant_only_loss=assistant_mask,
                                                                           max_length=None))
    return example["input_ids"].tolist(), example["loss_mask"]


def with_template(tokenizer, template):
    tokenizer.chat_template = template
    return tokenizer


def conversations(n=150):
    """Fixture conversations: 1-4 turns, some with a system message, some long."""
    rows = fixtures.make_rows("messages", n, 0) + fixtures.make_rows("messages", n, 7)
    chosen = [r["messages"] for r in rows]
    assert any(m[0]["role"] == "system" for m in chosen) and any(len(m) >= 6 for m in chosen)
    return chosen


@pytest.mark.parametrize("style", list(TEMPLATES))
def test_inferred_assistant_masks_equal_generation_marker_masks(chat_tokenizer, style):
    marked, unmarked = TEMPLATES[style], without_markers(TEMPLATES[style])
    assert has_generation_markers(marked) and not has_generation_markers(unmarked)
    for messages in conversations():
        ids_m, mask_m = tokenize_conversation(with_template(chat_tokenizer, marked), messages, assistant_mask=True)
        ids_i, mask_i = tokenize_conversation(with_template(chat_tokenizer, unmarked), messages, assistant_mask=True)
        assert ids_m == ids_i
        assert mask_m.tolist() == mask_i.tolist(), chat_tokenizer.decode(np.asarray(ids_i)[mask_i])
        n_assistant = sum(m["role"] == "assistant" for m in messages)
        assert mask_m.any() and np.sum(np.diff(mask_m.astype(int)) == 1) + mask_m[0] == n_assistant


@pytest.mark.parametrize("style", list(TEMPLATES))
def test_assistant_mask_covers_content_and_turn_end(chat_tokenizer, style):
    tok = with_template(chat_tokenizer, without_markers(TEMPLATES[style]))
    messages = [
        {"role": "system", "content": "Answer with the words only."},
        {"role": "user", "content": "spell: 4 0"},
        {"role": "assistant", "content": "four zero"},
        {"role": "user", "content": "digits: one"},
        {"role": "assistant", "content": "1"},
    ]
    example = prepare_example({"messages": messages}, tok, DataConfig(assistant_only_loss=True))
    trained = tok.decode(example["input_ids"][example["loss_mask"]].tolist())
    end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": tok.eos_token}[style]
    space = " " if style == "mistral" else ""
    assert trained == f"{space}four zero{end}{space}1{end}"
    assert stop_token_trained(tok)


def test_conversation_that_opens_with_the_assistant(chat_tokenizer):
    messages = [{"role": "assistant", "content": "hello"}, *USER_ASSISTANT_PAIR]
    marked = tokenize_conversation(with_template(chat_tokenizer, CHATML), messages, assistant_mask=True)
    inferred = tokenize_conversation(with_template(chat_tokenizer, without_markers(CHATML)), messages, assistant_mask=True)
    assert marked[0] == inferred[0] and marked[1].tolist() == inferred[1].tolist()
    assert chat_tokenizer.decode(np.asarray(marked[0])[marked[1]].tolist()) == "hello<|im_end|>four<|im_end|>"


def test_conversational_prompt_completion_with_inferred_masks(chat_tokenizer):
    """Assistant-only and completion-only together: the completion's assistant turn, nothing of the prompt."""
    tok = with_template(chat_tokenizer, without_markers(LLAMA3))
    row = fixtures.make_rows("conversational_prompt_completion", 40, 0)[5]
    example = prepare_example(row, tok, DataConfig(assistant_only_loss=True))
    answer = row["completion"][0]["content"]
    assert tok.decode(example["input_ids"][example["loss_mask"]].tolist()) == answer + "<|eot_id|>"


# ----------------------------------------------------------------------------------------------- refused templates

DROPS_EARLIER_REASONING = (  # like Qwen3: earlier assistant turns lose their <think> block
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and not loop.last %}"
    "{{ message['content'].split('</think>')[-1] | trim + '<|im_end|>\\n' }}"
    "{%- else %}{{ message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
THINKING_GENERATION_PROMPT = (  # the generation prompt opens an empty thought block the rendered turns do not have
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)
THINKING = [
    {"role": "user", "content": "spell: 4"},
    {"role": "assistant", "content": "<think>4 is four</think>four"},
    {"role": "user", "content": "spell: 0"},
    {"role": "assistant", "content": "<think>0 is zero</think>zero"},
]


def test_template_that_rewrites_earlier_turns_is_split_or_refused_by_name(chat_tokenizer):
    """split_conversations=auto: the first turn (its reasoning dropped in the full rendering) is trained in a
    document of its own, as rendered when it is the last turn; never: refused by name."""
    tok = with_template(chat_tokenizer, DROPS_EARLIER_REASONING)
    example = prepare_example({"messages": THINKING}, tok, DataConfig(assistant_only_loss=True), row_index=4)
    first, second = np.split(np.arange(len(example["input_ids"])), [example["document_lengths"][0]])
    trained = [tok.decode(example["input_ids"][d][example["loss_mask"][d]].tolist()) for d in (first, second)]
    assert trained == ["<think>0 is zero</think>zero<|im_end|>", "<think>4 is four</think>four<|im_end|>"]
    with pytest.raises(ChatTemplateError, match="changes earlier turns when a later turn is added") as excinfo:
        prepare_example({"messages": THINKING}, tok, DataConfig(assistant_only_loss=True, split_conversations="never"),
                        row_index=4)
    assert "row 4" in str(excinfo.value) and "reasoning/thinking" in str(excinfo.value)
    # one assistant turn has no earlier turn to rewrite: one document
    single = prepare_example({"messages": THINKING[:2]}, tok, DataConfig(assistant_only_loss=True))
    assert "document_lengths" not in single
    assert tok.decode(single["input_ids"][single["loss_mask"]].tolist()) == "<think>4 is four</think>four<|im_end|>"


def test_template_whose_generation_prompt_differs_is_refused_by_name(chat_tokenizer):
    tok = with_template(chat_tokenizer, THINKING_GENERATION_PROMPT)
    with pytest.raises(ChatTemplateError, match="generation prompt is not how it opens that turn"):
        prepare_example({"messages": THINKING[:2]}, tok, DataConfig(assistant_only_loss=True), row_index=0)


def test_refused_template_works_without_assistant_only_loss(chat_tokenizer):
    tok = with_template(chat_tokenizer, DROPS_EARLIER_REASONING)
    assert prepare_example({"messages": THINKING}, tok, DataConfig())["loss_mask"].all()


# ----------------------------------------------------------------------------------------------- stop-token warning

UNTRAINED_STOP_MARKED = CHATML.replace(
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
    "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
)
NO_STOP_TOKEN = (  # plain-text turns: nothing special ends the assistant turn
    "{%- for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}"
)


@pytest.mark.parametrize("template", [UNTRAINED_STOP_MARKED, NO_STOP_TOKEN], ids=["markers", "inferred"])
def test_untrained_turn_end_warns_once(tokenizer_dir, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = template
    assert not stop_token_trained(tok)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for row in fixtures.make_rows("messages", 5, 0):
            prepare_example(row, tok, DataConfig(assistant_only_loss=True))
    assert [str(w.message) for w in caught if "end-of-turn" in str(w.message)].__len__() == 1


def test_trained_turn_end_does_not_warn(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_example(fixtures.make_rows("messages", 1, 0)[0], tokenizer, DataConfig(assistant_only_loss=True))


# ----------------------------------------------------------------------------------------------- loading templates


def test_own_template_is_kept(tokenizer_dir):
    tok, added = load_tokenizer(tokenizer_dir, DataConfig())
    assert tok.chat_template == CHATML and added == [] and tok.pad_token == fixtures.PAD


def test_jinja_file_template_is_used_as_is(bos_tokenizer_dir, tmp_path):
    path = tmp_path / "llama3.JINJA"
    path.write_text(without_markers(LLAMA3))
    with pytest.warns(UserWarning, match=r"writes <\|end_header_id\|>, <\|eot_id\|>, <\|start_header_id\|>, which"):
        tok, added = load_tokenizer(bos_tokenizer_dir, DataConfig(chat_template_path=str(path)))
    assert tok.chat_template == without_markers(LLAMA3) and added == []
    path = tmp_path / "chatml.j2"  # its <|im_start|> / <|im_end|> are tokens of the fixture: no warning
    path.write_text(CHATML)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tokenizer(bos_tokenizer_dir, DataConfig(chat_template_path=str(path)))
    text = tok.apply_chat_template(THINKING[:2], tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")  # BOS printed by the template


def test_missing_jinja_file_is_a_config_error(tokenizer_dir, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tokenizer_dir, DataConfig(chat_template_path=str(tmp_path / "nope.jinja")))


@pytest.fixture(scope="module")
def llama3_source_dir(tokenizer_dir, tmp_path_factory):
    """Another tokenizer directory: the fixture tokenizer plus Llama-3 special tokens, a Llama-3 template, eos <|eot_id|>."""
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(tokenizer_dir)
    source.add_special_tokens({"additional_special_tokens": [fixtures.IM_START, fixtures.IM_END, *LLAMA3_TOKENS]})
    source.eos_token = "<|eot_id|>"
    source.chat_template = without_markers(LLAMA3).replace("{{ bos_token }}", "")
    out = tmp_path_factory.mktemp("llama3_source")
    source.save_pretrained(out)
    return out


def test_cloned_template_adds_the_missing_tokens_and_reports_their_ids(tokenizer_dir, llama3_source_dir):
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(llama3_source_dir)
    tok, added = load_tokenizer(tokenizer_dir, DataConfig(chat_template_path=str(llama3_source_dir)))
    vocab_before = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    assert added == list(range(vocab_before, vocab_before + 3))  # only the tokens this vocabulary lacked
    assert tok.convert_ids_to_tokens(added) == LLAMA3_TOKENS
    assert tok.chat_template == source.chat_template
    assert tok.eos_token == "<|eot_id|>" and tok.eos_token_id == added[2]
    # the rendered example uses the new ids, and the assistant mask (inferred: no markers) ends on <|eot_id|>
    row = {"messages": THINKING[:2]}
    example = prepare_example(row, tok, DataConfig(assistant_only_loss=True))
    assert set(added) <= set(example["input_ids"].tolist())
    trained = example["input_ids"][example["loss_mask"]].tolist()
    assert trained[-1] == added[2] and tok.decode(trained) == "<think>4 is four</think>four<|eot_id|>"
    # plain text now ends with the cloned EOS, as in TRL
    assert prepare_example({"text": "a"}, tok, DataConfig())["input_ids"][-1] == added[2]


def test_clone_from_a_path_that_is_no_tokenizer_is_a_config_error(tokenizer_dir, tmp_path):
    with pytest.raises(ConfigError, match="neither a .jinja/.j2 file nor a tokenizer directory"):
        load_tokenizer(tokenizer_dir, DataConfig(chat_template_path=str(tmp_path / "missing_dir")))


def test_clone_from_a_directory_without_a_template_is_refused(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tokenizer_dir)
    bare.chat_template = None
    bare.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="has no chat template to clone"):
        load_tokenizer(tokenizer_dir, DataConfig(chat_template_path=str(tmp_path)))


def test_eos_and_pad_overrides(tokenizer_dir):
    tok, _ = load_tokenizer(tokenizer_dir, DataConfig(eos_token=fixtures.IM_END, pad_token=fixtures.EOS))
    assert tok.eos_token == fixtures.IM_END and tok.pad_token == fixtures.EOS
    assert prepare_example({"text": "a"}, tok, DataConfig())["input_ids"][-1] == tok.convert_tokens_to_ids(fixtures.IM_END)
    with pytest.raises(ConfigError, match="data.eos_token='<nope>' is not in the tokenizer's vocabulary"):
        load_tokenizer(tokenizer_dir, DataConfig(eos_token="<nope>"))
    with pytest.raises(ConfigError, match="data.pad_token='<nope>'"):
        load_tokenizer(tokenizer_dir, DataConfig(pad_token="<nope>"))


def test_explicit_eos_wins_over_the_cloned_one(tokenizer_dir, llama3_source_dir):
    config = DataConfig(chat_template_path=str(llama3_source_dir), eos_token=fixtures.IM_END)
    tok, _ = load_tokenizer(tokenizer_dir, config)
    assert tok.eos_token == fixtures.IM_END


def test_the_stop_token_probe_never_breaks_valid_rows(chat_tokenizer):
    """A template that wants a system message first refuses the user/assistant/user probe: the check probes with a
    system message instead, and valid rows prepare."""
    tok = with_template(chat_tokenizer, "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}"
                                        "{% endif %}" + CHATML)
    row = {"messages": [{"role": "system", "content": "s"}, *USER_ASSISTANT_PAIR]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the end-of-turn token is trained: no warning either
        example = prepare_example(row, tok, DataConfig(assistant_only_loss=True, max_length=None), row_index=0)
    assert tok.decode(example["input_ids"][example["loss_mask"]].tolist()) == "four<|im_end|>"


PHI3 = (  # closes a conversation with EOS, which it does not write between turns
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def test_a_template_that_closes_the_conversation_with_a_token_is_inferred(chat_tokenizer):
    """Phi-3 style: rendered alone, a prefix ends with EOS where the full conversation goes on; that closing special
    token is not the turn's, so each turn still ends on <|end|> (the last one also trains the closing EOS)."""
    import copy

    from jsft.data import examples

    tok = copy.deepcopy(chat_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = PHI3
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    config = DataConfig(assistant_only_loss=True, max_length=None)
    example = prepare_example({"messages": messages}, tok, config)
    trained = tok.decode(example["input_ids"][example["loss_mask"]].tolist())
    assert trained == "b<|end|>d<|end|>\n" + tok.eos_token
    (batched_example,) = examples.prepare_examples([{"messages": messages}], tok, config)
    np.testing.assert_array_equal(batched_example["loss_mask"], example["loss_mask"])


ZEPHYR = (  # writes the generation prompt inside the message loop: an empty conversation renders nothing
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)
# fails on an empty conversation (as Llama 3.1's does)
READS_FIRST = "{%- if messages[0]['content'] | trim %}{% endif %}" + without_markers(CHATML)


@pytest.mark.parametrize("template, trained, problem", [
    (without_markers(CHATML), "hello<|im_end|>a<|im_end|>", None),
    (PHI3, "hello<|end|>a<|end|>\n<|endoftext|>", None),
    (ZEPHYR, None, "renders no generation prompt for an empty conversation"),
    (READS_FIRST, None, "fails on an empty conversation"),
])
def test_a_conversation_opening_with_the_assistant(chat_tokenizer, template, trained, problem):
    """Inference renders the empty conversation before the first turn: where that shows the turn's start it trains
    the turn; where the template cannot show it, the row's error (skippable), from both paths."""
    import copy

    from jsft.data import BadRowError, examples

    tok = copy.deepcopy(chat_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = template
    row = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}
    config = DataConfig(assistant_only_loss=True, max_length=None)
    (batched_result,) = examples.prepare_examples([row], tok, config, first_index=3)
    if problem is None:
        example = prepare_example(row, tok, config)
        assert tok.decode(example["input_ids"][example["loss_mask"]].tolist()) == trained
        np.testing.assert_array_equal(batched_result["loss_mask"], example["loss_mask"])
        return
    with pytest.raises(BadRowError, match=rf"row 3, field 'messages\[0\]': .*{problem}"):
        prepare_example(row, tok, config, row_index=3)
    assert isinstance(batched_result, BadRowError) and problem in str(batched_result)
