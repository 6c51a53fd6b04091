"""`python -m jsft.train --config configs/<name>.py [--set section.field=value ...] [--resume]`

The run, top to bottom:

    setup(config) -> RunParts     devices, output directory, tokenizer, data, model (+ LoRA), optimizer, checkpoints
    resume(parts) -> LoopState    the newest intact checkpoint restored, or a fresh start
    (the plan: jsft.plan)         sizes, memory, the compiled step
    loop(...)                     the steps: log, eval, save; signals (jsft.signals), the divergence guard (jsft.guard)
    finish(...) -> summary        final checkpoint, final eval, the best model (jsft.best), export

`run(config, callbacks)` does it all for a resolved config and returns a summary dict: the one entry of the command
line (`main(argv)`: argv -> config -> run) and of the Python API (jsft.trainer.SFTTrainer.train: objects -> config
-> run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import jax
from flax import nnx

from jsft import checkpoint, outdir, peers, progress, sharding, step
from jsft import trackers as trackers_lib
from jsft.best import BestCheckpoint
from jsft.build import (build_model, build_tokenizer, check_model_config, check_sliding_window, modules_to_save,
                        trainable, warn_past_max_positions)
from jsft.callbacks import Callbacks
from jsft.config import ConfigError, LoggingConfig, SFTConfig
from jsft.config_files import load
from jsft.data.pipeline import PreparedDataset, batch_iterator, format_stats, prepare_dataset, steps_per_epoch
from jsft.data.streaming import StreamedDataset, prepare_stream, stream_iterator
from jsft.evaluation import eval_mode, eval_rows, evaluate, run_eval
from jsft.export import export, resolve_formats
from jsft.flops import effective_seq_len, flops_per_token, lora_frozen_params, mfu, peak_tflops
from jsft.guard import Diverged, DivergenceGuard
from jsft.optim import make_optimizer
from jsft.plan import PlannedStep, print_plan
from jsft.signals import StopSignals
from jsft.trl_config import parse_flags
from jsft.validate import validate


def should_log(logging, step: int, total_steps: int) -> bool:
    """A train record after this optimizer step? Every logging_steps, the last step, and the first one with
    logging_first_step."""
    return step % logging.logging_steps == 0 or step == total_steps or (logging.logging_first_step and step == 1)


def should_save(logging, step: int, epoch_steps: int) -> bool:
    """A checkpoint after this optimizer step? logging.save_strategy: every save_steps, at each epoch's end, or never
    (a stop by Ctrl-C still saves; 'steps' and 'epoch' also save at the end of the run; 'best' saves where an eval
    finds a new best, decided in the loop)."""
    if logging.save_strategy == "steps":
        return step % logging.save_steps == 0
    return logging.save_strategy == "epoch" and step % epoch_steps == 0


def should_eval(logging, step: int, epoch_steps: int) -> bool:
    """An eval after this optimizer step? logging.eval_strategy: every eval_steps (if set), each epoch's end, or no."""
    if logging.eval_strategy == "steps":
        return bool(logging.eval_steps) and step % logging.eval_steps == 0
    return logging.eval_strategy == "epoch" and step % epoch_steps == 0


def with_step_counts(logging, total_steps: int):
    """logging_steps / eval_steps / save_steps given as ratios (< 1) of the total steps -> step counts, as
    transformers: ceil(ratio * total_steps). E.g. save_steps 0.25 of 90 steps -> every 23 steps."""
    counts = {}
    for name in ("logging_steps", "eval_steps", "save_steps"):
        value = getattr(logging, name)
        counts[name] = value if value is None else max(1, math.ceil(value * total_steps)) if value < 1 else int(value)
    return dataclasses.replace(logging, **counts)


def total_steps_for(config: SFTConfig, steps_per_epoch: int) -> int:
    t = config.training
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(t.num_train_epochs * steps_per_epoch))


def use_compilation_cache(training, output_dir) -> Path | None:
    """Point jax's persistent compilation cache at training.compilation_cache_dir ("auto": <output_dir>/jax_cache,
    "none": off); returns the directory. jax opens the cache at its first compile and keeps it for the process, so
    a second run in the same process keeps the first one's directory."""
    setting = training.compilation_cache_dir
    if setting == "none":
        return None
    cache = Path(output_dir) / "jax_cache" if setting == "auto" else Path(setting).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    return cache




