"""Local paths vs hub names (jsft.hub): a value that looks like a path is never tried on the hub, and its error says
what exists nearby."""

import pytest

from jsft import hub
from jsft.config import ConfigError


@pytest.mark.parametrize("value", [
    "./data.jsonl", "../data", "/abs/path", "~/data.jsonl", "a/b/c", "chat.jsonl", "org/rows.parquet", "x.csv",
    "notes.txt", "rows.json.gz", "data\\chat", "", "models/llama",  # models/ exists (the fixture below)
    "org/model.safetensors",
])
def test_local_looking_values_are_paths(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert hub.looks_local(value)


@pytest.mark.parametrize("value", ["imdb", "trl-lib/Capybara", "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.1-8B",
                                   "HuggingFaceH4/ultrachat_200k", "org/name.v2"])
def test_hub_names_are_hub_names(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not hub.looks_local(value)


def test_a_missing_path_names_what_is_nearby(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("chat.jsonl", "eval.jsonl"):
        (tmp_path / "data" / name).write_text("{}\n")
    message = str(hub.no_such_path("data/chat.jsnol", "data.dataset_name"))
    assert message.startswith("data.dataset_name='data/chat.jsnol': no such file or directory (did you mean "
                              "data/chat.jsonl?). Fix: correct the path"), message
    assert "data/ holds chat.jsonl, eval.jsonl" in str(hub.no_such_path("data/zzz/x.jsonl", "f"))
    assert "(did you mean data?)" in str(hub.no_such_path("dat/chat.jsonl", "f"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert f"jsft does not expand '~': write the full path, {tmp_path}/data" in str(hub.no_such_path("~/data", "f"))


def test_a_local_looking_model_path_is_no_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "llama3-8b").mkdir()
    with pytest.raises(ConfigError, match=r"model\.model_name_or_path='models/llama3_8b': no such directory .*\(did "
                                          r"you mean models/llama3-8b\?\)"):
        hub.check_local_or_hub("models/llama3_8b", "model.model_name_or_path")
    assert hub.check_local_or_hub("org/name", "model.model_name_or_path") is False
