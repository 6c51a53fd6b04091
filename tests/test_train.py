"""End to end through `jsft.train.run`: it learns, logs, saves, exports; LoRA leaves the base alone; bad configs fail
before any compute."""

import json
import logging
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jsft import build, evaluation, fixtures, progress, sharding, step, train
from jsft.config import ConfigError
from jsft.hf import base_params
from train_configs import tiny_config


class CompileLog(logging.Handler):
    """The names of the functions XLA compiles inside the block (jax.log_compiles' messages)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Finished XLA compilation of "):
            name = message.removeprefix("Finished XLA compilation of ").split(" in ")[0]
            self.names.append(name.removeprefix("jit(").removesuffix(")"))

    def __enter__(self):
        self._log = jax.log_compiles()
        self._log.__enter__()
        logging.getLogger("jax").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("jax").removeHandler(self)
        self._log.__exit__(*exc)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """8 prompt/completion rows: with 8 rows a step and no shuffle, every step sees the same batch."""
    path = tmp_path_factory.mktemp("small") / "pc.jsonl"
    return fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 8, seed=5), path)


def test_run_learns_a_repeated_batch_logs_saves_and_exports(tokenizer_dir, small_data, tmp_path):
    config = tiny_config(tokenizer_dir, small_data, tmp_path / "run", data={"packing": False, "padding_free": False,
                                                                              "shuffle_dataset": False,
                                                                              "dataset_test_split": str(small_data)},
                         logging={"eval_steps": 3})
    step.train_step.jitted_fn.clear_cache()
    with CompileLog() as compiles:
        summary = train.run(config)
    # one compilation for the plan and all 6 steps: the plan's executable runs them (it used to compile again at
    # the first step, through jit's own cache)
    assert compiles.names.count("train_step") == 1, compiles.names
    assert step.train_step.jitted_fn._cache_size() == 0
    records = progress.read_metrics(tmp_path / "run")
    evals = [r for r in records if "eval_loss" in r]
    records = [r for r in records if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [3, 6] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[1]["eval_loss"] == pytest.approx(summary["last_metrics"]["loss"], rel=0.5)
    losses = [r["loss"] for r in records]
    # lr 1e-2 (constant): from the stacked layers' random init, step 6 overshoots a little (5.96 ... 4.28, 4.65)
    assert all(b < a for a, b in zip(losses[:5], losses[1:5])), losses
    assert losses[-1] < 0.85 * losses[0]
    for key in ("grad_norm", "learning_rate", "num_tokens", "mean_token_accuracy", "entropy", "epoch"):
        assert key in records[0]
    assert records[0]["learning_rate"] == pytest.approx(1e-2)
    assert records[1]["num_tokens"] == 2 * records[0]["num_tokens"] > 0  # cumulative, like TRL
    ckpts = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [3, 6]
    from jsft import checkpoint

    meta = checkpoint.read_meta(tmp_path / "run", 6)
    assert meta["step"] == 6 and meta["config"]["model"]["init_from_scratch"]["hidden_size"] == 32
    assert meta["num_tokens"] == records[-1]["num_tokens"]
    export = tmp_path / "run" / "export"
    assert summary["exports"] == {"full": str(export)}
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()
    assert json.loads((export / "config.json").read_text())["hidden_size"] == 32
    assert summary["plan"]["params"] > 0 and summary["plan"]["trainable_params"] == summary["plan"]["params"]
    assert summary["plan"]["attention_impl"] == "xla"  # auto on CPU
    # packing=False: one document a row, so the attention bound handed to the model is 1
    assert summary["model"].layer(0).self_attn.max_segments == 1


def test_lora_run_keeps_frozen_base_weights_bit_for_bit(tokenizer_dir, small_data, tmp_path):
    config = tiny_config(tokenizer_dir, small_data, tmp_path / "lora", lora={"use_peft": True, "lora_r": 4,
                                                                               "lora_dropout": 0.0},
                         training={"max_steps": 3, "peak_tflops": 0.001},
                         data={"packing": False, "padding_free": False})
    mesh = sharding.create_mesh(config.sharding)
    tokenizer, _ = build.build_tokenizer(config)
    initial, _ = build.build_model(config, tokenizer, mesh)
    before = {p: np.asarray(v[...]) for p, v in base_params(initial).items()}
    lora_before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(initial, nnx.LoRAParam))}
    summary = train.run(config)
    model = summary["model"]
    after = {p: np.asarray(v[...]) for p, v in base_params(model).items()}
    assert before.keys() == after.keys() and len(before) > 0
    for p in before:
        assert np.array_equal(before[p], after[p]), p
    lora_after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert any(not np.array_equal(lora_before[k], lora_after[k]) for k in lora_before)
    assert summary["plan"]["trainable_params"] < summary["plan"]["params"] / 2
    assert summary["exports"] == {"adapter": str(tmp_path / "lora" / "adapter")}
    # MFU of a LoRA run counts no weight gradient for the frozen base: 4N + 6A + attention, not 6N + attention
    from jsft import flops

    last = [r for r in progress.read_metrics(tmp_path / "lora") if "mfu" in r][-1]
    logged = last["mfu"] * jax.device_count() * 1e9 / last["tokens_per_second"]  # peak 0.001 TFLOP/s
    hf = model.cfg.hf_config
    adapters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    attention_per_token = flops.attention_flops_per_token(hf, 1.0)
    seq = (logged - 4 * flops.matmul_params(hf) - 6 * adapters) / attention_per_token  # the attention length it used
    assert 1.0 <= seq <= 64.0, seq  # counting 6N would leave 2N - 6A unexplained: a length far past max_length


@pytest.mark.parametrize("field, value, message", [
    ("data.padding_free", True, "padding_free=True needs data.packing=True"),
    ("training.learning_rate", -1.0, "training.learning_rate=-1.0"),
    ("logging.export_formats", ["adapter"], "'adapter' needs a LoRA run"),
])
def test_config_error_fails_before_any_compute(tokenizer_dir, small_data, tmp_path, field, value, message):
    config = tiny_config(tokenizer_dir, small_data, tmp_path / "bad", data={"packing": False, "padding_free": False})
    section, name = field.split(".")
    setattr(getattr(config, section), name, value)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        train.run(config)
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "bad").exists()


def test_rows_longer_than_a_sliding_window_are_a_config_error(tokenizer_dir, small_data, tmp_path):
    """A Mistral config.json whose sliding_window is shorter than the rows: jsft's full attention would train another
    model, so the run stops before compiling anything, naming data.max_length and the window."""
    mistral = dict(tiny_config(tokenizer_dir, small_data, tmp_path).model.init_from_scratch, model_type="mistral",
                   architectures=["MistralForCausalLM"], sliding_window=32)
    config = tiny_config(tokenizer_dir, small_data, tmp_path / "run", model={"init_from_scratch": mistral})
    with pytest.raises(ConfigError, match=r"rows of 64 tokens \(data.max_length=64\) exceed the model's "
                                          r"sliding_window=32 .* Fix: set data.max_length <= 32"):
        train.run(config)
    config.data.max_length = 32
    assert train.run(config)["steps"] == 6


def test_stop_message_says_how_to_resume():
    """After Ctrl-C: with resume_from_checkpoint=False (TRL's default in a TRL config) the same command would start
    fresh and set the checkpoints aside, so the hint must ask for --resume."""
    from jsft.config import LoggingConfig

    assert "same command (or --resume)" in train.resume_hint(LoggingConfig(resume_from_checkpoint=None))
    hint = train.resume_hint(LoggingConfig(resume_from_checkpoint=False))
    assert "plus --resume" in hint and "starts fresh" in hint


@pytest.mark.parametrize("fmt", ["messages", "conversations", "conversational_prompt_completion", "prompt_completion"])
def test_eval_generations_for_every_chat_format(tokenizer_dir, tmp_path, fmt):
    """A few greedy replies at eval for chat data, whatever its format; none for plain prompt/completion."""
    source = "messages" if fmt == "conversations" else fmt
    rows = fixtures.make_rows(source, 6, seed=3)
    if fmt == "conversations":  # ShareGPT
        sharegpt = {"user": "human", "assistant": "gpt", "system": "system"}
        rows = [{"conversations": [{"from": sharegpt[m["role"]], "value": m["content"]} for m in r["messages"]]}
                for r in rows]
    path = fixtures.write_jsonl(rows, tmp_path / f"{fmt}.jsonl")
    config = tiny_config(tokenizer_dir, path, tmp_path / "run", data={"dataset_test_split": str(path), "max_length": 256})
    tokenizer, _ = build.build_tokenizer(config)
    model, _ = build.build_model(config, tokenizer, sharding.create_mesh(config.sharding))
    samples = evaluation.eval_generations(config, model, tokenizer, 2)
    if fmt == "prompt_completion":
        assert samples == []
        return
    assert len(samples) == 2
    chats = [r.get("messages") or r.get("conversations") or r["prompt"] + r["completion"] for r in rows]
    finals = {c[-1].get("content", c[-1].get("value")) for c in chats}
    assert all(s["reference"] in finals and isinstance(s["reply"], str) for s in samples)


def test_eval_generations_pass_over_a_bad_row(tokenizer_dir, tmp_path):
    """An eval row that preparation refuses (here an empty assistant message, skip_bad_rows) gives no sample and no
    error; the next rows do."""
    rows = fixtures.make_rows("messages", 6, seed=3)
    rows[0]["messages"][-1]["content"] = " "
    path = fixtures.write_jsonl(rows, tmp_path / "eval.jsonl")
    config = tiny_config(tokenizer_dir, path, tmp_path / "run", data={"dataset_test_split": str(path), "max_length": 256})
    tokenizer, _ = build.build_tokenizer(config)
    model, _ = build.build_model(config, tokenizer, sharding.create_mesh(config.sharding))
    samples = evaluation.eval_generations(config, model, tokenizer, 2)
    assert len(samples) == 2 and all(s["reference"].strip() for s in samples)


def test_pad_to_multiple_of_trains_the_same_as_rows_of_max_length(tokenizer_dir, tmp_path):
    """Without packing, padding each step only to its longest row (rounded up to 16) changes the shapes, not the run:
    the same losses and eval loss as rows padded to max_length, one compile per length used."""
    rows = fixtures.make_rows("prompt_completion", 24, seed=2)
    rows = [dict(r, completion=r["completion"] + " end" * (i // 8) * 8) for i, r in enumerate(rows)]  # longer each step
    data = fixtures.write_jsonl(rows, tmp_path / "pc.jsonl")
    runs = {}
    for name, pad_to in (("static", None), ("buckets", 16)):
        config = tiny_config(tokenizer_dir, data, tmp_path / name, training={"max_steps": 3},
                             data={"packing": False, "padding_free": False, "shuffle_dataset": False,
                                   "train_sampling_strategy": "sequential", "dataset_test_split": str(data),
                                   "pad_to_multiple_of": pad_to})
        step.train_step.jitted_fn.clear_cache()
        summary = train.run(config)
        runs[name] = (progress.read_metrics(tmp_path / name), step.train_step.jitted_fn._cache_size(), summary)
    (static, static_compiles, _), (buckets, bucket_compiles, summary) = runs["static"], runs["buckets"]
    # jit compiles: none for rows of max_length (the plan's compiled step runs them), one per other length used:
    # the 3 bucketed steps have 2 lengths, 64 and a shorter one
    assert static_compiles == 0 and bucket_compiles == 1, (static_compiles, bucket_compiles)
    assert summary["plan"]["step_lengths"] == [16, 32, 48, 64]
    for a, b in zip(static, buckets):
        for key in ("loss", "eval_loss", "grad_norm", "num_tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_every_row_trains_each_epoch_in_a_new_order(tokenizer_dir, tmp_path):
    """As TRL: the last partial step of an epoch is kept (its free slots are empty rows), so 20 rows at 8 a step are
    3 steps an epoch and every token counts once an epoch; rows are reshuffled every epoch even with
    shuffle_dataset=False (TRL's default, which only orders the examples before packing)."""
    from jsft.data.pipeline import prepare_dataset

    data = fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 20, seed=4), tmp_path / "pc.jsonl")
    config = tiny_config(tokenizer_dir, data, tmp_path / "run", training={"max_steps": -1, "num_train_epochs": 2.0},
                         data={"packing": False, "padding_free": False, "shuffle_dataset": False})
    summary = train.run(config)
    tokenizer, _ = build.build_tokenizer(config)
    row_tokens = prepare_dataset(config, tokenizer).stats["row_tokens"]
    records = [r for r in progress.read_metrics(tmp_path / "run") if "loss" in r]
    assert summary["steps"] == len(records) == 6
    cumulative = [0] + [r["num_tokens"] for r in records]
    per_step = np.diff(cumulative)
    assert sum(per_step[:3]) == sum(per_step[3:]) == row_tokens  # every row, once an epoch
    assert list(per_step[:3]) != list(per_step[3:])  # a new order in epoch 2
    config.data.train_sampling_strategy = "sequential"
    config.logging.output_dir = str(tmp_path / "sequential")
    train.run(config)
    records = [r for r in progress.read_metrics(tmp_path / "sequential") if "loss" in r]
    per_step = np.diff([0] + [r["num_tokens"] for r in records])
    assert list(per_step[:3]) == list(per_step[3:])