def resume_hint(lc) -> str:
    """How to resume a stopped run: the same command resumes unless logging.resume_from_checkpoint=False (a TRL
    config's default), which would start fresh and set the checkpoints aside."""
    if lc.resume_from_checkpoint is False:
        return ("Resume with the same command plus --resume (without it, logging.resume_from_checkpoint=False starts "
                "fresh and moves these checkpoints to checkpoints.previous).")
    return "Resume with the same command (or --resume)."


def run(config: SFTConfig, callbacks=()) -> dict:
    """Train as the config says; returns a summary: steps, last logged metrics, the plan, export paths, and
    "model" (the trained model object, for callers in the same process). `callbacks` (jsft.callbacks) see the run
    begin, every logged record (and may stop the run) and its summary. The output directory is locked for the run
    (jsft.outdir): a second run on it fails at once."""
    config = validate(config)
    resolve_formats(config)  # export settings fail now, not after training
    lc = config.logging
    out = Path(lc.output_dir)
    if lc.resume_from_checkpoint and checkpoint.latest_step(out) is None:
        raise ConfigError(f"logging.resume_from_checkpoint=True but {checkpoint.checkpoint_dir(out)} has no checkpoint")
    sharding.initialize_distributed(config.sharding)
    signals = StopSignals(lc.save_on_sigterm)  # after jax.distributed, whose preemption notifier would take SIGTERM
    peers.start(jax.process_index(), jax.process_count())  # several processes: a failure stops them all (jsft.peers)
    try:
        with outdir.claim(out, enabled=jax.process_index() == 0):  # creates it; a clear error when a run holds it
            summary = _train(config, signals, Callbacks(callbacks))
    finally:
        signals.restore()
    peers.stop()
    return summary


def _train(config: SFTConfig, signals: StopSignals, callbacks: Callbacks) -> dict:
    """setup -> resume -> (callbacks: the run begins) -> the plan -> loop -> finish."""
    parts = setup(config)
    state = resume(parts)
    callbacks.train_begin(config, parts.model, parts.tokenizer)
    writer = _open_writer(parts, state.step)
    first = next(parts.data_it)
    plan, compiled = print_plan(config, parts.model, parts.optimizer, parts.wrt, first, parts.mesh, parts.total_steps,
                                state.step, parts.schedule, parts.train_data)
    train_step = PlannedStep(compiled, parts.train_data.max_length, **step.train_options(config.training),
                             schedule=parts.schedule)
    loop(parts, state, train_step, first, writer, callbacks, signals)
    return finish(parts, state, plan, writer, callbacks, signals)


# ----------------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class RunParts:
    """What setup() builds from the config; resume(), loop() and finish() share it."""

    config: SFTConfig
    logging: LoggingConfig  # config.logging with its ratio step counts made counts of this run's steps
    out: Path  # the output directory
    mesh: jax.sharding.Mesh
    is_main: bool  # process 0: writes config.json, the metrics, the exports
    tokenizer: object
    train_data: PreparedDataset | StreamedDataset  # a stream with data.dataset_streaming
    eval_data: PreparedDataset | None
    epoch_steps: int
    total_steps: int
    model: nnx.Module
    trained_embeddings: bool  # the whole embedding and head train too (new tokens or a grown vocabulary)
    wrt: object  # the trainable parameters' filter (jsft.optim.trainable_filter)
    optimizer: nnx.Optimizer
    schedule: object  # the learning rate by step
    data_it: object  # this process's batches, checkpointable (jsft.data.pipeline.batch_iterator)
    data_count: int  # the processes that read data
    fingerprint: dict  # the training data's, saved in each checkpoint and compared on resume
    best: BestCheckpoint | None  # load_best_model_at_end / save_strategy "best"
    manager: object  # Orbax's checkpoint manager (resume may open a fresh one)


