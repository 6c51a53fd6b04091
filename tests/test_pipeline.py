"""The Grain pipeline: batch contract per document, TRL's drop rule, cache, resumable and process-sliced iterators."""

import dataclasses
import json
import os

import numpy as np
import pytest

from jsft import fixtures
from jsft.config import ConfigError, SFTConfig
from jsft.data import examples as examples_module
from jsft.data import formats, packing, pipeline, sources, tokenize
from jsft.data.pipeline import (Examples, PreparedDataset, batch_iterator, build_rows, format_stats, prepare_dataset,
                                steps_per_epoch)
from jsft.validate import validate


def make_config(tmp_path, data_file, **data):
    config = SFTConfig()
    config.data.dataset_name = str(data_file)
    config.data.max_length = 512
    config.data.packing = True
    for k, v in data.items():
        setattr(config.data, k, v)
    config.logging.output_dir = str(tmp_path / "out")
    return config


def hand_examples(docs):
    """Examples from [(tokens, mask), ...]."""
    tokens = np.concatenate([np.array(t, np.int32) for t, _ in docs])
    mask = np.concatenate([np.array(m, bool) for _, m in docs])
    offsets = np.concatenate([[0], np.cumsum([len(t) for t, _ in docs])])
    return Examples(tokens, mask, offsets, np.arange(len(docs)), len(docs))


@pytest.fixture(scope="module")
def chat(tmp_path_factory, tokenizer_dir, data_dir):
    """The fixture's 2,000 messages rows, assistant-only, prepared once (bfd at 512)."""
    from jsft.data import load_tokenizer

    tmp = tmp_path_factory.mktemp("chat")
    config = make_config(tmp, data_dir / "messages.jsonl", assistant_only_loss=True)
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    return config, tokenizer, prepare_dataset(config, tokenizer)


def reference_row(prepared, row):
    """The batch contract of one row, built document by document with plain loops."""
    L, pad = prepared.max_length, prepared.pad_id
    out = {"input_ids": [], "segment_ids": [], "positions": [], "targets": [], "loss_mask": []}
    ex = prepared.examples
    for segment, (e, start, stop) in enumerate(prepared.rows.to_lists()[row], start=1):
        t = ex.tokens[ex.offsets[e] + start : ex.offsets[e] + stop].tolist()
        m = ex.loss_mask[ex.offsets[e] + start : ex.offsets[e] + stop].tolist()
        n = len(t)
        out["input_ids"] += t
        out["segment_ids"] += [segment] * n
        out["positions"] += list(range(n))
        out["targets"] += t[1:] + [pad]
        out["loss_mask"] += m[1:] + [False]
    fill = {"input_ids": pad, "segment_ids": 0, "positions": 0, "targets": pad, "loss_mask": False}
    return {k: np.array(v + [fill[k]] * (L - len(v))) for k, v in out.items()}


