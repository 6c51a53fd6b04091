"""Bad inputs through the real command (`python -m jsft.train`): damaged model files, mistyped paths, an unreachable
hub, broken config files, a damaged token cache, data a reader mangles. Each ends in one clear message (exit status 2,
no traceback) or a warning, and fails in seconds: never a run that trains garbage, never minutes of network retries.
The hub is never contacted: hub attempts go to a local proxy that refuses them."""

import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from train_configs import tiny_config, write_config_file

from jsft import build, cli, fixtures, hub, train
from jsft.data import BadRowError
from jsft.data import load_tokenizer as load
from jsft.data.pipeline import prepare_dataset

TESTS = Path(__file__).parent
# The command as `python -m jsft.train` runs it (jsft.cli), timed from the start of main (not Python's start-up).
COMMAND = """
import sys, time
from jsft import cli, train
started = time.perf_counter()
try:
    cli.run(train.main, sys.argv[1:])
finally:
    print(f"jsft ran for {time.perf_counter() - started:.1f} s", file=sys.stderr)
"""


def run_cli(args, cwd, env=None, timeout=300):
    """(exit status, stderr, seconds main ran) of the command in a new process (the hub tests: huggingface_hub reads
    HF_HUB_OFFLINE and the proxy settings when it starts)."""
    done = subprocess.run([sys.executable, "-c", COMMAND, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)
    seconds = float(done.stderr.rsplit("jsft ran for ", 1)[1].split()[0])
    return done.returncode, done.stderr, seconds


def run_main(args, capsys):
    """(exit status, stderr) of the command run in this process: what `python -m jsft.train` does after start-up."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.run(train.main, list(map(str, args)))
    return exited.value.code, capsys.readouterr().err


def assert_user_error(status, stderr, *needles):
    assert status == 2, stderr
    assert "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in stderr, stderr


@pytest.fixture
def rows(tmp_path):
    return fixtures.write_jsonl(fixtures.make_rows("text", 16, seed=0), tmp_path / "data" / "rows.jsonl")


@pytest.fixture
def config_file(tmp_path, tokenizer_dir, rows):
    return write_config_file(tmp_path / "run.py", TESTS, tokenizer_dir, rows, tmp_path / "out")


def with_model(path) -> list[str]:
    return ["--set", "model.init_from_scratch=none", "--set", f"model.model_name_or_path={path}"]


# ----------------------------------------------------------------------------------------------- model files


def test_a_nan_in_one_tensor_of_the_model_stops_the_run_naming_tensor_and_file(tmp_path, checkpoint_dir,
                                                                                config_file, capsys):
    """jsft used to train NaN to the end and exit 0."""
    model = shutil.copytree(checkpoint_dir, tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.self_attn.v_proj.weight"][3, 3] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    status, stderr = run_main(["--config", config_file, *with_model(model)], capsys)
    assert_user_error(status, stderr, f"{model}/model.safetensors: tensor 'model.layers.0.self_attn.v_proj.weight' "
                                      "holds 1 non-finite value(s) (NaN or inf)")


def test_a_truncated_model_file_is_named(tmp_path, checkpoint_dir, config_file, capsys):
    model = shutil.copytree(checkpoint_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    status, stderr = run_main(["--config", config_file, *with_model(model)], capsys)
    assert_user_error(status, stderr, f"{weights} is not a readable safetensors file", "download or copy it again")


def test_rows_past_max_position_embeddings_are_warned_about(tmp_path, tokenizer_dir):
    """The tiny model has max_position_embeddings=128; rows of 256 tokens hold documents longer than that. TRL and
    transformers accept this silently; jsft warns with both numbers (here turned into an error to stop the run
    before it compiles)."""
    long_rows = [{"text": " ".join(["the water of time"] * 60)} for _ in range(8)]
    data = fixtures.write_jsonl(long_rows, tmp_path / "long.jsonl")
    config = tiny_config(tokenizer_dir, data, tmp_path / "out", data={"max_length": 256})
    with warnings.catch_warnings(), pytest.raises(UserWarning, match=(
            r"data\.max_length=256: 8 train document\(s\) are longer than the model's max_position_embeddings=128 "
            r"\(config\.json; the longest has 256 tokens\).*Fix: set data\.max_length <= 128")):
        warnings.filterwarnings("error", message=".*max_position_embeddings")
        train.run(config)
    short = tiny_config(tokenizer_dir, data, tmp_path / "out2", data={"max_length": 256, "packing": False,
                                                                       "padding_free": False})
    prepared = prepare_dataset(short, load(tokenizer_dir, short.data)[0])
    from jsft.model.llama import LlamaConfig

    cfg = LlamaConfig.from_hf(dict(fixtures.TINY_LLAMA, vocab_size=384, model_type="llama",
                                   max_position_embeddings=4096))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build.warn_past_max_positions(cfg, [prepared], 256)  # within the limit: no warning


# ----------------------------------------------------------------------------------------------- paths and the hub


def test_a_mistyped_relative_data_path_is_no_hub_name(tmp_path, config_file, capsys, monkeypatch):
    """data/rows.jsnol: the directory exists, the file is mistyped. jsft used to try it as a hub dataset (31 s of
    retries); now it says which file is meant, and the hub is never asked. The same for a model directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "unreachable_reason", lambda: pytest.fail("a local-looking path was tried on the hub"))
    status, stderr = run_main(["--config", config_file, "--set", "data.dataset_name=data/rows.jsnol"], capsys)
    assert_user_error(status, stderr, "data.dataset_name='data/rows.jsnol': no such file or directory (did you mean "
                                      "data/rows.jsonl?)")
    (tmp_path / "models").mkdir()
    status, stderr = run_main(["--config", config_file, *with_model("models/llama3")], capsys)
    assert_user_error(status, stderr, "model.model_name_or_path='models/llama3': no such directory", "models/ is empty")


