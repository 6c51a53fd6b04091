"""prepare_example gives TRL 1.16's tokens and trained positions, for every fixture format and loss setting.

TRL's real preparation runs: one SFTTrainer per module (tiny checkpoint, packing off, no shuffle), then
`trainer._prepare_dataset` on a small `datasets.Dataset` per case. TRL's trained positions are labels != -100.
"""

import dataclasses
import json

import numpy as np
import pytest

from jsft import fixtures
from jsft.config import DataConfig
from jsft.data import BadRowError, prepare_example

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
datasets.disable_progress_bars()

N_ROWS = 120  # per case; the fixture's long tail (filler notes, multi-turn, system) shows up in this many

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "spell",
            "description": "Spell digits as words.",
            "parameters": {"type": "object", "properties": {"digits": {"type": "string"}}, "required": ["digits"]},
        },
    }
]
# A template that reads a per-row chat_template_kwargs value.
KWARGS_TEMPLATE = "{%- if greeting %}{{ greeting + '\\n' }}{%- endif %}" + fixtures.CHATML_TEMPLATE


@pytest.fixture(scope="module")
def trainer(tokenizer_dir, checkpoint_dir, tmp_path_factory):
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path_factory.mktemp("trl_out")),
        max_length=None,
        shuffle_dataset=False,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    own_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train = datasets.Dataset.from_list(fixtures.make_rows("messages", 4, 0))
    return SFTTrainer(model=str(checkpoint_dir), args=args, train_dataset=train, processing_class=own_tokenizer)


def trl_prepare(trainer, rows, tokenizer, completion_only_loss=None, assistant_only_loss=False, **args):
    """TRL's prepared rows (idx, input_ids, labels) for `rows`, with SFTTrainer's own decisions for this dataset."""
    rows = [dict(row, idx=i) for i, row in enumerate(rows)]
    sample = rows[0]
    if completion_only_loss is None:  # SFTTrainer.__init__'s rule, on the first row of the dataset
        trainer.completion_only_loss = "prompt" in sample and "completion" in sample
    else:
        trainer.completion_only_loss = completion_only_loss
    trl_args = dataclasses.replace(trainer.args, assistant_only_loss=assistant_only_loss, **args)
    trainer.chat_template = None  # the fixture templates have generation markers: TRL swaps nothing in
    prepared = trainer._prepare_dataset(
        datasets.Dataset.from_list(rows), tokenizer, trl_args, False, None, "parity"
    )
    return {row["idx"]: (row["input_ids"], row["labels"]) for row in prepared}


def assert_parity(rows, tokenizer, config, expected):
    for i, row in enumerate(rows):
        ids, labels = expected[i]
        example = prepare_example(row, tokenizer, config, row_index=i)
        assert example["input_ids"].tolist() == ids, f"row {i}: token ids differ from TRL"
        assert example["loss_mask"].tolist() == [label != -100 for label in labels], f"row {i}: trained positions"


def fixture_rows(kind, n=N_ROWS):
    return fixtures.make_rows(kind, n, 0)


SETTINGS = {  # name -> (completion_only_loss, assistant_only_loss)
    "plain": (False, False),
    "default": (None, False),  # completion-only for prompt/completion data
    "completion_only": (True, False),
}


CASES = [
    (kind, setting)
    for kind in fixtures.FORMATS
    for setting in SETTINGS
    if setting != "completion_only" or "prompt_completion" in kind  # no completion mask elsewhere: same as default
]


@pytest.mark.parametrize("tokenizer_kind", ["plain", "bos"])
@pytest.mark.parametrize("kind,setting", CASES)
def test_same_tokens_and_trained_positions_as_trl(trainer, tokenizer, bos_tokenizer_dir, kind, setting, tokenizer_kind):
    from transformers import AutoTokenizer

    tok = tokenizer if tokenizer_kind == "plain" else AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    completion_only, assistant_only = SETTINGS[setting]
    rows = fixture_rows(kind, 60 if kind in ("messages", "conversational_prompt_completion") else N_ROWS)
    expected = trl_prepare(trainer, rows, tok, completion_only, assistant_only)
    config = DataConfig(max_length=None, completion_only_loss=completion_only, assistant_only_loss=assistant_only)
    assert_parity(rows, tok, config, expected)