def test_packed_row_is_the_docstring_example():
    a, b, c, d, e, pad = 10, 11, 12, 13, 14, 1
    examples = hand_examples([([a, b, c], [0, 1, 1]), ([d, e], [1, 1])])
    rows = packing.Packed(np.array([0, 2]), np.array([0, 1]), np.array([0, 0]), np.array([3, 2]))
    batch = PreparedDataset(examples, rows, 8, pad, {}).batch([0])
    assert batch["input_ids"][0].tolist() == [a, b, c, d, e, pad, pad, pad]
    assert batch["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
    assert batch["positions"][0].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    assert batch["targets"][0].tolist() == [b, c, pad, e, pad, pad, pad, pad]
    assert batch["loss_mask"][0].tolist() == [1, 1, 0, 1, 0, 0, 0, 0]
    assert {k: v.dtype for k, v in batch.items()} == {
        "input_ids": np.int32, "segment_ids": np.int32, "positions": np.int32, "targets": np.int32, "loss_mask": bool}


def test_every_packed_row_matches_documents_taken_one_by_one(chat):
    _, _, prepared = chat
    rows = np.arange(prepared.num_rows)
    batch = prepared.batch(rows)
    for r in rows[::7]:
        expected = reference_row(prepared, r)
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(batch[key][r], expected[key], err_msg=f"row {r} {key}")
    seg = batch["segment_ids"]
    assert (batch["positions"][seg == 0] == 0).all() and not batch["loss_mask"][seg == 0].any()
    # segment ids count 1, 2, ... and padding only at the tail
    assert all((np.diff(s[s > 0]) >= 0).all() and s[0] == 1 and (s[np.argmin(s > 0):] == 0).all() if (s == 0).any()
               else s[0] == 1 for s in seg)
    assert batch["loss_mask"].sum() == prepared.stats["trained_tokens"]


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped", "bfd_stream"])
def test_each_strategy_gives_contract_rows(chat, strategy, tmp_path):
    config, tokenizer, base = chat
    config = make_config(tmp_path, config.data.dataset_name, assistant_only_loss=True, packing_strategy=strategy,
                         cache_dir=str(tmp_path / "none"), packing_buffer_size=300)
    rows, L, stats = build_rows(base.examples, config.data, seed=0)
    prepared = PreparedDataset(base.examples, rows, L, base.pad_id, stats)
    batch = prepared.batch(np.arange(prepared.num_rows))
    assert batch["input_ids"].shape == (prepared.num_rows, 512)
    for r in range(0, prepared.num_rows, 11):
        expected = reference_row(prepared, r)
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(batch[key][r], expected[key], err_msg=f"{strategy} row {r} {key}")
    assert int(batch["loss_mask"].sum()) == stats["trained_tokens"]
    assert int((batch["segment_ids"] > 0).sum()) == stats["row_tokens"]


def test_trl_drop_rule_counts_examples_with_nothing_left_to_train():
    # doc 0: trained only past max_length; doc 1: trained only at its first token; doc 2 fine; max_length 4
    examples = hand_examples([([1] * 6, [0, 0, 0, 0, 1, 1]), ([2] * 3, [1, 0, 0]), ([3] * 5, [0, 0, 1, 1, 1])])
    for packing_on in (False, True):
        config = make_config_from_fields(max_length=4, packing=packing_on)
        rows, L, stats = build_rows(examples, config.data, seed=0)
        assert rows.to_lists() == [[(2, 0, 4)]]
        assert stats["dropped_no_trained_token"] == 2 and stats["dropped_tokens"] == 6 + 3
        assert stats["truncated_examples"] == 1 and stats["truncated_tokens"] == 1  # example 2 lost one token
        assert stats["trained_tokens"] == 2


def make_config_from_fields(**data):
    config = SFTConfig()
    for k, v in data.items():
        setattr(config.data, k, v)
    return config


def test_unpacked_rows_truncate_keep_end_and_pad_to_a_multiple_of_64():
    examples = hand_examples([([5] * 70, [1] * 70), ([6] * 3, [1] * 3)])
    rows, L, stats = build_rows(examples, make_config_from_fields(max_length=None, packing=False).data, seed=0)
    assert L == 128 and rows.to_lists() == [[(0, 0, 70)], [(1, 0, 3)]]
    rows, L, stats = build_rows(examples, make_config_from_fields(max_length=64, truncation_mode="keep_end").data, 0)
    assert L == 64 and rows.to_lists() == [[(0, 6, 70)], [(1, 0, 3)]] and stats["truncated_tokens"] == 6


def test_iterator_resumes_from_a_saved_state(chat):
    _, _, prepared = chat
    it = batch_iterator(prepared, rows_per_micro_batch=4, accum_steps=2, seed=3, num_epochs=None)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = batch_iterator(prepared, rows_per_micro_batch=4, accum_steps=2, seed=3, num_epochs=None)
    resumed.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip (checkpoint metadata)
    for want, got in zip(expected, [next(resumed) for _ in range(3)]):
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(want[key], got[key])


def first_row_tokens(batch):
    """Each row of a step as a hashable key (its first 64 tokens and segment count)."""
    ids = batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])
    return [r.tobytes() for r in ids]