class RefusingProxy(socketserver.ThreadingTCPServer):
    """An HTTP(S) proxy on 127.0.0.1 that answers every request 403; `requests` lists their first lines."""
    daemon_threads = allow_reuse_address = True

    def __init__(self):
        self.requests = []
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                proxy.requests.append(self.rfile.readline().decode("latin-1").strip())
                while self.rfile.readline().strip():
                    pass
                self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        super().__init__(("127.0.0.1", 0), Handler)

    def env_for(self, url, tmp_path):
        env = {k: v for k, v in os.environ.items() if k.upper() not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                                        "HF_DATASETS_OFFLINE", "NO_PROXY")}
        return dict(env, HTTPS_PROXY=url, HTTP_PROXY=url, ALL_PROXY=url, HF_HOME=str(tmp_path / "hf_home"))


@pytest.fixture
def refusing_proxy(tmp_path):
    proxy = RefusingProxy()
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    proxy.env = proxy.env_for(f"http://127.0.0.1:{proxy.server_address[1]}", tmp_path)
    yield proxy
    proxy.shutdown()
    proxy.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_hub_dataset_behind_a_refusing_proxy_is_a_clear_error_in_seconds(tmp_path, config_file, refusing_proxy):
    """A proxy that answers 403: a 97-line traceback (httpx's ProxyError) before. A proxy port that refuses the
    connection: a clean error, but after huggingface_hub's retries (they sleep 23 s). Both now: one message, at once:
    no slower than a missing local file, which fails at the same point without the network."""
    status, stderr, _ = run_cli(["--config", config_file, "--set", "data.dataset_name=some-org/some-data"], tmp_path,
                                env=refusing_proxy.env)
    assert_user_error(status, stderr, "data.dataset_name='some-org/some-data' is no local path, and this machine could "
                                      "not load it as a hub dataset", "ProxyError")
    assert refusing_proxy.requests == ["CONNECT huggingface.co:443 HTTP/1.1"]  # the one probe; no retries
    refused = refusing_proxy.env_for(f"http://127.0.0.1:{closed_port()}", tmp_path)
    _, _, local_seconds = run_cli(["--config", config_file, "--set", "data.dataset_name=data/missing.jsonl"], tmp_path,
                                  env=refused)
    status, stderr, seconds = run_cli(["--config", config_file, "--set", "data.dataset_name=some-org/some-data"],
                                      tmp_path, env=refused)
    assert_user_error(status, stderr, "could not load it as a hub dataset", "ConnectError", "HF_HUB_OFFLINE=1")
    assert seconds < local_seconds + 10, (seconds, local_seconds)


