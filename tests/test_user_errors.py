"""A user's mistake ends in one of jsft's own errors (printed by jsft.cli without a traceback, exit status 2) whose
message names the field or path: missing model/tokenizer paths, unreachable hub names, empty data files, unknown
splits, checkpoints written with other settings, checkpoint steps that do not exist."""

import re
from pathlib import Path

import optax
import pytest
from flax import nnx
from train_configs import tiny_config

from jsft import chat, checkpoint, cli, export, fixtures
from jsft.config import ConfigError, DataConfig, LoraConfig, SFTConfig
from jsft.data import sources
from jsft.data.templates import load_tokenizer
from jsft.hf import CheckpointError, load_model


def user_error(cls, match):
    """pytest.raises for a jsft user error: one jsft.cli prints as a message (exit status 2)."""
    assert issubclass(cls, cli.user_errors())
    return pytest.raises(cls, match=match)


# ----------------------------------------------------------------------------------------------- model, tokenizer


def test_a_missing_model_or_tokenizer_directory_is_a_config_error(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with user_error(ConfigError, r"model\.model_name_or_path='.*no_such_model': no such directory"):
        load_model(missing)
    with user_error(ConfigError, r"model\.tokenizer_name_or_path.*no_such_model': no such directory"):
        load_tokenizer(missing, DataConfig())


def test_a_hub_name_that_cannot_be_reached_offline_is_a_config_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with user_error(ConfigError, r"model\.model_name_or_path='no-such-org/no-such-model'.*could not load it as a hub"):
        load_model("no-such-org/no-such-model")
    with user_error(ConfigError, r"model\.tokenizer_name_or_path.*could not load it as a hub name"):
        load_tokenizer("no-such-org/no-such-model", DataConfig())


def test_a_checkpoint_without_tokenizer_files_is_a_config_error(checkpoint_dir):
    with user_error(ConfigError, r"has no tokenizer files.*point model\.tokenizer_name_or_path at a directory with "
                                 r"tokenizer files"):
        load_tokenizer(checkpoint_dir, DataConfig())


def test_chat_with_a_missing_model_names_the_flag(tmp_path, checkpoint_dir):
    with user_error(ConfigError, r"--model='.*nope': no such directory"):
        chat.main(["--model", str(tmp_path / "nope")])
    with user_error(ConfigError, r"--model=.*has no tokenizer files.*point --model at"):
        chat.main(["--model", str(checkpoint_dir)])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with user_error(CheckpointError, r"adapter is a PEFT adapter \(adapter_config.json\), not a whole model. Fix: "):
        load_model(adapter)


# ----------------------------------------------------------------------------------------------- data


@pytest.fixture
def rows(tmp_path):
    return fixtures.write_jsonl(fixtures.make_rows("text", 4, seed=0), tmp_path / "rows.jsonl")


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["zero_bytes", "blank_lines"])
def test_an_empty_data_file_is_a_config_error(tmp_path, rows, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    with user_error(ConfigError, r"data\.dataset_name='.*empty\.jsonl': the file is empty"):
        sources.load_rows(DataConfig(dataset_name=str(empty)))
    with user_error(ConfigError, r"data\.dataset_test_split='.*empty\.jsonl': the file is empty"):
        sources.read_split(DataConfig(dataset_name=str(rows), dataset_test_split=str(empty)), "eval")


def test_a_data_file_without_rows_is_a_config_error(tmp_path):
    (tmp_path / "none.json").write_text("[]\n")
    with user_error(ConfigError, r"data\.dataset_name='.*none\.json': the file has no rows"):
        sources.load_rows(DataConfig(dataset_name=str(tmp_path / "none.json")))


def test_a_split_the_dataset_directory_lacks_lists_the_splits_there(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    fixtures.write_jsonl(fixtures.make_rows("text", 4, seed=0), folder / "train.jsonl")
    fixtures.write_jsonl(fixtures.make_rows("text", 4, seed=1), folder / "test.jsonl")
    data = DataConfig(dataset_name=str(folder), dataset_test_split="validation")
    with user_error(ConfigError, r"data\.dataset_test_split='validation': .* has no split 'validation'; its splits "
                                 r"are ('train', 'test'|'test', 'train')"):
        sources.read_split(data, "eval")
    data = DataConfig(dataset_name=str(folder), dataset_train_split="validation")
    with user_error(ConfigError, r"data\.dataset_train_split='validation': .* its splits are"):
        sources.load_rows(data, "train")


def test_an_eval_file_that_does_not_exist_is_named_missing(tmp_path, rows):
    data = DataConfig(dataset_name=str(rows), dataset_test_split=str(tmp_path / "missing" / "eval.jsonl"))
    with user_error(ConfigError, r"data\.dataset_test_split='.*eval\.jsonl': no such file"):
        sources.read_split(data, "eval")


def test_a_single_file_has_only_a_train_split(rows):
    data = DataConfig(dataset_name=str(rows), dataset_train_split="validation")
    with user_error(ConfigError, r"data\.dataset_train_split='validation'.*one file, which has only a 'train' split"):
        sources.load_rows(data, "train")


def test_a_non_utf8_file_an_empty_directory_and_a_directory_as_eval_split_are_named(tmp_path, rows):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with user_error(ConfigError, r"data\.dataset_name='.*latin\.jsonl' is not UTF-8 text.*re-encode"):
        sources.load_rows(DataConfig(dataset_name=str(latin)))
    (tmp_path / "empty_dir").mkdir()
    with user_error(ConfigError, r"data\.dataset_name='.*empty_dir' is an empty directory"):
        sources.load_rows(DataConfig(dataset_name=str(tmp_path / "empty_dir")))
    with user_error(ConfigError, r"data\.dataset_test_split='.*empty_dir' is a directory: set it to a data file"):
        sources.read_split(DataConfig(dataset_name=str(rows), dataset_test_split=str(tmp_path / "empty_dir")), "eval")


def test_save_to_disk_directories_are_sources(tmp_path):
    """Dataset.save_to_disk is one split ('train'); DatasetDict.save_to_disk keeps its split names."""
    import datasets

    one = datasets.Dataset.from_list(fixtures.make_rows("text", 5, seed=0))
    one.save_to_disk(str(tmp_path / "one"))
    assert sources.load_rows(DataConfig(dataset_name=str(tmp_path / "one"))).num_rows == 5
    with user_error(ConfigError, r"one file, which has only a 'train' split"):
        sources.load_rows(DataConfig(dataset_name=str(tmp_path / "one"), dataset_train_split="validation"))
    both = datasets.DatasetDict(train=one, test=one.select(range(2)))
    both.save_to_disk(str(tmp_path / "both"))
    data = DataConfig(dataset_name=str(tmp_path / "both"), dataset_test_split="test")
    assert sources.read_split(data, "eval")[0].num_rows == 2
    data.dataset_test_split = "validation"
    with user_error(ConfigError, r"has no split 'validation'; its splits are 'train', 'test'"):
        sources.read_split(data, "eval")


def test_a_token_cache_kept_inside_the_data_directory_still_hits(tmp_path, tokenizer_dir):
    from jsft.data import load_tokenizer as load
    from jsft.data.pipeline import prepare_dataset

    folder = tmp_path / "data"
    folder.mkdir()
    fixtures.write_jsonl(fixtures.make_rows("text", 6, seed=0), folder / "train.jsonl")
    config = SFTConfig()
    config.data.dataset_name, config.data.cache_dir, config.data.max_length = str(folder), str(folder / "cache"), 64
    tokenizer, _ = load(tokenizer_dir, config.data)
    assert [prepare_dataset(config, tokenizer).stats["cache"] for _ in range(3)] == ["miss", "hit", "hit"]


def _bad_row_message(config, tokenizer_dir) -> str:
    from jsft.data import BadRowError
    from jsft.data import load_tokenizer as load
    from jsft.data.pipeline import prepare_dataset

    config.data.cache_dir, config.data.max_length = str(Path(config.data.dataset_name).parent / "cache"), 64
    tokenizer, _ = load(tokenizer_dir, config.data)
    with pytest.raises(BadRowError) as excinfo:
        prepare_dataset(config, tokenizer)
    return str(excinfo.value)


def test_a_bad_row_in_a_data_directory_names_its_file_and_line(tmp_path, tokenizer_dir):
    """Row 7 of the split is the third row of the second shard, on its line 4 (a blank line before it): the message
    names the row of the split, the shard and the line, so the user opens the right file at the right line."""
    import json

    folder = tmp_path / "data"
    folder.mkdir()
    shards = [fixtures.make_rows("messages", 5, seed=k) for k in range(3)]
    shards[1][2] = {"messages": [{"role": "robot", "content": "hi"}]}
    for k, shard in enumerate(shards):
        lines = [json.dumps(row) for row in shard]
        lines.insert(2, "")  # blank lines are no rows
        (folder / f"train-{k:05d}-of-00003.jsonl").write_text("\n".join(lines) + "\n")
    config = SFTConfig()
    config.data.dataset_name = str(folder)
    message = _bad_row_message(config, tokenizer_dir)
    assert re.search(r"train split \('train' of .*data, file .*train-00001-of-00003\.jsonl, line 4\): row 7, "
                     r"field 'messages\[0\]\.role': unknown role 'robot'", message), message


def test_a_bad_row_of_a_parquet_shard_and_of_a_single_file_are_located(tmp_path, tokenizer_dir):
    import datasets

    folder = tmp_path / "data"
    folder.mkdir()
    rows = fixtures.make_rows("text", 6, seed=0)
    datasets.Dataset.from_list(rows[:3]).to_parquet(str(folder / "train-0.parquet"))
    datasets.Dataset.from_list(rows[3:5] + [{"text": None}]).to_parquet(str(folder / "train-1.parquet"))
    config = SFTConfig()
    config.data.dataset_name = str(folder)
    assert re.search(r"file .*train-1\.parquet, its row 2\): row 5, field 'text'", _bad_row_message(config,
                                                                                               tokenizer_dir))
    single = tmp_path / "single" / "rows.jsonl"
    single.parent.mkdir()
    single.write_text('{"prompt": "a", "completion": "b"}\n\n\n{"prompt": "a", "completion": ""}\n')
    config = SFTConfig()
    config.data.dataset_name = str(single)
    assert re.search(r"train split \(.*rows\.jsonl, line 4\): row 1, field 'completion'", _bad_row_message(config,
                                                                                              tokenizer_dir))


def _chat(answer):
    return {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": answer}]}


def test_strings_that_datasets_would_decode_as_json_are_a_bad_row(tmp_path):
    """A field that is a number in one row makes datasets read it as JSON in every row, and the valid string "5" of
    other rows comes back as the int 5. The bad row is the one holding the number (line 4), not the valid "5" (line
    2): jsft names it, its line and the fix, and skip_bad_rows skips it and reads the rest unchanged. Where no row
    holds a number (content parts mixed with text) there is no row to skip: the damage is the error, and strings
    that do not look like JSON read fine."""
    import json

    from jsft.data import BadRowError

    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [_chat("five"), _chat("5"), _chat("5"), _chat(5)]) + "\n")
    with pytest.raises(BadRowError, match=r"answers\.jsonl, line 4: row 3, field 'messages\[1\]\.content': "
                                          r"messages\[\]\.content is the int 5 where other rows hold text; .*\(row 1: "
                                          r"str '5' is read as 5, .*answers\.jsonl, line 2\)\. Fix: write it as a "
                                          r"string \(\"5\"\)"):
        sources.load_rows(DataConfig(dataset_name=str(path)))
    with pytest.warns(UserWarning, match=r"skipped 1 row\(s\) holding a number .*answers\.jsonl, line 4"):
        dataset, skipped = sources.read_split(DataConfig(dataset_name=str(path), skip_bad_rows=True))
    assert [r["messages"][1]["content"] for r in dataset] == ["five", "5", "5"] and [e.row_index for e in skipped] == [3]

    parts = [_chat("5"), {"messages": [{"role": "user", "content": [{"type": "text", "text": "2+3?"}]},
                                       {"role": "assistant", "content": "five"}]}]
    path.write_text("\n".join(json.dumps(r) for r in parts) + "\n")
    with pytest.raises(BadRowError, match=r"line 1: row 0, field 'messages\[1\]\.content': the str '5' is read as 5: "
                                          r".* Fix: give messages\[\]\.content one type"):
        sources.load_rows(DataConfig(dataset_name=str(path), skip_bad_rows=True))
    parts[0] = _chat("five")
    path.write_text("\n".join(json.dumps(r) for r in parts) + "\n")
    assert sources.load_rows(DataConfig(dataset_name=str(path)))[1]["messages"][0]["content"][0]["text"] == "2+3?"


def test_json_lines_with_blank_lines_and_a_column_of_mixed_types_are_read(tmp_path):
    """datasets alone fails on this file ("Expected object or value"): content is a string in one row and a list of
    text parts in another, and a blank line follows. jsft reads it (a copy without blank lines); in a directory,
    which datasets reads itself, the error names the files and the fix."""
    import json

    import datasets

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                          {"role": "assistant", "content": "yo"}]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n\n")
    with pytest.raises(ValueError, match="Expected object or value"):
        datasets.load_dataset("json", data_files=str(path), split="train")
    dataset = sources.load_rows(DataConfig(dataset_name=str(path)))
    assert len(dataset) == 2 and dataset[1]["messages"][0]["content"][0]["text"] == "hi"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text(path.read_text())
    with user_error(ConfigError, r"its reader fails on blank lines .*folder/train\.jsonl\. Fix: remove the blank"):
        sources.load_rows(DataConfig(dataset_name=str(folder)))