def test_epochs_cover_every_row_once_and_reshuffle(chat):
    _, _, prepared = chat
    b, accum = 8, 3
    spe = steps_per_epoch(prepared, b, accum)
    assert spe == prepared.num_rows // 24
    steps = list(batch_iterator(prepared, b, accum, seed=0, num_epochs=2))
    assert len(steps) == 2 * spe and steps[0]["input_ids"].shape == (accum, b, prepared.max_length)
    all_rows = first_row_tokens(prepared.batch(np.arange(prepared.num_rows)))
    epoch1 = [r for s in steps[:spe] for r in first_row_tokens(s)]
    epoch2 = [r for s in steps[spe:] for r in first_row_tokens(s)]
    assert len(set(epoch1)) == len(epoch1) == spe * 24 and set(epoch1) <= set(all_rows)
    assert len(set(all_rows)) - len(set(epoch1)) == pipeline.dropped_rows_per_epoch(prepared, b, accum)
    assert epoch1 != epoch2 and set(epoch2) <= set(all_rows)


def test_process_slices_are_disjoint_and_make_the_single_process_batch(chat):
    _, _, prepared = chat
    per_process, count, accum = 2, 4, 2
    single = next(batch_iterator(prepared, per_process * count, accum, seed=1))
    parts = [next(batch_iterator(prepared, per_process, accum, seed=1, process_index=p, process_count=count))
             for p in range(count)]
    for key in pipeline.BATCH_KEYS:
        joined = np.concatenate([p[key] for p in parts], axis=1)  # [accum, per_process * count, L]
        np.testing.assert_array_equal(joined, single[key])
    rows = [set(first_row_tokens(p)) for p in parts]
    assert all(not (rows[i] & rows[j]) for i in range(count) for j in range(i + 1, count))


def test_second_build_hits_the_cache_and_does_not_tokenize(chat, monkeypatch, tmp_path):
    config, tokenizer, first = chat
    assert first.stats["cache"] == "miss"

    def fail(*args, **kwargs):
        raise AssertionError("prepare_example called on a cache hit")

    monkeypatch.setattr(examples_module, "prepare_example", fail)
    monkeypatch.setattr(examples_module, "prepare_examples", fail)
    config.data.packing_strategy = "bfd_split"  # packing settings are applied after the cache
    try:
        again = prepare_dataset(config, tokenizer)
    finally:
        config.data.packing_strategy = "bfd"
    assert again.stats["cache"] == "hit"
    np.testing.assert_array_equal(again.examples.tokens, first.examples.tokens)
    config2 = make_config(tmp_path, config.data.dataset_name, assistant_only_loss=False,
                          cache_dir=str(first_cache_dir(config)))
    with pytest.raises(AssertionError, match="cache hit"):  # a field that changes tokens misses the cache
        prepare_dataset(config2, tokenizer)


def first_cache_dir(config):
    from pathlib import Path

    return Path(config.data.cache_dir or Path(config.logging.output_dir) / "cache")


def test_bad_rows_raise_or_are_counted_per_reason(tmp_path, tokenizer_dir):
    from jsft.data import load_tokenizer

    rows = [{"messages": [{"role": "user", "content": "spell: 1"}, {"role": "assistant", "content": "one"}]}] * 5
    rows[1] = {"messages": "not a list"}
    rows[3] = {"messages": [{"role": "user", "content": "only a question"}]}
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = make_config(tmp_path, path, assistant_only_loss=True)
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    with pytest.raises(formats.BadRowError, match="row 1"):
        prepare_dataset(config, tokenizer)
    config.data.skip_bad_rows = True
    prepared = prepare_dataset(config, tokenizer)
    assert prepared.stats["examples"] == 3 and sum(prepared.stats["skipped_bad_rows"].values()) == 2
    assert len(prepared.stats["skipped_bad_rows"]) == 2
    assert prepared.examples.source_rows.tolist() == [0, 2, 4]
    report = format_stats(prepared.stats)
    assert "skipped bad rows: 2" in report and "messages" in report
    config.data.max_length, config.data.packing = None, False  # nothing truncated: the report says so
    assert "truncated: none (no max_length)" in format_stats(prepare_dataset(config, tokenizer).stats)


