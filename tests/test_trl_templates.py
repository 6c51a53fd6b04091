"""TRL's bundled chat templates (trl/chat_templates): each original, whose assistant masks jsft infers, against its
`_training` variant with {% generation %} markers (TRL's masks), on conversations both render to the same text: the
same trained runs, up to whitespace at a run's edge and the end of the generation prompt (TRL's variants also mark
`<think>\\n` that the original's generation prompt writes). A conversation jsft splits (a turn rendered differently
once later turns follow) is trained as at inference instead: each trained run must then lie in a turn's rendering
as the last turn. (benchmarks/chat_templates.py runs the wider sweep.)"""

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest

from jsft import fixtures
from jsft.config import DataConfig
from jsft.data import prepare_example
from jsft.data.chat import ChatTemplateError, generation_prompt

trl = pytest.importorskip("trl")
FOLDER = Path(trl.__file__).parent / "chat_templates"
PAIRS = sorted(p.stem[: -len("_training")] for p in FOLDER.glob("*_training.jinja")
               if (FOLDER / f"{p.stem[: -len('_training')]}.jinja").exists())
CONVERSATIONS = {
    "single": [{"role": "user", "content": "question U1"}, {"role": "assistant", "content": "answer A1"}],
    "multi_turn": [{"role": "user", "content": "question U1"}, {"role": "assistant", "content": "answer A1"},
                   {"role": "user", "content": "question U2"}, {"role": "assistant", "content": "answer A2"}],
    "system": [{"role": "system", "content": "system S1"}, {"role": "user", "content": "question U1"},
               {"role": "assistant", "content": "answer A1"}],
    "reasoning": [{"role": "user", "content": "question U1"},
                  {"role": "assistant", "content": "answer A1", "reasoning_content": "reason R1"}],
}


# the generation prompt opens a thinking block that the rendered turn lacks (DeepSeek's originals drop the reasoning;
# Qwen3.5's no-think prompt closes an empty one where the data has reasoning)
REFUSED = {"deepseek_r1_distill", "deepseekv3", ("qwen3_5_nothink", "reasoning")}


def runs(tokenizer, ids, mask) -> list[str]:
    """Decoded runs of consecutive trained tokens, whitespace at their edges stripped."""
    edges = np.flatnonzero(np.diff(np.r_[0, np.asarray(mask, dtype=np.int8), 0]))
    return [tokenizer.decode([int(t) for t in ids[a:b]]).strip() for a, b in zip(edges[::2], edges[1::2])]


def same(ours: list[str], theirs: list[str], opening: str) -> bool:
    if len(ours) != len(theirs):
        return False
    tail = opening.strip()
    return all(a == b or (b.endswith(a) and tail.endswith(b[: len(b) - len(a)].strip()))
               for a, b in zip(sorted(ours, key=len), sorted(theirs, key=len)))


def as_last_turn(tokenizer, messages, i) -> str:
    """Assistant turn i as rendered when it is the last turn: after what it shares with the generation prompt."""
    import os

    before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
    upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
    return upto[len(os.path.commonprefix([before, upto])):]


def test_trl_ships_the_pairs():
    assert len(PAIRS) >= 25 and "qwen3" in PAIRS and "llama3" in PAIRS


@pytest.mark.parametrize("name", PAIRS)
def test_original_and_training_variant_train_the_same_tokens(tokenizer, name):
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = fixtures.BOS  # Llama 3's templates write it
    original, variant = (FOLDER / f"{name}.jinja").read_text(), (FOLDER / f"{name}_training.jinja").read_text()
    config = DataConfig(assistant_only_loss=True, max_length=None)
    compared = 0
    for shape, messages in CONVERSATIONS.items():
        try:
            tok.chat_template = variant
            rendered_variant = tok.apply_chat_template(messages, tokenize=False)
            marked = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
            tok.chat_template = original
            if tok.apply_chat_template(messages, tokenize=False) != rendered_variant:
                continue
        except Exception:  # noqa: BLE001 (a template that refuses this shape: nothing to compare)
            continue
        if not all(m["content"] in rendered_variant for m in messages):
            continue  # the template leaves out string content (VLM templates render content parts only)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                example = prepare_example({"messages": messages}, tok, config, row_index=0)
        except ChatTemplateError as e:  # only what cannot be rendered; the refusal says why and how to fix it
            assert (name, shape) in REFUSED or name in REFUSED, str(e)
            assert "generation prompt is not how it opens that turn" in str(e) and "_training" in str(e), str(e)
            continue
        ends = np.cumsum(example.get("document_lengths", [len(example["input_ids"])]))
        ours = [r for a, b in zip(np.r_[0, ends[:-1]], ends)
                for r in runs(tok, example["input_ids"][a:b], example["loss_mask"][a:b])]
        if "document_lengths" in example:
            last_turns = [as_last_turn(tok, messages, i) for i, m in enumerate(messages) if m["role"] == "assistant"]
            assert all(any(r in turn for turn in last_turns) for r in ours), (shape, ours)
            continue
        theirs = runs(tok, np.asarray(marked["input_ids"]), marked["assistant_masks"])
        assert same(ours, theirs, generation_prompt(tok) or ""), (shape, ours, theirs)
        compared += 1
    # nothing to compare: DeepSeek's originals drop the reasoning the variants render (and are refused), GLM-4's
    # variant closes the conversation with <|user|>, the VLM templates render content parts only
    assert compared or name in ("deepseek_r1_distill", "deepseekv3", "glm4moe", "idefics3", "smolvlm", "llava_next",
                                "qwen2_5_vl", "qwen3_vl"), f"{name}: no conversation compared"