def test_save_strategy_no_writes_no_checkpoint_but_exports(tokenizer_dir, small_data, tmp_path):
    config = tiny_config(tokenizer_dir, small_data, tmp_path / "run", training={"max_steps": 3},
                         logging={"save_strategy": "no", "save_steps": 1},
                         data={"packing": False, "padding_free": False})
    summary = train.run(config)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not checkpoints.exists() or not any(p.name.isdigit() for p in checkpoints.iterdir())
    assert summary["steps"] == 3 and (tmp_path / "run" / "export" / "model.safetensors").exists()


def test_the_plan_says_which_attention_runs_and_why_the_probed_candidates_before_it_did_not(
        tokenizer_dir, small_data, tmp_path, monkeypatch, small_probe, capsys):
    """auto on a device where the first candidate does not build: the run falls back to the next one that passes
    its probe, trains, and the plan says so (a CPU has no real failing kernel: stand-ins in KERNELS)."""
    from jsft.model import attention, kernels

    def broken(q, k, v, segment_ids, scale, **options):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setitem(kernels.KERNELS, "broken", broken)
    monkeypatch.setitem(kernels.KERNELS, "working", kernels.xla_attention)
    monkeypatch.setattr(attention, "auto_candidates", lambda dtype: ("broken", "working"))
    config = tiny_config(tokenizer_dir, small_data, tmp_path / "run", training={"max_steps": 1},
                         logging={"save_strategy": "no", "export_formats": []})
    summary = train.run(config)
    assert summary["steps"] == 1 and np.isfinite(summary["last_metrics"]["loss"])
    assert summary["plan"]["attention_impl"] == "working"
    plan_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: attention"))
    assert plan_line.startswith("plan: attention working (probe passed: max rel err ")
    assert plan_line.endswith("; not broken: its probe failed: RuntimeError: no kernel image is available for "
                              "execution on the device); model.attention_impl='auto', at most "
                              f"{summary['model'].layer(0).self_attn.max_segments} documents a row")


