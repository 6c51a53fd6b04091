"""What a run shows and records: the progress bar and the metrics files.

    <output_dir>/metrics.jsonl   one JSON object per logged step: {"step": 10, "loss": 2.31, ...} (TRL's names)
    <output_dir>/tensorboard/    TensorBoard event files (tensorboardX: the event format without TensorFlow);
                                 `tensorboard --logdir <output_dir>/tensorboard` shows them

On resume, metrics.jsonl keeps the lines up to the restored step and drops later ones (written by the interrupted
run after its last checkpoint), so the file reads as one uninterrupted run. A half-written last line (a run killed
while writing it) is cut off with a warning.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


class MetricsWriter:
    def __init__(self, output_dir, report_to=("jsonl", "tensorboard"), resume_step: int | None = None,
                 enabled: bool = True, trackers: list | None = None):
        """trackers: open jsft.trackers (wandb, trackio, mlflow) that get every record too."""
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tensorboard = None
        self.trackers = list(trackers or [])
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [line for line, record in _records(self.path) if record.get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.jsonl = "jsonl" in report_to
        if "tensorboard" in report_to:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if self.jsonl:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        for tracker in self.trackers:
            tracker.log(int(step), record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        for tracker in self.trackers:
            tracker.close()


def _plain(value):
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each readable line of metrics.jsonl. A line that is not a JSON object (the last one half
    written by a run killed mid-write, or a damaged one) is left out with a warning naming it: a resume keeps going."""
    kept, lines = [], path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            what = "its last line is incomplete (a run stopped while writing it)" if number == len(lines) else \
                f"line {number} is not a JSON record"
            warnings.warn(f"{path}: {what}: cut off ({line[:80]!r})", UserWarning, stacklevel=3)
            continue
        kept.append((line, record))
    return kept


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Throughput:
    """Tokens per second (and MFU) over the window since the last report."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        """Count from now (after an eval: tokens/s counts training time only)."""
        self.start, self.tokens = time.perf_counter(), 0.0

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def report(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0.0
        return rate


def progress_bar(total_steps: int, initial: int, disable: bool = False):
    """A tqdm bar over optimizer steps; tqdm shows the ETA, the train loop sets loss, tokens/s and MFU."""
    return tqdm(total=total_steps, initial=initial, desc="train", unit="step", disable=disable, dynamic_ncols=True)


def bar_postfix(metrics: dict, tokens_per_second: float, mfu: float | None) -> dict:
    postfix = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{tokens_per_second:,.0f}"}
    if mfu is not None:  # None on CPU: hidden
        postfix["mfu"] = f"{mfu:.1%}"
    return postfix


def window_metrics(window, tokens_seen, step_no, epoch_steps, rate, util) -> dict:
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