# ----------------------------------------------------------------------------------------------- checkpoints


def _lora_run(r, use_peft=True):
    """A tiny Llama (+ LoRA of rank r) with its optimizer, and the config that says so."""
    from jsft.model.llama import Llama, LlamaConfig
    from jsft.model.lora import apply_lora
    from jsft.optim import trainable_filter

    config = SFTConfig(lora=LoraConfig(use_peft=use_peft, lora_r=r, lora_alpha=8))
    model = Llama(LlamaConfig.from_hf(dict(fixtures.TINY_LLAMA, vocab_size=64, model_type="llama")), rngs=nnx.Rngs(0))
    if use_peft:
        apply_lora(model, r, 8, 0.0, "all-linear", rngs=nnx.Rngs(1))
    wrt = trainable_filter(use_peft)
    return config, model, nnx.Optimizer(model, optax.adam(1e-3), wrt=wrt), wrt


@pytest.fixture
def lora4_run(tmp_path):
    """output_dir with checkpoint 3 of a LoRA run with lora.lora_r=4."""
    config, model, optimizer, _ = _lora_run(4)
    with checkpoint.make_manager(tmp_path, async_save=False) as manager:
        checkpoint.save(manager, 3, model, optimizer, {"next_index": 0}, {"config": config.to_dict()})
    return tmp_path


