"""`python -m jsft.train --config configs/<name>.py [--set section.field=value ...] [--resume]`

The run, top to bottom: config -> devices -> tokenizer -> data -> model (+ LoRA) -> optimizer -> checkpoint resume
-> the plan -> the loop (log, eval, save) -> final checkpoint -> export. `run(config)` does it all and returns a
summary dict; `main(argv)` is the command line.
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
import numpy as np
from flax import nnx

from jsft import checkpoint, outdir, peers, progress, sharding, step
from jsft import trackers as trackers_lib
from jsft.best import BestCheckpoint
from jsft.build import build_model, build_tokenizer, check_model_config, check_sliding_window, warn_past_max_positions
from jsft.config import ConfigError, SFTConfig, validate
from jsft.config_files import load
from jsft.evaluation import eval_mode, eval_rows, evaluate, run_eval
from jsft.guard import Diverged, DivergenceGuard
from jsft.plan import PlannedStep, print_plan
from jsft.signals import StopSignals
from jsft.loss import effective_seq_len, flops_per_token, lora_frozen_params, mfu, peak_tflops

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
    """Train as the config says; returns a summary: steps, last logged metrics, the plan, export paths, demo
    results, and "model" (the trained model object, for callers in the same process). The output directory is
    locked for the run (jsft.outdir): a second run on it fails at once."""
    # ---- config and devices
    from jsft.export import resolve_formats

    config = validate(config)
    resolve_formats(config)  # export settings fail now, not after training
    lc, tc = config.logging, config.training
    out = Path(lc.output_dir)
    if lc.resume_from_checkpoint and checkpoint.latest_step(out) is None:
        raise ConfigError(f"logging.resume_from_checkpoint=True but {checkpoint.checkpoint_dir(out)} has no checkpoint")
    sharding.initialize_distributed(config.sharding)
    signals = StopSignals(lc.save_on_sigterm)  # after jax.distributed, whose preemption notifier would take SIGTERM
    peers.start(jax.process_index(), jax.process_count())  # several processes: a failure stops them all (jsft.peers)
    try:
        with outdir.claim(out, enabled=jax.process_index() == 0):  # creates it; a clear error when a run holds it
            summary = _train(config, signals, callbacks)
    finally:
        signals.restore()
    peers.stop()
    return summary


def _train(config: SFTConfig, signals: StopSignals, callbacks) -> dict:
    lc, tc = config.logging, config.training
    out = Path(lc.output_dir)
    mesh = sharding.create_mesh(config.sharding)
    data_index, data_count = sharding.data_process_split(mesh)
    is_main = jax.process_index() == 0
    outdir.make_dir(out)  # process 0's lock made it; a clear error for a file in the way on the others
    cache = use_compilation_cache(tc, out)
    if is_main:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        print(f"compilation cache: {cache or 'off (training.compilation_cache_dir=none)'}")

    # ---- tokenizer and data
    from jsft.data.pipeline import batch_iterator, format_stats, prepare_dataset, steps_per_epoch

    tokenizer, added_tokens = build_tokenizer(config)
    check_model_config(config)  # an unsupported architecture or RoPE type fails before tokenizing, not after
    train_data = prepare_dataset(config, tokenizer, "train")
    print(format_stats(train_data.stats))
    fingerprint = checkpoint.data_fingerprint(train_data)  # saved in each checkpoint, compared on resume
    eval_data = None
    if config.data.dataset_test_split is not None:
        eval_data = prepare_dataset(config, tokenizer, "eval")
        print(format_stats(eval_data.stats))
    batch_shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    rows_per_micro = tc.per_device_train_batch_size * batch_shards // data_count  # this process's rows
    # every row each epoch, as TRL (dataloader_drop_last=False): the last step's free slots are empty rows
    epoch_steps = steps_per_epoch(train_data, rows_per_micro * data_count, tc.gradient_accumulation_steps,
                                  drop_remainder=False)
    total_steps = total_steps_for(config, epoch_steps)
    lc = with_step_counts(lc, total_steps)
    num_epochs = None if tc.max_steps > 0 else math.ceil(tc.num_train_epochs)

    # ---- model, LoRA, optimizer
    from jsft.optim import make_optimizer, trainable_filter

    model, grew_vocab = build_model(config, tokenizer, mesh)
    check_sliding_window(model.cfg, [d for d in (train_data, eval_data) if d is not None])
    warn_past_max_positions(model.cfg, [d for d in (train_data, eval_data) if d is not None], config.data.max_length)
    model.set_max_segments(max(d.stats["max_documents_per_row"] for d in (train_data, eval_data) if d is not None))
    wrt_embeddings = bool(added_tokens) or grew_vocab  # the whole embedding and head train too (LoRA)
    wrt = trainable_filter(config.lora.use_peft, new_token_rows=wrt_embeddings)
    tx, schedule = make_optimizer(tc, total_steps)
    optimizer = sharding.create_sharded_optimizer(model, tx, wrt, mesh)  # moments built in their shards

    demo_before = None
    if lc.demo_eval:
        from jsft import demo

        with eval_mode(model):
            demo_before = demo.accuracy(model, tokenizer, config, label="before training")

    # ---- resume
    best = BestCheckpoint.from_config(lc)  # load_best_model_at_end / save_strategy "best"
    keep = best.keep if best is not None else None
    manager = checkpoint.make_manager(out, lc.save_total_limit, keep=keep)
    data_it = batch_iterator(train_data, rows_per_micro, tc.gradient_accumulation_steps, tc.seed, num_epochs,
                             config.data.train_sampling_strategy != "sequential", data_index, data_count,
                             drop_remainder=False)
    start_step, tokens_seen, window = 0, 0.0, []
    existing = manager.latest_step()
    if existing is not None and lc.resume_from_checkpoint is False:
        manager.close()
        print(f"logging.resume_from_checkpoint=False: starting fresh; the old checkpoints are now in "
              f"{checkpoint.set_aside(out)} (the set there before is gone)")
        manager, existing = checkpoint.make_manager(out, lc.save_total_limit, keep=keep), None
    if existing is not None:
        manager, meta = checkpoint.restore_newest_intact(manager, model, optimizer, config, fingerprint)
        data_it.set_state(meta["data_iterator"])
        start_step, tokens_seen = int(meta["step"]), float(meta.get("num_tokens", 0.0))
        existing = start_step  # the newest intact checkpoint (a damaged newer one was set aside)
        window = meta.get("log_window", [])  # the steps since the last log: the next log covers them too
        if best is not None:
            best.restore(meta.get("best"))
        tokens_seen -= sum(m["num_tokens"] for m in window)
        print(f"resume: checkpoint {start_step} from {checkpoint.checkpoint_dir(out)}")
    trackers = trackers_lib.open_trackers(lc.report_to, lc.project, lc.run_name, dataclasses.asdict(config), out) \
        if is_main else []
    writer = progress.MetricsWriter(out, lc.report_to, resume_step=start_step, enabled=is_main, trackers=trackers)

    # ---- the plan
    first = next(data_it)
    plan, compiled = print_plan(config, model, optimizer, wrt, first, mesh, total_steps, start_step, schedule,
                                train_data)
    train_step = PlannedStep(compiled, train_data.max_length, **step.train_options(tc), schedule=schedule)
    peak = peak_tflops(override=tc.peak_tflops)
    hf_cfg = model.cfg.hf_config
    flop_counts = {}  # LoRA: MFU counts no gradient for the frozen weights (jsft.loss.flops_per_token)
    if config.lora.use_peft:
        flop_counts = dict(lora_params=sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))),
                           frozen_params=lora_frozen_params(hf_cfg, head_trains=wrt_embeddings))

    # ---- the loop
    from jsft.callbacks import Callbacks

    run_callbacks, last_eval = Callbacks(callbacks), {}
    signals.start_loop()
    multi_process = jax.process_count() > 1
    guard = DivergenceGuard(tc.max_nonfinite_steps, tc.learning_rate)
    bar = progress.progress_bar(total_steps, start_step, disable=lc.disable_tqdm or not is_main)
    throughput = progress.Throughput()
    last_metrics, saved_step, batch = {}, existing, first
    step_no, unchecked = start_step, None  # the step whose loss the guard has not read yet (one behind: no stall)
    if eval_data is not None and lc.eval_on_start and start_step == 0:
        run_callbacks.log(0, run_eval(config, model, tokenizer, eval_data, mesh, writer, 0, bar))

    def check(pending):
        if pending is not None:
            last_good = None if saved_step is None else checkpoint.checkpoint_dir(out) / str(saved_step)
            guard.check(pending[0], jax.device_get(pending[1]), last_good)

    try:
        with jax.set_mesh(mesh):
            while step_no < total_steps:
                if batch is None:
                    batch = next(data_it, None)
                    if batch is None:
                        break
                step.check_batch(batch, step_no + 1)
                _, local_tokens = step.host_token_counts(batch)
                seq = effective_seq_len(batch["segment_ids"][0])
                metrics = train_step(model, optimizer, sharding.shard_batch(batch, mesh))
                batch = None
                step_no += 1
                check(unchecked)  # the step before this one: done by now, or nearly
                unchecked = (step_no, metrics)
                window.append(metrics)
                throughput.add(local_tokens * data_count)
                bar.update(1)
                if step_no % lc.logging_steps == 0 or step_no == total_steps or (
                        lc.logging_first_step and step_no == 1):
                    check(unchecked)
                    unchecked = None
                    window = jax.device_get(window)
                    tokens_seen += sum(float(m["num_tokens"]) for m in window)
                    rate = throughput.report()
                    util = mfu(rate, flops_per_token(hf_cfg, seq, **flop_counts), jax.device_count(), peak)
                    last_metrics = _window_metrics(window, tokens_seen, step_no, epoch_steps, rate, util)
                    writer.write(step_no, last_metrics)
                    run_callbacks.log(step_no, last_metrics)
                    bar.set_postfix(progress.bar_postfix(last_metrics, rate, util))
                    window = []
                new_best = False
                if eval_data is not None and should_eval(lc, step_no, epoch_steps):
                    last_eval = run_eval(config, model, tokenizer, eval_data, mesh, writer, step_no, bar)
                    run_callbacks.log(step_no, last_eval)
                    new_best = best is not None and best.is_better(last_eval)
                    throughput = progress.Throughput()  # tokens/s counts training time only
                stop = signals.agreed_stop(step_no, multi_process)
                saving = should_save(lc, step_no, epoch_steps) or (lc.save_strategy == "best" and new_best)
                if saving or stop:
                    check(unchecked)
                    unchecked = None
                    if saving and new_best:  # transformers: the best is chosen among saved checkpoints
                        best.record(step_no, last_eval)
                    checkpoint.save(manager, step_no, model, optimizer, data_it.get_state(),
                                    _progress_state(window, tokens_seen, config, fingerprint, best))
                    saved_step = step_no
                if stop or run_callbacks.stop_requested:
                    break
            check(unchecked)
    except Diverged:
        checkpoint.wait(manager)  # the good checkpoints being written are kept
        manager.close()
        writer.close()
        raise
    finally:
        bar.close()
    if saved_step != step_no and lc.save_strategy not in ("no", "best"):  # the end of the run
        checkpoint.save(manager, step_no, model, optimizer, data_it.get_state(),
                        _progress_state(window, tokens_seen, config, fingerprint, best), force=True)
    checkpoint.wait(manager)
    manager.close()

    stopped = signals.requested is not None
    summary = {"steps": step_no, "total_steps": total_steps, "interrupted": stopped, "plan": plan,
               "last_metrics": last_metrics, "output_dir": str(out), "exports": {}, "model": model,
               "tokenizer": tokenizer, "trained_embeddings": wrt_embeddings, "stopped_by_callback":
               run_callbacks.stop_requested, "exit_status": signals.exit_status}
    if stopped:
        print(f"stopped at step {step_no} ({signal.Signals(signals.requested).name}); checkpoint saved. "
              f"{resume_hint(lc)}", flush=True)
        writer.close()
        return summary
    if eval_data is not None and not should_eval(lc, step_no, epoch_steps):
        last_eval = run_eval(config, model, tokenizer, eval_data, mesh, writer, step_no, None)
        run_callbacks.log(step_no, last_eval)
    if lc.load_best_model_at_end and best.step is not None and best.step != step_no:
        with checkpoint.make_manager(out, lc.save_total_limit, async_save=False) as reader:
            checkpoint.restore_params(reader, model, wrt, best.step, config)
        print(f"load_best_model_at_end: checkpoint {best.step} ({best.metric} {best.value:.4f}) is the model exported")
        if eval_data is not None:
            with eval_mode(model):
                last_eval = evaluate(config, model, eval_data, mesh, eval_rows(config, mesh))
    if best is not None:
        summary["best_checkpoint"] = best.state()
    if eval_data is not None:
        summary["eval"] = last_eval

    # ---- export
    from jsft.export import export

    if is_main:
        summary["exports"] = {k: str(v) for k, v in export(model, tokenizer, config, trained_embeddings=wrt_embeddings).items()}
        for fmt, path in summary["exports"].items():
            print(f"export ({fmt}): {path}")
    if lc.demo_eval:
        from jsft import demo

        with eval_mode(model):
            summary["demo"] = demo.after_training(model, tokenizer, config, summary, demo_before)
    writer.close()
    run_callbacks.train_end(summary)
    return summary


def _progress_state(window, tokens_seen, config, data_fingerprint=None, best=None) -> dict:
    """What a checkpoint keeps besides the arrays: tokens seen (logged ones plus the window's), each step's metrics
    since the last log (a resumed run logs the same means as an uninterrupted one), the config, the data's
    fingerprint (checkpoint.data_fingerprint), the best checkpoint so far (jsft.best)."""
    window = [{key: float(value) for key, value in m.items()} for m in jax.device_get(window)]
    return {"num_tokens": tokens_seen + sum(m["num_tokens"] for m in window), "log_window": window,
            "config": config.to_dict(), "data_fingerprint": data_fingerprint,
            "best": None if best is None else best.state()}


def _window_metrics(window, tokens_seen, step_no, epoch_steps, rate, util) -> dict:
    """TRL's logged values over the steps since the last log: means of loss, grad_norm, accuracy, entropy."""
    applied = [m for m in window if float(m.get("finite", 1.0))] or window  # skipped steps (jsft.guard) left out
    mean = lambda key: float(np.mean([float(m[key]) for m in applied]))  # noqa: E731
    record = {key: mean(key) for key in ("loss", "grad_norm", "mean_token_accuracy", "entropy")}
    if len(applied) < len(window):
        record["skipped_steps"] = len(window) - len(applied)
    record.update(
        learning_rate=float(window[-1]["learning_rate"]),
        num_tokens=tokens_seen,
        num_trained=float(sum(float(m["num_trained"]) for m in window)),
        epoch=step_no / max(epoch_steps, 1),
        step_losses=[float(m["loss"]) for m in window],
        tokens_per_second=rate,
    )
    if util is not None:
        record["mfu"] = util
    return record



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
    from jsft.trl_config import parse_flags

    args.trl_flags = parse_flags(rest)
    if args.config is None and not args.trl_flags:
        parser.error("give --config FILE, or TRL flags such as --model_name_or_path and --dataset_name")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = list(args.set) + (["logging.resume_from_checkpoint=true"] if args.resume else [])
    config = load(args.config, overrides, args.trl_flags)
    started = time.perf_counter()
    summary = run(config)
    if summary["interrupted"]:
        return summary  # the stop message has been printed
    print(f"done: {summary['steps']} steps in {time.perf_counter() - started:.0f} s; output in {summary['output_dir']}")
    return summary


if __name__ == "__main__":
    from jsft import cli

    # a run stopped by a signal after saving: 130 (SIGINT) or 143 (SIGTERM), so job scripts can tell (jsft.signals)
    raise SystemExit(cli.run(main)["exit_status"])
