"""Templates whose rendering of a turn depends on what follows it, and reasoning fields: each assistant turn is
trained as it renders when it is the last turn (as at inference), in a document of its own where the full
conversation renders it otherwise; a template that cannot render what the model writes is refused with the fix."""

import copy
import warnings

import numpy as np
import pytest

from jsft import fixtures
from jsft.config import ConfigError, DataConfig
from jsft.data import BadRowError, examples, prepare_example
from jsft.data.chat import ChatTemplateError

QWEN3_LIKE = (  # reasoning rendered only after the last user turn; the last turn always gets a think block
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set reasoning = m.reasoning_content or '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_user %}{{ '<think>' + reasoning + '</think>' }}{%- endif %}"
    "{{ content + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
SYSTEM_IN_LAST_USER = (  # Mistral-Nemo style: the system prompt goes into the last user turn
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for m in loop_messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in loop_messages %}"
    "{%- if m.role == 'user' %}{{ '[INST]' + (system + '\\n\\n' if system and loop.index0 == ns.last_user else '')"
    " + m.content + '[/INST]' }}"
    "{%- else %}{{ m.content + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
THINK_PROMPT_DROPPED = (  # DeepSeek-R1-Distill style: the generation prompt opens <think>, turns never show reasoning
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{ '<|im_start|>user\\n' + m.content }}"
    "{%- else %}{{ '<|im_start|>assistant\\n' + m.content.split('</think>')[-1] + '<|im_end|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
THINK_PROMPT_RENDERED = (  # the generation prompt opens <think>, and every turn renders its reasoning after it
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{ '<|im_start|>user\\n' + m.content }}"
    "{%- else %}{{ '<|im_start|>assistant\\n<think>\\n' + (m.reasoning_content or '') + '</think>' + m.content"
    " + '<|im_end|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
QUESTION_ANSWER = [
    {"role": "user", "content": "spell: 4"},
    {"role": "assistant", "content": "four", "reasoning_content": "4 is four"},
    {"role": "user", "content": "spell: 0"},
    {"role": "assistant", "content": "zero", "reasoning_content": "0 is zero"},
]
CONFIG = DataConfig(assistant_only_loss=True, max_length=None)


@pytest.fixture()
def tok(tokenizer):
    return copy.deepcopy(tokenizer)


def documents(tokenizer, example):
    """[(decoded document, decoded trained tokens)] of an example."""
    ends = np.cumsum(example.get("document_lengths", [len(example["input_ids"])]))
    out = []
    for a, b in zip(np.r_[0, ends[:-1]], ends):
        ids, mask = example["input_ids"][a:b], example["loss_mask"][a:b]
        out.append((tokenizer.decode(ids.tolist()), tokenizer.decode(ids[mask].tolist())))
    return out


def as_last_turn(tokenizer, messages, i):
    """What the template renders for assistant turn i when it is the last one: the text after the generation prompt."""
    before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
    upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
    assert upto.startswith(before)
    return upto[len(before):].rstrip()


def test_reasoning_dropped_from_history_trains_each_turn_as_rendered_last(tok):
    tok.chat_template = QWEN3_LIKE
    example = prepare_example({"messages": QUESTION_ANSWER}, tok, CONFIG)
    docs = documents(tok, example)
    assert [trained for _, trained in docs] == ["<think>0 is zero</think>zero<|im_end|>",
                                                "<think>4 is four</think>four<|im_end|>"]
    assert docs[0][0] == tok.apply_chat_template(QUESTION_ANSWER, tokenize=False)  # the full conversation first
    assert "4 is four" not in docs[0][0]  # the template drops it there: not trained from that document
    assert [trained for _, trained in docs][::-1] == [as_last_turn(tok, QUESTION_ANSWER, i) for i in (1, 3)]


def test_the_same_reasoning_in_content_or_under_other_names_trains_the_same(tok):
    """`<think>...</think>` inside content (the template parses it), `thinking` and `reasoning` (transformers aliases
    them to reasoning_content) reach the template and are trained where it renders them."""
    tok.chat_template = QWEN3_LIKE
    want = documents(tok, prepare_example({"messages": QUESTION_ANSWER}, tok, CONFIG))
    for name in ("thinking", "reasoning", "content"):
        messages = []
        for m in QUESTION_ANSWER:
            m = dict(m)
            if "reasoning_content" in m:
                reasoning = m.pop("reasoning_content")
                if name == "content":
                    m["content"] = f"<think>{reasoning}</think>{m['content']}"
                else:
                    m[name] = reasoning
            messages.append(m)
        assert documents(tok, prepare_example({"messages": messages}, tok, CONFIG)) == want, name


def test_system_prompt_moved_to_the_last_user_turn(tok):
    tok.chat_template = SYSTEM_IN_LAST_USER
    messages = [{"role": "system", "content": "be brief"}, *[{k: v for k, v in m.items() if k != "reasoning_content"}
                                                            for m in QUESTION_ANSWER]]
    example = prepare_example({"messages": messages}, tok, CONFIG)
    docs = documents(tok, example)
    assert len(docs) == 2 and [t for _, t in docs] == [f"zero{tok.eos_token}", f"four{tok.eos_token}"]
    assert docs[1][0] == f"[INST]be brief\n\nspell: 4[/INST]four{tok.eos_token}"  # as at inference after one question
    # without a system prompt every turn renders as it does last: one document
    plain = prepare_example({"messages": messages[1:]}, tok, CONFIG)
    assert "document_lengths" not in plain and documents(tok, plain)[0][1] == f"four{tok.eos_token}zero{tok.eos_token}"


def test_split_conversations_never_refuses_such_templates_by_name(tok):
    tok.chat_template = QWEN3_LIKE
    with pytest.raises(ChatTemplateError, match="row 2: .*changes earlier turns.*split_conversations='auto'"):
        prepare_example({"messages": QUESTION_ANSWER}, tok, DataConfig(assistant_only_loss=True, max_length=None,
                                                                       split_conversations="never"), row_index=2)


def test_a_think_opening_generation_prompt(tok):
    """The target is what the model writes after the generation prompt: trained where the template renders it (after
    its `<think>\\n`); refused, with the fix, where the template never renders the reasoning."""
    tok.chat_template = THINK_PROMPT_RENDERED
    docs = documents(tok, prepare_example({"messages": QUESTION_ANSWER}, tok, CONFIG))
    assert [t for _, t in docs] == ["4 is four</think>four<|im_end|>0 is zero</think>zero<|im_end|>"]
    tok.chat_template = THINK_PROMPT_DROPPED
    with pytest.raises(ChatTemplateError, match=r"row 0: .*generation prompt is not how it opens that turn.*"
                                                r"\{% generation %\}.*_training"):
        prepare_example({"messages": QUESTION_ANSWER}, tok, CONFIG, row_index=0)


def test_a_split_conversation_is_counted_and_each_document_packed_on_its_own(tok, tmp_path):
    from jsft.config import SFTConfig
    from jsft.data import pipeline

    tok.chat_template = QWEN3_LIKE
    rows = [{"messages": QUESTION_ANSWER}, {"messages": QUESTION_ANSWER[:2]}]
    config = SFTConfig()
    config.data.dataset_name = str(fixtures.write_jsonl(rows, tmp_path / "d.jsonl"))
    config.data.assistant_only_loss, config.data.max_length, config.data.packing = True, 64, True
    config.logging.output_dir = str(tmp_path / "out")
    prepared = pipeline.prepare_dataset(config, tok)
    assert prepared.stats["examples"] == 3 and prepared.stats["split_conversations"] == 1
    assert prepared.examples.source_rows.tolist() == [0, 0, 1]
    assert "split conversations: 1" in pipeline.format_stats(prepared.stats)


@pytest.mark.parametrize("content", ["", "   \n", [{"type": "text", "text": " "}]])
def test_an_empty_assistant_message_is_a_bad_row(tok, content):
    """It would train only the end-of-turn token (#13); skip_bad_rows counts it."""
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]}
    with pytest.raises(BadRowError, match=r"row 7, field 'messages\[1\].content': empty assistant message"):
        prepare_example(row, tok, CONFIG, row_index=7)
    (got,) = examples.prepare_examples([row], tok, DataConfig(max_length=None, skip_bad_rows=True))
    assert isinstance(got, BadRowError)
    # reasoning alone, or a tool call, is something to train
    prepare_example({"messages": [row["messages"][0], {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {}}}]}]}, tok, DataConfig(max_length=None))


def test_chat_data_with_a_tokenizer_without_eos_names_the_end_of_turn_token(tok):
    """No EOS would export eos_token_id: null (generate() never stops, #13): a ConfigError naming the template's
    end-of-turn token as the fix."""
    tok.eos_token = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match=r"no eos_token.*eos_token_id: null.*data.eos_token='<\|im_end\|>'"):
            prepare_example(fixtures.make_rows("messages", 1, 0)[0], tok, DataConfig(max_length=None))
