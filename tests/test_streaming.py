"""Streaming (data.dataset_streaming): bfd_stream's rows from a lazily read stream, an exact resume, a training run."""

import dataclasses
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import yaml

from jsft import checkpoint, fixtures, progress, train
from jsft.config import ConfigError, SFTConfig, validate
from jsft.data import formats, load_tokenizer, streaming
from jsft.data.pipeline import format_stats, prepare_dataset
from jsft.trl_config import from_trl_file
from train_configs import tiny_config

KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")


@pytest.fixture(scope="module")
def chat_rows(tmp_path_factory):
    """300 chat rows (some conversations split into documents, some too long for 128 tokens)."""
    return fixtures.write_jsonl(fixtures.make_rows("messages", 300, seed=4),
                                tmp_path_factory.mktemp("stream") / "messages.jsonl")


def make(tmp_path, tokenizer_dir, rows, **data):
    config = SFTConfig()
    config.data.dataset_name = str(rows)
    config.data.max_length = 128
    config.data.assistant_only_loss = True
    config.data.dataset_streaming = True
    config.training.max_steps = 10
    config.model.model_name_or_path = str(tokenizer_dir)  # validate() asks for one; no model is built here
    for k, v in data.items():
        setattr(config.data, k, v)
    config.logging.output_dir = str(tmp_path / "out")
    tokenizer, _ = load_tokenizer(tokenizer_dir, config.data)
    return validate(config), tokenizer


def in_memory(config):
    """The same config without streaming (the in-memory pipeline)."""
    return dataclasses.replace(config, data=dataclasses.replace(config.data, dataset_streaming=False))


def one_pass(streamed, num_rows):
    """The first num_rows streamed rows as one step: {key: [num_rows, L]}, and the iterator after it."""
    it = streaming.stream_iterator(streamed, rows_per_micro_batch=num_rows, accum_steps=1)
    step = next(it)
    return {k: v[0] for k, v in step.items()}, it


def check_contract(batch, pad_id):
    """Per row: segments 1, 2, ... then padding; positions restart at 0 in each; targets are the next token of the
    same segment; nothing trained at a segment's last token or in padding."""
    for r in range(batch["input_ids"].shape[0]):
        seg, pos, ids = batch["segment_ids"][r], batch["positions"][r], batch["input_ids"][r]
        n = int((seg > 0).sum())
        assert (seg[n:] == 0).all() and (ids[n:] == pad_id).all()
        assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all() and (n == 0 or seg[0] == 1)
        starts = np.r_[True, seg[1:n] != seg[:n - 1]]
        assert (pos[:n][starts] == 0).all() and (pos[:n][~starts] == pos[:n - 1][~starts[1:]] + 1).all()
        last = np.r_[seg[1:n] != seg[:n - 1], True]
        assert not batch["loss_mask"][r][:n][last].any() and not batch["loss_mask"][r][n:].any()
        assert (batch["targets"][r][:n - 1][~last[:-1]] == ids[1:n][~last[:-1]]).all()


def documents(batch):
    """The multiset of documents (their tokens and trained targets) in a batch of rows."""
    out = Counter()
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in range(1, int(seg.max()) + 1):
            where = seg == s
            out[(tuple(batch["input_ids"][r][where]), tuple(batch["loss_mask"][r][where]))] += 1
    return out


@pytest.mark.parametrize("data", [
    {"packing": True, "packing_strategy": "bfd_stream", "packing_buffer_size": 16},
    {"packing": True, "packing_strategy": "bfd_stream", "packing_buffer_size": 1},
    {"packing": False, "truncation_mode": "keep_start"},
    {"packing": False, "truncation_mode": "keep_end"},
], ids=["bfd_stream-16", "bfd_stream-1", "unpacked-keep_start", "unpacked-keep_end"])
def test_streamed_rows_are_bfd_streams_rows(tmp_path, tokenizer_dir, chat_rows, data, capsys):
    """Unshuffled, one pass of the stream is the in-memory pipeline's rows, in its order, row for row (and the
    counts of truncated and dropped examples are its too); the next pass starts again from the first row."""
    config, tokenizer = make(tmp_path, tokenizer_dir, chat_rows, shuffle_dataset=False, **data)
    prepared = prepare_dataset(in_memory(config), tokenizer)
    assert prepared.stats["truncated_examples"] > 0
    assert prepared.stats["dropped_no_trained_token"] > 0 or data.get("truncation_mode") == "keep_end"
    streamed = streaming.prepare_stream(config, tokenizer)
    got, it = one_pass(streamed, prepared.num_rows)
    want = prepared.batch(np.arange(prepared.num_rows))
    for k in KEYS:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    counts = it.get_state()["counts"]
    for key in ("examples", "tokens", "truncated_examples", "truncated_tokens", "dropped_no_trained_token",
                "dropped_tokens", "row_tokens", "rows"):
        assert counts[key] == prepared.stats[key], key
    next(it)  # pass 2's first rows: pass 1 has ended (printed when its end is read)
    assert f"pass 1 done; so far {prepared.stats['rows_read']:,} rows read" in capsys.readouterr().out
    again = next(streaming.stream_iterator(streamed, 1, 1))  # a second iterator: pass 1 from its start
    np.testing.assert_array_equal(again["input_ids"][0, 0], want["input_ids"][0])