def setup(config: SFTConfig) -> RunParts:
    """Everything before the first step, in the order that fails fastest: the mesh and output directory, the
    tokenizer, the data (tokenized), the step counts, the model (+ LoRA) and its optimizer, the checkpoints."""
    tc = config.training
    out = Path(config.logging.output_dir)
    mesh = sharding.create_mesh(config.sharding)
    data_index, data_count = sharding.data_process_split(mesh)
    is_main = jax.process_index() == 0
    _prepare_output_dir(config, out, is_main)
    tokenizer, added_tokens = build_tokenizer(config)
    check_model_config(config)  # an unsupported architecture or RoPE type fails before tokenizing, not after
    streamed = config.data.dataset_streaming  # read, tokenized and packed while training runs (jsft.data.streaming)
    train_data, eval_data = _prepare_data(config, tokenizer)
    # saved in each checkpoint, compared on resume
    fingerprint = train_data.fingerprint() if streamed else checkpoint.data_fingerprint(train_data)
    batch_shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    rows_per_micro = tc.per_device_train_batch_size * batch_shards // data_count  # this process's rows
    # every row each epoch, as TRL (dataloader_drop_last=False): the last step's free slots are empty rows
    # a stream has no length: its epoch is max_steps, as transformers counts an IterableDataset's
    epoch_steps = tc.max_steps if streamed else steps_per_epoch(
        train_data, rows_per_micro * data_count, tc.gradient_accumulation_steps, drop_remainder=False)
    total_steps = total_steps_for(config, epoch_steps)
    lc = with_step_counts(config.logging, total_steps)
    num_epochs = None if tc.max_steps > 0 else math.ceil(tc.num_train_epochs)

    model, grew_vocab = build_model(config, tokenizer, mesh)
    datasets = [d for d in (train_data, eval_data) if d is not None]
    check_sliding_window(model.cfg, datasets)
    warn_past_max_positions(model.cfg, [d for d in datasets if not d.stats.get("streamed")], config.data.max_length)
    segments = [d.stats["max_documents_per_row"] for d in datasets]
    model.set_max_segments(None if None in segments else max(segments))  # None: a stream's, not known up front
    trained_embeddings = bool(added_tokens) or grew_vocab  # the whole embedding and head train too (LoRA)
    wrt = trainable(config, model, trained_embeddings)
    tx, schedule = make_optimizer(tc, total_steps)
    optimizer = sharding.create_sharded_optimizer(model, tx, wrt, mesh)  # moments built in their shards

    best = BestCheckpoint.from_config(lc)
    manager = _checkpoint_manager(out, lc, best)
    if streamed:
        data_it = stream_iterator(train_data, rows_per_micro, tc.gradient_accumulation_steps, data_index, data_count)
    else:
        data_it = batch_iterator(train_data, rows_per_micro, tc.gradient_accumulation_steps, tc.seed, num_epochs,
                                 config.data.train_sampling_strategy != "sequential", data_index, data_count,
                                 drop_remainder=False)
    return RunParts(config, lc, out, mesh, is_main, tokenizer, train_data, eval_data, epoch_steps, total_steps, model,
                    trained_embeddings, wrt, optimizer, schedule, data_it, data_count, fingerprint, best, manager)


def _prepare_output_dir(config: SFTConfig, out: Path, is_main: bool) -> None:
    outdir.make_dir(out)  # process 0's lock made it; a clear error for a file in the way on the others
    cache = use_compilation_cache(config.training, out)
    if is_main:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        print(f"compilation cache: {cache or 'off (training.compilation_cache_dir=none)'}")


def _prepare_data(config: SFTConfig, tokenizer) -> tuple[PreparedDataset | StreamedDataset, PreparedDataset | None]:
    """The train split (tokenized, or a stream: data.dataset_streaming) and the eval split (None without
    data.dataset_test_split), their stats printed."""
    streamed = config.data.dataset_streaming
    train_data = prepare_stream(config, tokenizer) if streamed else prepare_dataset(config, tokenizer, "train")
    print(format_stats(train_data.stats))
    eval_data = None
    if config.data.dataset_test_split is not None:
        eval_data = prepare_dataset(config, tokenizer, "eval")
        print(format_stats(eval_data.stats))
    return train_data, eval_data


def _checkpoint_manager(out: Path, lc: LoggingConfig, best: BestCheckpoint | None):
    """Keeps save_total_limit checkpoints, and the best one besides (jsft.best)."""
    return checkpoint.make_manager(out, lc.save_total_limit, keep=best.keep if best is not None else None)


def _open_writer(parts: RunParts, start_step: int) -> progress.MetricsWriter:
    """The metrics files and trackers (process 0's), cut back to start_step on resume."""
    lc = parts.logging
    trackers = trackers_lib.open_trackers(lc.report_to, lc.project, lc.run_name, dataclasses.asdict(parts.config),
                                          parts.out) if parts.is_main else []
    return progress.MetricsWriter(parts.out, lc.report_to, resume_step=start_step, enabled=parts.is_main,
                                  trackers=trackers)


# ----------------------------------------------------------------------------------------------- resume


