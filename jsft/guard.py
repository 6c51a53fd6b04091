"""The divergence guard: reads each step's loss and gradient norm on the host and stops a run that went wrong.

train_step never applies a non-finite update (jsft.step), so params and optimizer state stay finite whatever
happens; this module decides what the run does about it:

    training.max_nonfinite_steps = 0   the first step with a NaN/inf loss or grad_norm stops the run (exit 3), with
                                       the step, the last good checkpoint and what to try; nothing is saved after it
    training.max_nonfinite_steps = N   such steps are skipped (no update) and counted; the (N+1)-th stops the run

A run whose grad_norm is exactly 0 for DEAD_STEPS steps in a row while tokens train (a dead network: saturated
activations after a far too large learning rate) gets one loud warning.
"""

from __future__ import annotations

import math
import warnings

import jax

DEAD_STEPS = 5
EXIT_STATUS = 3  # a diverged run: neither success (0) nor a user's config mistake (2)


class Diverged(Exception):
    """The run stopped on a non-finite loss or gradient norm; the message says where and what to try."""

    exit_status = EXIT_STATUS


class DivergenceGuard:
    def __init__(self, max_nonfinite_steps: int, learning_rate: float):
        self.max_nonfinite_steps = max_nonfinite_steps
        self.learning_rate = learning_rate
        self.skipped: list[int] = []  # steps whose update was not applied
        self.zero_grad_steps = 0
        self.warned_dead = False
        self.pending: tuple[int, dict] | None = None  # a step whose metrics are not read yet (check_later)

    def check_later(self, step_no: int, metrics: dict, last_checkpoint) -> None:
        """Keep this step's metrics (device arrays) for the next check and check the step kept before: a step's
        loss is read while the next step runs, so reading it does not stall the device."""
        self.check_pending(last_checkpoint)
        self.pending = (step_no, metrics)

    def check_pending(self, last_checkpoint) -> None:
        """Check the kept step now (before a log, a save, the end of the loop)."""
        if self.pending is not None:
            step_no, metrics = self.pending
            self.check(step_no, jax.device_get(metrics), last_checkpoint)
            self.pending = None

    def check(self, step_no: int, metrics: dict, last_checkpoint) -> None:
        """metrics: one step's host values (loss, grad_norm, num_trained, finite). Raises Diverged to stop."""
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not float(metrics.get("finite", 1.0)) or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.skipped.append(step_no)
            if len(self.skipped) > self.max_nonfinite_steps:
                raise Diverged(self._message(step_no, loss, grad_norm, last_checkpoint))
            warnings.warn(f"step {step_no}: loss {loss} and grad_norm {grad_norm} are not finite: the step is skipped "
                          f"(no update); {len(self.skipped)} of training.max_nonfinite_steps="
                          f"{self.max_nonfinite_steps} skipped so far", UserWarning, stacklevel=2)
            return
        self._check_dead(step_no, loss, grad_norm, float(metrics["num_trained"]))

    def _message(self, step_no, loss, grad_norm, last_checkpoint) -> str:
        where = (f"the last good checkpoint is {last_checkpoint} (the same command resumes from it)"
                 if last_checkpoint is not None else "no checkpoint was saved before it")
        skipped = (f" after skipping steps {self.skipped[:-1]} (training.max_nonfinite_steps="
                   f"{self.max_nonfinite_steps})" if self.max_nonfinite_steps else "")
        return (f"step {step_no}: the loss is {loss} and the gradient norm {grad_norm}: the run diverged{skipped}. "
                f"It stops without saving or exporting anything from this point; {where}. Try: a lower "
                f"training.learning_rate (now {self.learning_rate:g}), warmup (training.warmup_steps), "
                f"training.max_grad_norm, or look at the data rows of step {step_no}; "
                "training.max_nonfinite_steps=N skips up to N such steps instead of stopping")

    def _check_dead(self, step_no, loss, grad_norm, num_trained) -> None:
        self.zero_grad_steps = self.zero_grad_steps + 1 if grad_norm == 0.0 and num_trained > 0 else 0
        if self.zero_grad_steps >= DEAD_STEPS and not self.warned_dead:
            self.warned_dead = True
            warnings.warn(
                f"DEAD RUN: steps {step_no - DEAD_STEPS + 1}-{step_no} have a gradient norm of exactly 0 with "
                f"{num_trained:.0f} trained tokens a step (loss stuck at {loss:.4f}): the network no longer learns, "
                f"typically saturated by a far too large learning rate (training.learning_rate="
                f"{self.learning_rate:g}). Stop it and start again with a lower learning rate", UserWarning,
                stacklevel=2)