def test_a_hub_model_behind_a_refusing_proxy_is_a_clear_error(tmp_path, config_file, refusing_proxy):
    status, stderr, _ = run_cli(["--config", config_file, *with_model("some-org/some-model")], tmp_path,
                                env=refusing_proxy.env)
    assert_user_error(status, stderr, "model.model_name_or_path='some-org/some-model' is no local path, and this "
                                      "machine could not load it as a hub name", "ProxyError")


# ----------------------------------------------------------------------------------------------- config files


def test_a_broken_config_file_and_a_mistyped_override_are_one_line_each(tmp_path, config_file, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("from jsft.config import SFTConfig\nconfig = SFTConfig(\n    model=ModelConfig(),\n)\n")
    status, stderr = run_main(["--config", broken], capsys)
    assert_user_error(status, stderr, f"{broken}, line 3: NameError: name 'ModelConfig' is not defined")
    broken.write_text("config = [\n")
    status, stderr = run_main(["--config", broken], capsys)
    assert_user_error(status, stderr, f"{broken}, line 1: SyntaxError: '[' was never closed")
    status, stderr = run_main(["--config", config_file, "--set", "training.learnig_rate=1e-4"], capsys)
    assert_user_error(status, stderr, "unknown field 'training.learnig_rate' (did you mean training.learning_rate?)")


# ----------------------------------------------------------------------------------------------- data


def test_a_damaged_token_cache_is_rebuilt(tmp_path, tokenizer_dir, rows):
    config = tiny_config(tokenizer_dir, rows, tmp_path / "out")
    tokenizer, _ = load(tokenizer_dir, config.data)
    first_tokens = np.array(prepare_dataset(config, tokenizer).examples.tokens)  # (a copy: the file is cut below)
    (cache,) = (tmp_path / "out" / "cache").glob("__examples-train-*")  # a token store directory (jsft.data.store)
    tokens = cache / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2])
    with pytest.warns(UserWarning, match=rf"token cache {cache} is unreadable \(ValueError: .*\): removing it and "
                                         "tokenizing again"):
        again = prepare_dataset(config, tokenizer)
    assert again.stats["cache"] == "miss" and (again.examples.tokens == first_tokens).all()
    assert prepare_dataset(config, tokenizer).stats["cache"] == "hit"


def _chat(answer):
    return {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": answer}]}


def test_a_number_in_a_text_field_of_a_data_directory_names_its_shard_and_line(tmp_path, tokenizer_dir):
    """Shard 1 holds the valid answer "5" (its line 2), shard 2 the number 42 (its line 3). datasets reads the field
    as JSON, and "5" came back as 5: the valid row was blamed, and skip_bad_rows could not skip the real one. Now the
    error names the row with 42, its shard and line; skip_bad_rows skips it and reads "5" as "5"."""
    folder = tmp_path / "data"
    folder.mkdir()
    shards = [[_chat("five"), _chat("5"), _chat("six")], [_chat("one"), _chat("two"), _chat(42), _chat("3")]]
    for k, shard in enumerate(shards):
        (folder / f"train-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shard))
    config = tiny_config(tokenizer_dir, folder, tmp_path / "out")
    tokenizer, _ = load(tokenizer_dir, config.data)
    with pytest.raises(BadRowError, match=r"train-1\.jsonl, line 3: row 5, field 'messages\[1\]\.content': "
                                          r"messages\[\]\.content is the int 42 where other rows hold text"):
        prepare_dataset(config, tokenizer)
    config.data.skip_bad_rows = True
    with pytest.warns(UserWarning, match=r"skipped 1 row\(s\) holding a number .*train-1\.jsonl, line 3"):
        prepared = prepare_dataset(config, tokenizer)
    assert prepared.stats["rows_read"] == 7 and sum(prepared.stats["skipped_bad_rows"].values()) == 1
    texts = [tokenizer.decode(prepared.examples.tokens[a:b]) for a, b in zip(prepared.examples.offsets,
                                                                               prepared.examples.offsets[1:])]
    assert sum("assistant\n5<|im_end|>" in t for t in texts) == 1, texts
    assert list(prepared.examples.source_rows) == [0, 1, 2, 3, 4, 6]