@dataclasses.dataclass
class LoopState:
    """Where the run is: as resume() finds it, and as each step leaves it."""

    step: int = 0
    tokens_seen: float = 0.0  # the logged steps' tokens (the window's join at the next log)
    window: list = dataclasses.field(default_factory=list)  # each step's metrics since the last log
    saved_step: int | None = None  # the newest checkpoint
    last_metrics: dict = dataclasses.field(default_factory=dict)  # the last logged train record
    last_eval: dict = dataclasses.field(default_factory=dict)  # the last eval's metrics


def resume(parts: RunParts) -> LoopState:
    """The newest intact checkpoint (a damaged newer one is set aside) restored into the model, the optimizer, the
    data iterator and the best checkpoint; or a fresh start: no checkpoint, or logging.resume_from_checkpoint=False
    (which sets the old ones aside)."""
    lc = parts.logging
    existing = parts.manager.latest_step()
    if existing is not None and lc.resume_from_checkpoint is False:
        parts.manager.close()
        print(f"logging.resume_from_checkpoint=False: starting fresh; the old checkpoints are now in "
              f"{checkpoint.set_aside(parts.out)} (the set there before is gone)")
        parts.manager, existing = _checkpoint_manager(parts.out, lc, parts.best), None
    if existing is None:
        return LoopState()
    parts.manager, meta = checkpoint.restore_newest_intact(parts.manager, parts.model, parts.optimizer, parts.config,
                                                           parts.fingerprint)
    parts.data_it.set_state(meta["data_iterator"])
    window = meta.get("log_window", [])  # the steps since the last log: the next log covers them too
    if parts.best is not None:
        parts.best.restore(meta.get("best"))
    start_step = int(meta["step"])
    print(f"resume: checkpoint {start_step} from {checkpoint.checkpoint_dir(parts.out)}")
    tokens_seen = float(meta.get("num_tokens", 0.0)) - sum(m["num_tokens"] for m in window)
    return LoopState(step=start_step, tokens_seen=tokens_seen, window=window, saved_step=start_step)


def save(parts: RunParts, state: LoopState, force: bool = False) -> None:
    """A checkpoint of this step (asynchronous: checkpoint.wait before reading it)."""
    checkpoint.save(parts.manager, state.step, parts.model, parts.optimizer, parts.data_it.get_state(),
                    _progress_state(state.window, state.tokens_seen, parts.config, parts.fingerprint, parts.best),
                    force=force)
    state.saved_step = state.step


def _progress_state(window, tokens_seen, config, data_fingerprint=None, best=None) -> dict:
    """What a checkpoint keeps besides the arrays: tokens seen (logged ones plus the window's), each step's metrics
    since the last log (a resumed run logs the same means as an uninterrupted one), the config, the data's
    fingerprint (checkpoint.data_fingerprint), the best checkpoint so far (jsft.best)."""
    window = [{key: float(value) for key, value in m.items()} for m in jax.device_get(window)]
    return {"num_tokens": tokens_seen + sum(m["num_tokens"] for m in window), "log_window": window,
            "config": config.to_dict(), "data_fingerprint": data_fingerprint,
            "best": None if best is None else best.state()}


# ----------------------------------------------------------------------------------------------- the loop