def test_bfd_split_streams_every_fragment_once_with_document_exact_rows(tmp_path, tokenizer_dir, chat_rows):
    config, tokenizer = make(tmp_path, tokenizer_dir, chat_rows, shuffle_dataset=False, packing=True,
                             packing_strategy="bfd_split", packing_buffer_size=8, max_length=64)
    prepared = prepare_dataset(in_memory(config), tokenizer)  # global BFD over the same fragments
    streamed = streaming.prepare_stream(config, tokenizer)
    rows = 0
    it = streaming.stream_iterator(streamed, 1, 1)
    seen = Counter()
    while sum(len(k[0]) * n for k, n in seen.items()) < prepared.stats["row_tokens"]:
        step = {k: v[0] for k, v in next(it).items()}
        check_contract(step, tokenizer.pad_token_id)
        seen += documents(step)
        rows += 1
    assert seen == documents(prepared.batch(np.arange(prepared.num_rows)))
    assert rows >= prepared.num_rows  # a bounded buffer packs no tighter than the global BFD


def test_shuffled_passes_hold_every_document_once_in_another_order(tmp_path, tokenizer_dir, chat_rows):
    """datasets' IterableDataset.shuffle(seed, buffer) and set_epoch: each pass is every document once, pass 2 in
    another order than pass 1, both other than the file's."""
    config, tokenizer = make(tmp_path, tokenizer_dir, chat_rows, packing=True, packing_strategy="bfd_stream",
                             packing_buffer_size=16)
    streamed = streaming.prepare_stream(config, tokenizer)
    plain = dataclasses.replace(config, data=dataclasses.replace(config.data, shuffle_dataset=False))
    unshuffled, _ = one_pass(streaming.prepare_stream(plain, tokenizer), 4)
    prepared = prepare_dataset(in_memory(plain), tokenizer)
    everything = documents(prepared.batch(np.arange(prepared.num_rows)))
    tokens = prepared.stats["row_tokens"]
    it = streaming.stream_iterator(streamed, 1, 1)
    passes, current = [], Counter()
    first_rows = []
    while len(passes) < 2:
        step = {k: v[0] for k, v in next(it).items()}
        if not current:
            first_rows.append(step["input_ids"][0].copy())
        current += documents(step)
        if sum(len(k[0]) * n for k, n in current.items()) == tokens:
            passes.append(current)
            current = Counter()
    assert passes[0] == passes[1] == everything
    assert not np.array_equal(first_rows[0], first_rows[1])
    assert not np.array_equal(first_rows[0], unshuffled["input_ids"][0])
    assert streamed.stats["shuffle_buffer"] == streaming.SHUFFLE_BUFFER
    assert "streamed from" in format_stats(streamed.stats) and "not known up front" in format_stats(streamed.stats)


def test_resume_mid_pass_gives_the_identical_next_batches(tmp_path, tokenizer_dir, chat_rows):
    """A state from every step of the first few (mid-pass, and across the end of pass 1), through JSON as a
    checkpoint keeps it: a fresh iterator set to it yields the same next batches."""
    config, tokenizer = make(tmp_path, tokenizer_dir, chat_rows, packing=True, packing_strategy="bfd_stream",
                             packing_buffer_size=8, skip_bad_rows=True)
    streamed = streaming.prepare_stream(config, tokenizer)
    it = streaming.stream_iterator(streamed, rows_per_micro_batch=8, accum_steps=2, process_index=1, process_count=2)
    states, batches = [], []
    for _ in range(12):  # about 95 rows a pass: 16-row steps cross into pass 2
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    assert states[-1]["epoch"] == 1 and states[3]["epoch"] == 0 and states[3]["held"]
    for at in (1, 3, 6, 10):
        fresh = streaming.stream_iterator(streamed, 8, 2, process_index=1, process_count=2)
        fresh.set_state(states[at])
        for want in batches[at:at + 2]:
            got = next(fresh)
            for k in KEYS:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"state {at}, {k}")
    with pytest.raises(ConfigError, match="not a streamed one"):
        streaming.stream_iterator(streamed, 8, 2).set_state({"something": "else"})


def test_processes_take_their_rows_of_each_step(tmp_path, tokenizer_dir, chat_rows):
    config, tokenizer = make(tmp_path, tokenizer_dir, chat_rows, packing=True, packing_strategy="bfd_stream")
    streamed = streaming.prepare_stream(config, tokenizer)
    whole = next(streaming.stream_iterator(streamed, 4, 2))
    parts = [next(streaming.stream_iterator(streamed, 2, 2, process_index=p, process_count=2)) for p in (0, 1)]
    for k in KEYS:  # micro-batch a: rows [a, 0:2] from process 0, [a, 2:4] from process 1
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts], axis=1), whole[k])
    check_contract({k: v.reshape(-1, v.shape[-1]) for k, v in whole.items()}, tokenizer.pad_token_id)


