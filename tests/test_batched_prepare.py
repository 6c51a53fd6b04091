"""jsft.data.batched.prepare_examples gives exactly prepare_example's examples and errors, row by row."""

import numpy as np
import pytest

from jsft import fixtures
from jsft.config import DataConfig
from jsft.data import batched, formats


def one_by_one(rows, tokenizer, config):
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(formats.prepare_example(row, tokenizer, config, row_index=i))
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


CASES = [(kind, False) for kind in fixtures.FORMATS] + [("messages", True), ("conversational_prompt_completion", True)]


@pytest.mark.parametrize("kind,assistant_only", CASES)
def test_batched_equals_one_by_one_on_every_fixture_format(tokenizer, kind, assistant_only):
    rows = fixtures.make_rows(kind, 300, 7)
    config = DataConfig(assistant_only_loss=assistant_only, max_length=None)
    assert_same(batched.prepare_examples(rows, tokenizer, config), one_by_one(rows, tokenizer, config))


def test_mixed_and_bad_rows_keep_their_place_and_their_errors(tokenizer):
    good = fixtures.make_rows("messages", 6, 3)
    rows = [
        good[0],
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": "a question, no answer"}]},  # no assistant token
        dict(good[1], tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        {"conversations": [{"from": "human", "value": "spell: 1"}, {"from": "gpt", "value": "one"}]},
        good[2],
    ]
    config = DataConfig(assistant_only_loss=True, max_length=None)
    got = batched.prepare_examples(rows, tokenizer, config, first_index=0)
    assert_same(got, one_by_one(rows, tokenizer, config))
    assert isinstance(got[1], formats.BadRowError) and isinstance(got[2], formats.BadRowError)