def loop(parts: RunParts, state: LoopState, train_step, batch, writer, callbacks: Callbacks,
         signals: StopSignals) -> None:
    """Steps from state.step to total_steps (or the data's end, a signal, a callback's stop), logging, evaluating
    and saving as parts.logging says. `batch` is the first one (the plan's). On a divergence (jsft.guard) the
    checkpoints being written are kept, the checkpoints and metrics closed, and Diverged raised."""
    lc, tc = parts.logging, parts.config.training
    utilization = _utilization(parts)
    signals.start_loop()
    multi_process = jax.process_count() > 1
    guard = DivergenceGuard(tc.max_nonfinite_steps, tc.learning_rate)
    bar = progress.progress_bar(parts.total_steps, state.step, disable=lc.disable_tqdm or not parts.is_main)
    throughput = progress.Throughput()
    if parts.eval_data is not None and lc.eval_on_start and state.step == 0:
        callbacks.log(0, _eval(parts, writer, 0, bar))
    try:
        with jax.set_mesh(parts.mesh):
            while state.step < parts.total_steps:
                batch = next(parts.data_it, None) if batch is None else batch
                if batch is None:
                    break
                seq = _optimizer_step(parts, state, train_step, batch, guard, throughput)
                batch = None
                bar.update(1)
                if should_log(lc, state.step, parts.total_steps):
                    guard.check_pending(_last_good(parts, state))
                    record = _log_window(parts, state, throughput.report, utilization, seq)
                    writer.write(state.step, record)
                    callbacks.log(state.step, record)
                    bar.set_postfix(progress.bar_postfix(record, record["tokens_per_second"], record.get("mfu")))
                new_best = False
                if parts.eval_data is not None and should_eval(lc, state.step, parts.epoch_steps):
                    state.last_eval = _eval(parts, writer, state.step, bar)
                    callbacks.log(state.step, state.last_eval)
                    new_best = parts.best is not None and parts.best.is_better(state.last_eval)
                    throughput.restart()  # tokens/s counts training time only
                stop = signals.agreed_stop(state.step, multi_process)
                saving = should_save(lc, state.step, parts.epoch_steps) or (lc.save_strategy == "best" and new_best)
                if saving or stop:
                    guard.check_pending(_last_good(parts, state))
                    if saving and new_best:  # transformers: the best is chosen among saved checkpoints
                        parts.best.record(state.step, state.last_eval)
                    save(parts, state)
                if stop or callbacks.stop_requested:
                    break
            guard.check_pending(_last_good(parts, state))
    except Diverged:
        checkpoint.wait(parts.manager)  # the good checkpoints being written are kept
        parts.manager.close()
        writer.close()
        raise
    finally:
        bar.close()


def _optimizer_step(parts: RunParts, state: LoopState, train_step, batch, guard: DivergenceGuard,
                    throughput: progress.Throughput) -> float:
    """One optimizer step on batch (its metrics join the window; the guard reads them during the next step).
    Returns the batch's effective sequence length (for MFU)."""
    step.check_batch(batch, state.step + 1)
    _, local_tokens = step.host_token_counts(batch)
    seq = effective_seq_len(batch["segment_ids"][0])
    metrics = train_step(parts.model, parts.optimizer, sharding.shard_batch(batch, parts.mesh))
    state.step += 1
    guard.check_later(state.step, metrics, _last_good(parts, state))  # the step before this one: done by now
    state.window.append(metrics)
    throughput.add(local_tokens * parts.data_count)
    return seq


def _last_good(parts: RunParts, state: LoopState) -> Path | None:
    """The newest checkpoint's directory, for the divergence message."""
    return None if state.saved_step is None else checkpoint.checkpoint_dir(parts.out) / str(state.saved_step)


def _log_window(parts: RunParts, state: LoopState, tokens_per_second, utilization, seq: float) -> dict:
    """The train record of the steps since the last log (read from the device now); the window starts again."""
    state.window = jax.device_get(state.window)
    state.tokens_seen += sum(float(m["num_tokens"]) for m in state.window)
    rate = tokens_per_second()  # after the device_get: the window's steps have finished
    state.last_metrics = progress.window_metrics(state.window, state.tokens_seen, state.step, parts.epoch_steps, rate,
                                                 utilization(rate, seq))
    state.window = []
    return state.last_metrics


def _utilization(parts: RunParts):
    """(tokens per second, effective sequence length) -> MFU (None where the device's peak is unknown). LoRA: no
    gradient counted for the frozen weights (jsft.flops.flops_per_token)."""
    peak = peak_tflops(override=parts.config.training.peak_tflops)
    hf_cfg = parts.model.cfg.hf_config
    flop_counts = {}
    if parts.config.lora.use_peft:
        flop_counts = dict(lora_params=sum(x.size for x in jax.tree.leaves(nnx.state(parts.model, nnx.LoRAParam))),
                           frozen_params=lora_frozen_params(hf_cfg, head_trains=parts.trained_embeddings or "lm_head"
                                                            in modules_to_save(parts.config, parts.model)))
    return lambda rate, seq: mfu(rate, flops_per_token(hf_cfg, seq, **flop_counts), jax.device_count(), peak)


def _eval(parts: RunParts, writer, step_no: int, bar) -> dict:
    return run_eval(parts.config, parts.model, parts.tokenizer, parts.eval_data, parts.mesh, writer, step_no, bar)


# ----------------------------------------------------------------------------------------------- finish