def test_resuming_with_another_lora_rank_names_the_setting(lora4_run):
    config, model, optimizer, _ = _lora_run(8)
    with checkpoint.make_manager(lora4_run, async_save=False) as manager:
        with user_error(CheckpointError, r"step 3 was written with lora\.lora_r=4; this run has lora\.lora_r=8.*"
                                         r"params\..*lora_a has shape \[[\d, ]+, 4\] in the checkpoint, \[[\d, ]+, 8\]"):
            checkpoint.restore(manager, model, optimizer, config=config)
        # without the run's config (no config.json in output_dir): the first differing array
        with user_error(CheckpointError, r"does not fit this run's model: params\..*lora_a has shape"):
            checkpoint.restore(manager, model, optimizer)


def test_exporting_a_lora_checkpoint_as_a_full_run_names_the_setting(lora4_run):
    config, model, _, wrt = _lora_run(4, use_peft=False)
    expected = r"written with lora\.use_peft=True.*this run has lora\.use_peft=False"
    with checkpoint.make_manager(lora4_run, async_save=False) as manager, user_error(CheckpointError, expected):
        checkpoint.restore_params(manager, model, wrt, config=config)


def test_export_of_a_step_that_does_not_exist_lists_the_steps(lora4_run, tokenizer_dir, rows, tmp_path):
    config = tiny_config(tokenizer_dir, rows, lora4_run)
    with user_error(CheckpointError, r"checkpoints has no checkpoint for step 999; its steps are 3"):
        export.export_checkpoint(config, step=999)
    with user_error(CheckpointError, r"no checkpoint under .*fresh.*checkpoints: train first"):
        export.export_checkpoint(tiny_config(tokenizer_dir, rows, tmp_path / "fresh"))
