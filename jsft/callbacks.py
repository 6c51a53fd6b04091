"""Callbacks of the Python API: they see every logged record and may stop the run.

    class StopBelow(TrainerCallback):
        def on_log(self, step, logs):
            return logs.get("loss", 1e9) < 0.5          # True: stop after this step (TRL's should_training_stop)

A stopped run ends like one that reached max_steps: final checkpoint, final eval, export. Every process calls its
callbacks with the same (global) values, so deterministic callbacks agree on when to stop.
"""

from __future__ import annotations


class TrainerCallback:
    def on_train_begin(self, config, model, tokenizer) -> None:
        """Before the first step (after a resume): the run's config, the model about to train, its tokenizer."""

    def on_log(self, step: int, logs: dict) -> bool | None:
        """A train record (loss, grad_norm, learning_rate, ...) or an eval record (eval_loss, ...)."""
        return None

    def on_train_end(self, summary: dict) -> None:
        """The run's summary (steps, last_metrics, eval, exports)."""


class Callbacks:
    """The run's callbacks as one: `log` returns whether any asked to stop."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks or [])
        self.stop_requested = False

    def log(self, step: int, logs: dict) -> bool:
        for callback in self.callbacks:
            if callback.on_log(int(step), dict(logs)):
                self.stop_requested = True
        return self.stop_requested

    def train_begin(self, config, model, tokenizer) -> None:
        for callback in self.callbacks:
            callback.on_train_begin(config, model, tokenizer)

    def train_end(self, summary: dict) -> None:
        for callback in self.callbacks:
            callback.on_train_end(summary)