@pytest.mark.parametrize("kind", ["messages", "conversational_prompt_completion"])
@pytest.mark.parametrize("completion_only", [None, False])
def test_assistant_only_loss_same_as_trl(trainer, tokenizer, kind, completion_only):
    rows = fixture_rows(kind)
    expected = trl_prepare(trainer, rows, tokenizer, completion_only, assistant_only_loss=True)
    config = DataConfig(max_length=None, completion_only_loss=completion_only, assistant_only_loss=True)
    assert_parity(rows, tokenizer, config, expected)


def test_inferred_assistant_masks_equal_trls_marker_masks(trainer, tokenizer, tokenizer_dir):
    """jsft on the ChatML template WITHOUT markers trains exactly what TRL trains WITH them."""
    from transformers import AutoTokenizer

    rows = fixture_rows("messages")
    expected = trl_prepare(trainer, rows, tokenizer, assistant_only_loss=True)
    unmarked = AutoTokenizer.from_pretrained(tokenizer_dir)
    unmarked.chat_template = fixtures.CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert_parity(rows, unmarked, DataConfig(max_length=None, assistant_only_loss=True), expected)


@pytest.mark.parametrize("assistant_only", [False, True])
def test_tools_column_same_as_trl(trainer, tokenizer, assistant_only):
    rows = [dict(row, tools=json.dumps(TOOLS)) for row in fixture_rows("messages", 40)]
    expected = trl_prepare(trainer, rows, tokenizer, assistant_only_loss=assistant_only)
    assert_parity(rows, tokenizer, DataConfig(max_length=None, assistant_only_loss=assistant_only), expected)
    example = prepare_example(rows[0], tokenizer, DataConfig(max_length=None))
    assert '"name": "spell"' in tokenizer.decode(example["input_ids"])  # the template saw the tools