def finish(parts: RunParts, state: LoopState, plan: dict, writer, callbacks: Callbacks, signals: StopSignals) -> dict:
    """The end of the run: the last checkpoint; then, unless a signal stopped it, the final eval, the best model
    (load_best_model_at_end) and the export. Returns the summary, which the callbacks see last."""
    lc = parts.logging
    if state.saved_step != state.step and lc.save_strategy not in ("no", "best"):  # the end of the run
        save(parts, state, force=True)
    checkpoint.wait(parts.manager)
    parts.manager.close()
    summary = {"steps": state.step, "total_steps": parts.total_steps, "interrupted": signals.requested is not None,
               "plan": plan, "last_metrics": state.last_metrics, "output_dir": str(parts.out), "exports": {},
               "model": parts.model, "tokenizer": parts.tokenizer, "trained_embeddings": parts.trained_embeddings,
               "stopped_by_callback": callbacks.stop_requested, "exit_status": signals.exit_status}
    if summary["interrupted"]:
        print(f"stopped at step {state.step} ({signal.Signals(signals.requested).name}); checkpoint saved. "
              f"{resume_hint(lc)}", flush=True)
        writer.close()
        return summary
    if parts.eval_data is not None and not should_eval(lc, state.step, parts.epoch_steps):
        state.last_eval = _eval(parts, writer, state.step, None)
        callbacks.log(state.step, state.last_eval)
    if lc.load_best_model_at_end and parts.best.step is not None and parts.best.step != state.step:
        _load_best(parts, state)
    if parts.best is not None:
        summary["best_checkpoint"] = parts.best.state()
    if parts.eval_data is not None:
        summary["eval"] = state.last_eval
    if parts.is_main:
        summary["exports"] = _export(parts)
    writer.close()
    callbacks.train_end(summary)
    return summary


def _load_best(parts: RunParts, state: LoopState) -> None:
    """The best checkpoint's params into the model (and its eval metrics into state.last_eval)."""
    best = parts.best
    with checkpoint.make_manager(parts.out, parts.logging.save_total_limit, async_save=False) as reader:
        checkpoint.restore_params(reader, parts.model, parts.wrt, best.step, parts.config)
    print(f"load_best_model_at_end: checkpoint {best.step} ({best.metric} {best.value:.4f}) is the model exported")
    if parts.eval_data is not None:
        with eval_mode(parts.model):
            state.last_eval = evaluate(parts.config, parts.model, parts.eval_data, parts.mesh,
                                       eval_rows(parts.config, parts.mesh))


def _export(parts: RunParts) -> dict[str, str]:
    """The trained model in the configured formats (jsft.export), each path printed."""
    exports = {k: str(v) for k, v in export(parts.model, parts.tokenizer, parts.config,
                                            trained_embeddings=parts.trained_embeddings).items()}
    for fmt, path in exports.items():
        print(f"export ({fmt}): {path}")
    return exports


# ----------------------------------------------------------------------------------------------- command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jsft.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="a configs/<name>.py file (or a TRL SFTConfig YAML/JSON)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field (repeatable)")
    parser.add_argument("--resume", action="store_true", help="require resuming from the latest checkpoint")
    parser.epilog = ("Any TRL SFTConfig/ModelConfig/ScriptArguments field is also a flag, as `trl sft` takes it: "
                     "--learning_rate 1e-4 --max_length 4096 --packing (applied over --config; without --config "
                     "they are the whole TRL config).")
    args, rest = parser.parse_known_args(argv)
    args.trl_flags = parse_flags(rest)
    if args.config is None and not args.trl_flags:
        parser.error("give --config FILE, or TRL flags such as --model_name_or_path and --dataset_name")
    return args


def main(argv=None, callbacks=()) -> dict:
    """The command line: argv -> a resolved config (jsft.config_files.load) -> run(config, callbacks)."""
    args = parse_args(argv)
    overrides = list(args.set) + (["logging.resume_from_checkpoint=true"] if args.resume else [])
    config = load(args.config, overrides, args.trl_flags)
    started = time.perf_counter()
    summary = run(config, callbacks)
    if summary["interrupted"]:
        return summary  # the stop message has been printed
    print(f"done: {summary['steps']} steps in {time.perf_counter() - started:.0f} s; output in {summary['output_dir']}")
    return summary


if __name__ == "__main__":
    from jsft import cli

    # a run stopped by a signal after saving: 130 (SIGINT) or 143 (SIGTERM), so job scripts can tell (jsft.signals)
    raise SystemExit(cli.run(main)["exit_status"])