def test_a_bad_row_names_its_split_and_file(tmp_path, tokenizer_dir):
    """Train and eval rows are both counted from 0: the error says which split (and file) row 1 is in."""
    from jsft.data import load_tokenizer

    good = {"messages": [{"role": "user", "content": "spell: 1"}, {"role": "assistant", "content": "one"}]}
    bad = {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "one"}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    config = make_config(tmp_path, tmp_path / "train.jsonl", dataset_test_split=str(tmp_path / "test.jsonl"))
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    prepare_dataset(config, tokenizer, "train")
    with pytest.raises(formats.BadRowError,
                       match=r"eval split \(.*test\.jsonl, line 2\): row 1, field 'messages\[0\]\.role'"):
        prepare_dataset(config, tokenizer, "eval")


def test_stats_report_names_every_count(chat):
    report = format_stats(chat[2].stats)
    print("\n" + report)
    for word in ("rows read", "examples", "tokens", "trained", "fill", "truncated", "dropped", "skipped bad rows"):
        assert word in report
    s = chat[2].stats
    assert s["tokens"] == s["row_tokens"] + s["truncated_tokens"] + s["dropped_tokens"]


@pytest.mark.slow
def test_grain_worker_processes_give_the_same_examples_in_order(tmp_path, tokenizer_dir, data_dir):
    from jsft.data import load_tokenizer

    lines = open(data_dir / "messages.jsonl").readlines()[:600]
    lines[300] = json.dumps({"messages": "not a list"}) + "\n"  # a bad row, counted the same way by the workers
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(lines))
    config = make_config(tmp_path, path, assistant_only_loss=True, skip_bad_rows=True)
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    dataset = sources.load_rows(config.data)
    alone = tokenize.tokenize_rows(dataset, tokenizer, config.data)
    config.data.dataset_num_proc = 2
    workers = tokenize.tokenize_rows(dataset, tokenizer, config.data)
    for name in ("tokens", "loss_mask", "offsets", "source_rows"):
        np.testing.assert_array_equal(getattr(workers, name), getattr(alone, name))
    assert workers.bad_rows == alone.bad_rows and sum(alone.bad_rows.values()) == 1
    config.data.skip_bad_rows, config.data.dataset_num_proc = False, None
    with pytest.raises(formats.BadRowError, match="row 300, field 'messages'"):
        tokenize.tokenize_rows(dataset, tokenizer, config.data)


@pytest.mark.slow
def test_worker_processes_started_from_a_script_without_a_main_guard_get_the_fix(tmp_path, tokenizer_dir):
    """Grain's workers import the user's script again; without `if __name__ == "__main__":` they die at start and
    Grain says only "Worker process was terminated unexpectedly". jsft's error says the fix."""
    import subprocess
    import sys

    rows = fixtures.write_jsonl(fixtures.make_rows("text", 300, 0), tmp_path / "rows.jsonl")
    script = tmp_path / "prepare.py"
    script.write_text(
        "from jsft.config import SFTConfig\n"
        "from jsft.data import load_tokenizer\n"
        "from jsft.data.pipeline import prepare_dataset\n"
        "config = SFTConfig()\n"
        f"config.data.dataset_name, config.data.cache_dir = {str(rows)!r}, {str(tmp_path / 'cache')!r}\n"
        "config.data.max_length, config.data.dataset_num_proc = 128, 2\n"
        f"tokenizer, _ = load_tokenizer({str(tokenizer_dir)!r}, config.data)\n"
        "prepare_dataset(config, tokenizer)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    assert "ConfigError: a data worker process died (data.dataset_num_proc=2)" in done.stderr
    assert 'put its code under `if __name__ == "__main__":`' in done.stderr


def test_threads_give_the_same_examples_in_order_and_the_first_bad_row(tmp_path, tokenizer_dir, data_dir,
                                                                       monkeypatch):
    from jsft.data import load_tokenizer

    lines = open(data_dir / "messages.jsonl").readlines()[:900]
    lines[300] = json.dumps({"messages": "not a list"}) + "\n"
    lines[800] = json.dumps({"messages": [{"role": "nobody", "content": "x"}]}) + "\n"
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(lines))
    config = make_config(tmp_path, path, assistant_only_loss=True, skip_bad_rows=True)
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    dataset = sources.load_rows(config.data)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setattr(tokenize, "prepare_threads", lambda: 1)
    alone = tokenize.tokenize_rows(dataset, tokenizer, config.data)
    monkeypatch.setattr(tokenize, "prepare_threads", lambda: 3)
    threaded = tokenize.tokenize_rows(dataset, tokenizer, config.data)
    for name in ("tokens", "loss_mask", "offsets", "source_rows"):
        np.testing.assert_array_equal(getattr(threaded, name), getattr(alone, name))
    assert threaded.bad_rows == alone.bad_rows and sum(alone.bad_rows.values()) == 2
    assert "TOKENIZERS_PARALLELISM" not in os.environ  # set only while the threads ran
    config.data.skip_bad_rows = False
    for _ in range(3):  # whichever chunk finishes first, the error is the first bad row's
        with pytest.raises(formats.BadRowError, match="row 300, field 'messages'"):
            tokenize.tokenize_rows(dataset, tokenizer, config.data)


