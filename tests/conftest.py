"""Session-wide fixtures: built once per test session from jsft.fixtures, never downloaded."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from jsft import fixtures  # noqa: E402


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="session")
def tokenizer_dir(fixture_root):
    """ChatML byte-level BPE tokenizer (no BOS), with {% generation %} markers."""
    return fixtures.build_tokenizer(fixture_root / "tokenizer")


@pytest.fixture(scope="session")
def bos_tokenizer_dir(fixture_root):
    """The same tokenizer, but it prepends <|begin_of_text|> like Llama 3."""
    return fixtures.build_tokenizer(fixture_root / "tokenizer_bos", add_bos=True)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def data_dir(fixture_root):
    """<format>.jsonl (2,000 rows) and <format>_test.jsonl (200 held-out rows) for every TRL format."""
    fixtures.build_datasets(fixture_root / "data")
    return fixture_root / "data"


@pytest.fixture(scope="session")
def checkpoint_dir(fixture_root):
    """Tiny random LlamaForCausalLM (fp32, untied) written by transformers; needs torch (test extra)."""
    pytest.importorskip("torch")
    return fixtures.build_hf_checkpoint(fixture_root / "checkpoint")


@pytest.fixture(scope="session")
def make_checkpoint(fixture_root):
    """Factory: make_checkpoint(name, architecture="llama", **config_overrides) -> cached checkpoint dir."""
    pytest.importorskip("torch")
    cache = {}

    def make(name, architecture="llama", **overrides):
        if name not in cache:
            cache[name] = fixtures.build_hf_checkpoint(fixture_root / f"ckpt_{name}", architecture=architecture, **overrides)
        return cache[name]

    return make


@pytest.fixture
def small_probe(monkeypatch):
    """Attention probes on 32-token rows (documents of 9, 5, 11 + pads; one full row; padding only) instead of 256:
    the same checks, fast on CPU. Probe caches cleared before and after (tests swap kernels in and out)."""
    from jsft.model import attention

    monkeypatch.setattr(attention, "PROBE_LENGTH", 32)
    monkeypatch.setattr(attention, "PROBE_ROWS", ((9, 5, 11), (32,), ()))
    attention.probe.cache_clear()
    attention._probe_reference.cache_clear()
    yield attention
    attention.probe.cache_clear()
    attention._probe_reference.cache_clear()