def test_an_explicit_attention_that_cannot_run_here_stops_at_the_plan_with_the_reason(tokenizer_dir, small_data,
                                                                                      tmp_path):
    from jsft import cli
    from jsft.model.attention import AttentionUnavailable

    config = tiny_config(tokenizer_dir, small_data, tmp_path / "run", model={"attention_impl": "cudnn"})
    step.train_step.jitted_fn.clear_cache()
    with pytest.raises(AttentionUnavailable, match=r"^attention impl='cudnn' cannot run: it needs an NVIDIA GPU, "
                                                   r"and the default backend is 'cpu'\. Alternatives: ") as raised:
        train.run(config)
    assert isinstance(raised.value, cli.user_errors())
    assert step.train_step.jitted_fn._cache_size() == 0  # stopped before any step was traced


def test_the_compilation_cache_dir_holds_the_runs_compiled_steps(tokenizer_dir, small_data, tmp_path):
    """training.compilation_cache_dir="auto": jax's persistent cache under <output_dir>/jax_cache, so a resume or a
    rerun loads its compiled steps; "none" leaves jax's setting alone."""
    from jax._src import compilation_cache

    config = tiny_config(tokenizer_dir, small_data, tmp_path / "run", training={"max_steps": 1,
                                                                                  "compilation_cache_dir": "auto"})
    compilation_cache.reset_cache()  # jax opens its cache once per process
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # tiny steps compile fast: cache them anyway
    step.train_step.jitted_fn.clear_cache()
    try:
        train.run(config)
        cache = tmp_path / "run" / "jax_cache"
        assert jax.config.jax_compilation_cache_dir == str(cache)
        assert any("train_step" in p.name for p in cache.iterdir()), sorted(p.name for p in cache.iterdir())
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()