def test_eval_keeps_the_last_partial_step_with_empty_rows(chat):
    _, _, prepared = chat
    b, accum = 16, 2
    steps = list(batch_iterator(prepared, b, accum, seed=0, shuffle=False, drop_remainder=False, prefetch=0))
    assert len(steps) == steps_per_epoch(prepared, b, accum, drop_remainder=False) == -(-prepared.num_rows // 32)
    trained = sum(int(s["loss_mask"].sum()) for s in steps)
    assert trained == prepared.stats["trained_tokens"]  # every row once, the filler rows train nothing
    last = steps[-1]["segment_ids"].reshape(-1, prepared.max_length)
    empty = (last == 0).all(axis=1)
    assert empty.sum() == len(steps) * 32 - prepared.num_rows and empty[-1]
    in_order = np.concatenate([s["input_ids"].reshape(-1, prepared.max_length) for s in steps])[: prepared.num_rows]
    np.testing.assert_array_equal(in_order, prepared.batch(np.arange(prepared.num_rows))["input_ids"])


@pytest.mark.slow
def test_kept_examples_are_trls_rows_without_packing(tmp_path, tokenizer_dir, data_dir, checkpoint_dir):
    """TRL (no packing) truncates to max_length and drops rows left with no trained label; jsft keeps the same rows
    with the same tokens, and counts the drop (here in BOTH paths; TRL's packing path keeps such rows)."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    from jsft.data import load_tokenizer

    lines = open(data_dir / "messages.jsonl").readlines()[:500]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(dict(json.loads(line), idx=i)) + "\n" for i, line in enumerate(lines)))
    datasets.disable_progress_bars()
    args = TRLConfig(output_dir=str(tmp_path / "trl"), max_length=256, assistant_only_loss=True, shuffle_dataset=False,
                     report_to=[], use_cpu=True, bf16=False)
    trl_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = datasets.load_dataset("json", data_files=str(path), split="train")
    trainer = SFTTrainer(model=str(checkpoint_dir), args=args, train_dataset=rows.select(range(4)),
                         processing_class=trl_tokenizer)
    theirs = trainer._prepare_dataset(rows, trl_tokenizer, args, False, None, "train")

    config = make_config(tmp_path, path, assistant_only_loss=True, packing=False, max_length=256)
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    prepared = prepare_dataset(config, tokenizer)
    s = prepared.stats
    assert s["examples"] - s["dropped_no_trained_token"] == len(theirs) == prepared.num_rows
    assert s["dropped_no_trained_token"] > 0
    ex = prepared.examples
    for r, row in zip(range(prepared.num_rows), theirs):
        ((e, start, stop),) = prepared.rows.to_lists()[r]
        assert ex.source_rows[e] == row["idx"]
        assert ex.tokens[ex.offsets[e] + start : ex.offsets[e] + stop].tolist() == row["input_ids"]
        mask = ex.loss_mask[ex.offsets[e] + start : ex.offsets[e] + stop].tolist()
        assert mask == [label != -100 for label in row["labels"]]


def test_rows_load_from_a_directory_split_or_a_parquet_file(tmp_path, data_dir):
    import datasets

    folder = tmp_path / "folder"
    folder.mkdir()
    lines = open(data_dir / "text.jsonl").readlines()
    (folder / "train.jsonl").write_text("".join(lines[:30]))
    (folder / "test.jsonl").write_text("".join(lines[30:40]))
    config = make_config(tmp_path, folder, dataset_test_split="test")
    assert len(sources.load_rows(config.data, "train")) == 30
    assert len(sources.load_rows(config.data, "eval")) == 10
    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([json.loads(line) for line in lines[:7]]).to_parquet(str(parquet))
    config = make_config(tmp_path, parquet)
    assert sources.load_rows(config.data)["text"] == [json.loads(line)["text"] for line in lines[:7]]
    with pytest.raises(pipeline.ConfigError, match="one file"):
        sources.load_rows(make_config(tmp_path, parquet, dataset_test_split="test").data, "eval")


def test_cache_misses_when_the_data_file_changes(tmp_path, tokenizer_dir, data_dir):
    from jsft.data import load_tokenizer

    lines = open(data_dir / "text.jsonl").readlines()
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(lines[:20]))
    config = make_config(tmp_path, path, packing=False)
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    assert prepare_dataset(config, tokenizer).stats["cache"] == "miss"
    assert prepare_dataset(config, tokenizer).stats["cache"] == "hit"
    path.write_text("".join(lines[:21]))
    again = prepare_dataset(config, tokenizer)
    assert again.stats["cache"] == "miss" and again.stats["examples"] == 21


# ----------------------------------------------------------------------------------------------- reading, checking


def chat_lines(n):
    row = {"messages": [{"role": "user", "content": "spell: 1"}, {"role": "assistant", "content": "one"}]}
    return [json.dumps(row) + "\n" for _ in range(n)]


def test_malformed_json_line_is_an_error_naming_file_and_line(tmp_path, tokenizer_dir):
    from jsft.data import load_tokenizer

    lines = chat_lines(5)
    lines[2] = lines[2][:30] + "\n"  # the middle row is cut short
    path = tmp_path / "broken.jsonl"
    path.write_text("".join(lines))
    config = make_config(tmp_path, path, assistant_only_loss=True)
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    with pytest.raises(formats.BadRowError) as excinfo:
        prepare_dataset(config, tokenizer)
    message = str(excinfo.value)
    print("\n" + message)
    assert excinfo.value.row_index == 2 and excinfo.value.field == "json"
    assert "malformed JSON on line 3 of" in message and str(path) in message and "remove that line" in message
    assert isinstance(excinfo.value.__cause__, json.JSONDecodeError)  # not datasets' "error generating the dataset"


def test_malformed_json_lines_are_counted_skips_with_skip_bad_rows(tmp_path, tokenizer_dir):
    from jsft.data import load_tokenizer

    lines = chat_lines(6)
    lines[1], lines[4] = "{not json\n", "[1, 2]\n"  # rows 1 and 4 (lines 2 and 6: a blank line comes first)
    path = tmp_path / "broken.jsonl"
    path.write_text("".join(lines[:3] + ["\n"] + lines[3:]))
    config = make_config(tmp_path, path, assistant_only_loss=True, skip_bad_rows=True)
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    with pytest.warns(UserWarning, match=r"skipped 2 malformed JSON line\(s\).*line\(s\) 2, 6"):
        prepared = prepare_dataset(config, tokenizer)
    s = prepared.stats
    assert s["rows_read"] == 6 and s["examples"] == 4 and sum(s["skipped_bad_rows"].values()) == 2
    assert all(reason.startswith("json: ") for reason in s["skipped_bad_rows"])
    assert prepared.examples.source_rows.tolist() == [0, 2, 3, 5]  # rows of the file, as errors number them
    assert "skipped bad rows: 2" in format_stats(s)


def test_json_document_with_a_syntax_error_names_its_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n  {"text": "c"}\n]\n')
    config = make_config(tmp_path, path, skip_bad_rows=True)  # no row boundary to skip to: still an error
    with pytest.raises(formats.BadRowError, match=r"rows.json is not valid JSON: .* on line 4, column 3"):
        sources.load_rows(config.data)
    path.write_text('{"text": "a"}\n{"text": "b"\n')  # a .json file written as JSON lines: read line by line
    with pytest.raises(formats.BadRowError, match="line 2 of"):
        sources.load_rows(make_config(tmp_path, path).data)


def test_malformed_json_line_in_a_dataset_directory_names_the_file(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    with pytest.raises(formats.BadRowError, match=r"line 3 of .*train.jsonl"):
        sources.load_rows(make_config(tmp_path, folder).data)


@pytest.mark.parametrize("kind,data,field", [
    ("text", {"assistant_only_loss": True}, "data.assistant_only_loss"),
    ("prompt_completion", {"assistant_only_loss": True}, "data.assistant_only_loss"),
    ("text", {"completion_only_loss": True}, "data.completion_only_loss"),
    ("text", {"dataset_text_field": "content"}, "data.dataset_text_field"),
])
def test_impossible_loss_setting_fails_before_any_tokenization(tmp_path, tokenizer_dir, monkeypatch, kind, data,
                                                               field):
    from jsft.config import ConfigError
    from jsft.data import load_tokenizer
    from jsft.fixtures import make_rows, write_jsonl

    path = write_jsonl(make_rows(kind, 8, 0), tmp_path / f"{kind}.jsonl")
    config = make_config(tmp_path, path, **data)
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    monkeypatch.setattr(pipeline, "tokenize_rows", lambda *a, **k: pytest.fail("tokenized before the check"))
    with pytest.raises(ConfigError, match=field):
        prepare_dataset(config, tokenizer)


def test_the_data_check_accepts_every_format(tmp_path, tokenizer_dir):
    """Pre-tokenized ids (labels / assistant_masks), ShareGPT conversations, tools and chat_template_kwargs columns,
    conversational prompt/completion: each passes the check with the loss settings it supports."""
    from jsft.data import load_tokenizer
    from jsft.fixtures import make_rows

    tokenizer, _ = load_tokenizer(tokenizer_dir, SFTConfig().data)
    messages = make_rows("messages", 6, 0)
    example = examples_module.prepare_example(messages[0], tokenizer, SFTConfig().data)
    ids, mask = example["input_ids"].tolist(), example["loss_mask"].tolist()
    tools = json.dumps([{"type": "function", "function": {"name": "spell", "parameters": {"type": "object"}}}])
    cases = {
        "labels": ([{"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}] * 3,
                   {"assistant_only_loss": True}),
        "labels, completion only": ([{"input_ids": ids, "labels": ids}] * 3, {"completion_only_loss": True}),
        "assistant masks": ([{"input_ids": ids, "assistant_masks": [int(m) for m in mask]}] * 3,
                            {"assistant_only_loss": True}),
        "plain ids": ([{"input_ids": ids}] * 3, {}),
        "conversations": ([{"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                                              for m in row["messages"] if m["role"] != "system"]} for row in messages],
                          {"assistant_only_loss": True}),
        "tools": ([dict(row, tools=tools) for row in messages], {"assistant_only_loss": True}),
        "chat_template_kwargs": ([dict(row, chat_template_kwargs={"unused": i}) for i, row in enumerate(messages)],
                                 {"assistant_only_loss": True}),
        "conversational prompt/completion": (make_rows("conversational_prompt_completion", 6, 0),
                                             {"assistant_only_loss": True}),
    }
    for name, (rows, data) in cases.items():
        path = tmp_path / (name.replace(" ", "_").replace("/", "_") + ".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = make_config(tmp_path / path.stem, path, **data)
        prepared = prepare_dataset(config, tokenizer)
        assert prepared.stats["examples"] == len(rows), name


def test_stats_count_the_most_documents_any_row_holds(chat):
    """The static bound cuDNN's packed attention needs (Llama.set_max_segments) is the true maximum."""
    _, _, prepared = chat
    rows = pipeline.assemble_rows(prepared, np.arange(prepared.rows.num_rows))
    most = int(rows["segment_ids"].max(axis=1).max())
    assert most > 1 and prepared.stats["max_documents_per_row"] == most
    assert f"at most {most} documents a row" in format_stats(prepared.stats)


def test_no_rows_left_is_a_config_error_with_the_fix(tmp_path, tokenizer_dir, data_dir):
    """Every completion truncated away (max_length 2, prompts longer): refused with the report and what to change."""
    from jsft.config import ConfigError
    from jsft.data import load_tokenizer

    config = make_config(tmp_path, data_dir / "prompt_completion.jsonl", max_length=2, skip_bad_rows=True)
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    with pytest.raises(ConfigError, match="raise data.max_length") as err:
        prepare_dataset(config, tokenizer)
    assert "dropped (no trained token after truncation)" in str(err.value)


def test_pad_to_multiple_of_pads_each_step_to_its_longest_row(tmp_path, tokenizer_dir, data_dir):
    """Without packing, data.pad_to_multiple_of=m: a step's rows are padded to the longest of them rounded up to m
    (every process the same length); the tokens are those of the max_length batch, minus trailing padding."""
    from jsft.data import load_tokenizer

    config = make_config(tmp_path, data_dir / "messages.jsonl", packing=False, max_length=256,
                         pad_to_multiple_of=32, assistant_only_loss=True)
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    prepared = prepare_dataset(config, tokenizer)
    assert prepared.pad_to_multiple_of == 32 and prepared.lengths() == [32, 64, 96, 128, 160, 192, 224, 256]
    static = dataclasses.replace(prepared, pad_to_multiple_of=None)
    seen = set()
    its = [batch_iterator(prepared, 2, 2, seed=1, process_index=p, process_count=2, prefetch=0) for p in range(2)]
    whole = batch_iterator(static, 4, 2, seed=1, prefetch=0)
    for _ in range(40):
        parts, full = [next(it) for it in its], next(whole)
        L = parts[0]["input_ids"].shape[-1]
        assert all(p["input_ids"].shape == (2, 2, L) for p in parts) and L % 32 == 0
        seen.add(L)
        merged = {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}  # [accum, 4 rows, L]
        assert (full["segment_ids"][..., L:] == 0).all()  # nothing cut
        assert (full["segment_ids"][..., L - 32:] > 0).any()  # the longest row needed this length
        for k in merged:
            np.testing.assert_array_equal(merged[k], full[k][..., :L], err_msg=k)
    assert len(seen) > 2 and seen <= set(prepared.lengths())


def test_pad_to_multiple_of_is_refused_with_packing():
    config = make_config_from_fields(packing=True, max_length=64, pad_to_multiple_of=16)
    with pytest.raises(ConfigError, match="pad_to_multiple_of=16 has no effect with packing=True"):
        validate(config)


def test_a_partial_last_step_can_leave_a_process_only_padding_and_it_trains(tmp_path, tokenizer_dir):
    """11 rows, 8 rows a step over 2 processes: the last step's 3 real rows all go to process 0, so process 1's share
    is padding only. step.check_batch must accept that share (it refused it, and the 2-process run died there)."""
    from jsft import step
    from jsft.data import load_tokenizer

    path = fixtures.write_jsonl(fixtures.make_rows("text", 11, seed=3), tmp_path / "rows.jsonl")
    config = make_config(tmp_path, path, packing=False, max_length=64)
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    prepared = prepare_dataset(config, tokenizer)
    assert prepared.num_rows == 11
    shares = [list(batch_iterator(prepared, 4, 1, seed=0, process_index=p, process_count=2, prefetch=0,
                                  drop_remainder=False)) for p in range(2)]
    assert [len(s) for s in shares] == [2, 2]
    last = [s[-1] for s in shares]
    assert (last[0]["segment_ids"] > 0).any() and not (last[1]["segment_ids"] > 0).any()
    for share in last:
        step.check_batch(share, 2)