def test_streaming_needs_max_steps_and_refuses_what_it_cannot_honour(tmp_path, tokenizer_dir, chat_rows):
    config, _ = make(tmp_path, tokenizer_dir, chat_rows)
    config.training.max_steps = -1
    with pytest.raises(ConfigError, match=r"dataset_streaming=True needs training.max_steps > 0"):
        validate(config)
    config.training.max_steps = 5
    config.data.packing, config.data.packing_strategy = True, "wrapped"
    with pytest.raises(ConfigError, match="wrapped"):
        validate(config)
    config.data.packing_strategy, config.model.attention_impl = "bfd", "cudnn"
    with pytest.raises(ConfigError, match="attention_impl='cudnn' needs the most documents"):
        validate(config)
    config.model.attention_impl = "auto"
    assert validate(config).data.dataset_streaming


def test_a_trl_yaml_with_dataset_streaming_is_accepted(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset_name": "d.jsonl", "dataset_streaming": True,
                                    "max_steps": 100}))
    config = from_trl_file(path)
    assert config.data.dataset_streaming is True and config.training.max_steps == 100
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset_name": "d.jsonl", "dataset_streaming": True}))
    with pytest.raises(ConfigError, match="max_steps"):
        validate(from_trl_file(path))


def test_a_streamed_run_trains_and_resumes_exactly(tokenizer_dir, tmp_path):
    """python -m jsft.train's run with dataset_streaming: the loss falls; a run resumed from its step-5 checkpoint
    (where rows of pass 1 are still to go: a pass is about 2 steps) logs the uninterrupted run's losses."""
    rows = fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 48, seed=2), tmp_path / "pc.jsonl")
    out = tmp_path / "run"
    config = tiny_config(tokenizer_dir, rows, out, data={"dataset_streaming": True, "packing_buffer_size": 4},
                         training={"max_steps": 8, "compilation_cache_dir": str(tmp_path / "jax")},
                         logging={"save_steps": 5})
    summary = train.run(config)
    want = {r["step"]: r["loss"] for r in progress.read_metrics(out) if "loss" in r}
    assert summary["steps"] == 8 and sorted(want) == list(range(1, 9))
    assert want[8] < 0.8 * want[1]
    position = checkpoint.read_meta(out, 5)["data_iterator"]
    assert position["held"]  # rows of a pass still to go: the resume must read and tokenize them again
    shutil.rmtree(out / "checkpoints" / "8")  # as if killed after the checkpoint at step 5
    train.run(config)
    got = {r["step"]: r["loss"] for r in progress.read_metrics(out) if "loss" in r}
    assert sorted(got) == list(range(1, 9))
    for s in range(6, 9):
        assert got[s] == pytest.approx(want[s], rel=1e-6), s


def test_bad_rows_are_named_or_counted_and_unreadable_lines_stop_with_the_place(tmp_path, tokenizer_dir):
    rows = fixtures.make_rows("prompt_completion", 20, seed=1)
    rows[13]["completion"] = ""
    path = fixtures.write_jsonl(rows, tmp_path / "pc.jsonl")
    config, tokenizer = make(tmp_path, tokenizer_dir, path, assistant_only_loss=False, shuffle_dataset=False)
    with pytest.raises(formats.BadRowError, match=r"streamed train split .*: row 13, field 'completion': empty"):
        next(streaming.stream_iterator(streaming.prepare_stream(config, tokenizer), 1, 1))
    config.data.skip_bad_rows = True
    it = streaming.stream_iterator(streaming.prepare_stream(config, tokenizer), 1, 1)
    next(it)
    assert it.get_state()["bad_rows"] == {"completion: empty completion": 1}
    assert it.get_state()["counts"]["examples"] == 19
    path.write_text(path.read_text() + '{"prompt": "p", "completion": "broken\n')
    with pytest.raises(ConfigError, match=r"cannot be read after row \d+ of pass 1: .*Fix: repair"):
        it = streaming.stream_iterator(streaming.prepare_stream(config, tokenizer), 1, 1)
        for _ in range(25):
            next(it)


def test_a_changed_stream_source_is_warned_about_on_resume(tmp_path, tokenizer_dir):
    path = fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 10, seed=1), tmp_path / "pc.jsonl")
    config, tokenizer = make(tmp_path, tokenizer_dir, path, assistant_only_loss=False)
    saved = streaming.prepare_stream(config, tokenizer).fingerprint()
    assert streaming.prepare_stream(config, tokenizer).fingerprint() == saved
    fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 11, seed=1), path)
    with pytest.warns(UserWarning, match=r"changed since checkpoint 5 was written: streamed source \(files, sizes, "):
        checkpoint.check_data_fingerprint(tmp_path, 5, saved, streaming.prepare_stream(config, tokenizer).fingerprint())