def test_chat_template_kwargs_column_same_as_trl(trainer, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = KWARGS_TEMPLATE
    rows = [
        dict(row, chat_template_kwargs={"greeting": f"hello {i}"}) for i, row in enumerate(fixture_rows("messages", 30))
    ]
    expected = trl_prepare(trainer, rows, tok, assistant_only_loss=True)
    assert_parity(rows, tok, DataConfig(max_length=None, assistant_only_loss=True), expected)
    assert tok.decode(prepare_example(rows[3], tok, DataConfig())["input_ids"]).startswith("hello 3\n")


def test_sharegpt_conversations_same_as_trl(trainer, tokenizer):
    """TRL renames from/value to role/content; with user/assistant names both give the same tokens."""
    rows = [
        {"conversations": [{"from": m["role"], "value": m["content"]} for m in row["messages"]]}
        for row in fixture_rows("messages", 40)
    ]
    expected = trl_prepare(trainer, rows, tokenizer, assistant_only_loss=True)
    assert_parity(rows, tokenizer, DataConfig(max_length=None, assistant_only_loss=True), expected)


@pytest.mark.parametrize("columns", ["labels", "completion_mask", "assistant_masks"])
@pytest.mark.parametrize("completion_only", [None, True])
def test_pretokenized_rows_same_as_trl(trainer, tokenizer, columns, completion_only):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(30):
        ids = rng.integers(5, 380, size=int(rng.integers(3, 40))).tolist()
        mask = (rng.random(len(ids)) < 0.6).astype(int).tolist()
        mask[-1] = 1
        if columns == "labels":
            rows.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
        else:
            rows.append({"input_ids": ids, columns: mask})
    expected = trl_prepare(trainer, rows, tokenizer, completion_only)
    assert_parity(rows, tokenizer, DataConfig(max_length=None, completion_only_loss=completion_only), expected)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("kind", ["prompt_completion", "conversational_prompt_completion", "text"])
def test_truncation_same_as_trl_and_dropped_rows_are_bad_rows(trainer, tokenizer, kind, mode):
    """Rows TRL keeps come out identical; rows TRL silently drops (no label left) raise BadRowError instead."""
    rows = fixture_rows(kind)
    max_length = 24
    expected = trl_prepare(trainer, rows, tokenizer, max_length=max_length, truncation_mode=mode)
    config = DataConfig(max_length=max_length, truncation_mode=mode)
    raised = set()
    for i, row in enumerate(rows):
        try:
            example = prepare_example(row, tokenizer, config, row_index=i)
        except BadRowError as e:
            assert e.row_index == i and "truncation" in str(e)
            raised.add(i)
            continue
        ids, labels = expected[i]
        assert example["input_ids"].tolist() == ids
        assert example["loss_mask"].tolist() == [label != -100 for label in labels]
    assert raised == set(range(len(rows))) - set(expected)
    if kind != "text" and mode == "keep_start":
        assert raised, "the case should exercise dropped rows"


@pytest.mark.parametrize("kind", ["text", "prompt_completion"])
def test_eos_already_present_is_not_added_again_as_in_trl(trainer, tokenizer, kind):
    rows = fixture_rows(kind, 20)
    field = "text" if kind == "text" else "completion"
    rows = [dict(row, **{field: row[field] + fixtures.EOS}) if i % 2 else row for i, row in enumerate(rows)]
    expected = trl_prepare(trainer, rows, tokenizer)
    assert_parity(rows, tokenizer, DataConfig(max_length=None), expected)
    assert prepare_example(rows[1], tokenizer, DataConfig())["input_ids"].tolist().count(tokenizer.eos_token_id) == 1


def test_cloned_template_same_tokens_and_new_ids_as_trl_clone(trainer, tokenizer_dir, checkpoint_dir, tmp_path):
    """load_tokenizer's clone adds the same tokens with the same ids as TRL's clone_chat_template (TRL then also pads
    the vocabulary with dummy tokens to a multiple of 64; jsft leaves that to the model side), sets the same EOS, and
    the rendered rows are identical."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.chat_template_utils import clone_chat_template

    from jsft.data import load_tokenizer

    source = AutoTokenizer.from_pretrained(tokenizer_dir)
    new_tokens = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    source.add_special_tokens({"additional_special_tokens": [fixtures.IM_START, fixtures.IM_END, *new_tokens]})
    source.eos_token = "<|eot_id|>"
    source.chat_template = (
        "{%- for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    )
    source.save_pretrained(tmp_path / "source")

    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir)
    _, trl_tok, trl_added = clone_chat_template(model, AutoTokenizer.from_pretrained(tokenizer_dir), str(tmp_path / "source"))
    tok, added = load_tokenizer(tokenizer_dir, DataConfig(chat_template_path=str(tmp_path / "source")))
    assert added == trl_added[: len(added)] and tok.convert_ids_to_tokens(added) == new_tokens
    assert all(t.startswith("<extra_id_") for t in trl_tok.convert_ids_to_tokens(trl_added[len(added):]))
    assert (tok.eos_token, tok.eos_token_id, tok.chat_template) == (
        trl_tok.eos_token, trl_tok.eos_token_id, trl_tok.chat_template
    )
    for kind in ("messages", "text", "prompt_completion"):
        rows = fixture_rows(kind, 30)
        old_eos = trainer._tokenizer.eos_token  # TRL appends the trainer tokenizer's EOS; the clone changed it
        trainer._tokenizer.eos_token = trl_tok.eos_token
        try:
            expected = trl_prepare(trainer, rows, trl_tok)
        finally:
            trainer._tokenizer.eos_token = old_eos
        assert_parity(rows, tok, DataConfig(max_length=None), expected)