@pytest.mark.parametrize("training", [
    {"optim": "adafactor", "lr_scheduler_type": "warmup_stable_decay", "warmup_steps": 1,
     "lr_scheduler_kwargs": {"num_decay_steps": 2}, "learning_rate": 3e-2},
    {"optim": "lion_32bit", "learning_rate": 1e-3, "label_smoothing_factor": 0.1, "neftune_noise_alpha": 5.0},
])
def test_other_optimizers_schedules_smoothing_and_neftune_train_end_to_end(tokenizer_dir, small_data, tmp_path,
                                                                            training):
    config = tiny_config(tokenizer_dir, small_data, tmp_path / "run", training={**training, "max_steps": 4},
                         data={"packing": False, "padding_free": False, "shuffle_dataset": False},
                         logging={"save_strategy": "no"})
    train.run(config)
    losses = [r["loss"] for r in progress.read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0], losses


def test_trl_flags_on_the_command_line_reach_the_run(tokenizer_dir, small_data, tmp_path):
    """`jsft train --config c.py --learning_rate 3e-3 --max_steps 2 --lr_scheduler_type linear`: TRL's flat flags
    over a jsft config, through the command's own argument parsing."""
    from pathlib import Path

    from train_configs import write_config_file

    config_file = write_config_file(tmp_path / "c.py", Path(__file__).parent, tokenizer_dir, small_data,
                                    tmp_path / "run", data={"packing": False, "padding_free": False},
                                    logging={"save_strategy": "no"})
    summary = train.main(["--config", str(config_file), "--learning_rate", "3e-3", "--max_steps", "2",
                          "--lr_scheduler_type", "linear", "--warmup_steps", "1"])
    records = [r for r in progress.read_metrics(tmp_path / "run") if "loss" in r]
    assert summary["steps"] == 2 and [r["learning_rate"] for r in records] == [0.0, pytest.approx(3e-3)]


def test_eval_each_epoch_on_start_first_step_and_ratio_steps(tokenizer_dir, small_data, tmp_path):
    """eval_strategy='epoch' + eval_on_start, logging_first_step, save_steps as a ratio of the total steps."""
    config = tiny_config(tokenizer_dir, small_data, tmp_path / "run",
                         data={"packing": False, "padding_free": False, "dataset_test_split": str(small_data)},
                         training={"max_steps": -1, "num_train_epochs": 3.0, "per_device_train_batch_size": 1},
                         logging={"eval_strategy": "epoch", "eval_on_start": True, "logging_steps": 2,
                                  "logging_first_step": True, "save_steps": 0.5, "save_total_limit": None})
    summary = train.run(config)
    assert summary["steps"] == 3  # 8 rows, 8 rows a step: one step an epoch
    records = progress.read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 1, 2, 3]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # first step, every 2, the last
    from jsft import checkpoint

    assert checkpoint.steps(tmp_path / "run") == [2, 3]  # save_steps 0.5 of 3 steps -> every 2, and the end


def test_load_best_model_at_end_exports_the_best_checkpoint_and_keeps_it_from_rotation(tokenizer_dir, tmp_path):
    """metric_for_best_model=loss with greater_is_better=True picks the checkpoint with the HIGHEST eval loss: an
    early one while the loss falls, whatever the run's dynamics. With save_total_limit 1 that checkpoint is kept
    anyway beside the newest, restored at the end, and its eval loss is the run's final eval."""
    data = fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 8, seed=5), tmp_path / "pc.jsonl")
    config = tiny_config(tokenizer_dir, data, tmp_path / "run",
                         data={"packing": False, "padding_free": False, "shuffle_dataset": False,
                               "dataset_test_split": str(data)},
                         training={"max_steps": 8, "lr_scheduler_type": "constant"},
                         logging={"eval_strategy": "steps", "eval_steps": 2, "save_steps": 2, "save_total_limit": 1,
                                  "load_best_model_at_end": True, "metric_for_best_model": "loss",
                                  "greater_is_better": True})
    summary = train.run(config)
    records = progress.read_metrics(tmp_path / "run")
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r and r["step"] in (2, 4, 6, 8)}
    best_step = max(evals, key=evals.get)
    assert summary["best_checkpoint"]["step"] == best_step and best_step != 8, evals
    from jsft import checkpoint

    assert checkpoint.steps(tmp_path / "run") == sorted({best_step, 8})
    assert summary["eval"]["eval_loss"] == pytest.approx(evals[best_step], rel=1e-5)


def test_an_unsupported_architecture_fails_before_the_data_is_tokenized(tokenizer_dir, checkpoint_dir, tmp_path,
                                                                         monkeypatch):
    import shutil

    from jsft.data import pipeline
    from jsft.model.llama import ModelConfigError

    model = tmp_path / "gpt2"
    shutil.copytree(checkpoint_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    data = fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 8, seed=5), tmp_path / "pc.jsonl")
    config = tiny_config(tokenizer_dir, data, tmp_path / "run")
    config.model.init_from_scratch, config.model.model_name_or_path = None, str(model)
    monkeypatch.setattr(pipeline, "prepare_dataset", lambda *a, **k: pytest.fail("tokenized before the model check"))
    with pytest.raises(ModelConfigError, match="'GPT2LMHeadModel' is not supported"):
        train.run(config)
