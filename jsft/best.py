"""The best checkpoint by an eval metric: load_best_model_at_end, save_strategy="best" (transformers' rules).

    best = BestCheckpoint.from_config(config.logging)      # None when neither setting asks for it
    if best.is_better(eval_metrics): ...                    # a new best at this step
    best.record(step, eval_metrics)                          # once its checkpoint is saved (kept from rotation)

The metric is metric_for_best_model with "eval_" in front unless it has it ("loss" -> "eval_loss"); greater_is_better
defaults to False for a loss, True otherwise.
"""

from __future__ import annotations

from jsft.checkpoint import KeepStep
from jsft.config import ConfigError


class BestCheckpoint:
    def __init__(self, metric: str, greater_is_better: bool):
        self.metric, self.greater = metric, greater_is_better
        self.value: float | None = None
        self.keep = KeepStep()  # the step Orbax's rotation must keep

    @classmethod
    def from_config(cls, logging) -> BestCheckpoint | None:
        if not (logging.load_best_model_at_end or logging.save_strategy == "best"):
            return None
        name = logging.metric_for_best_model or "loss"
        metric = name if name.startswith("eval_") else f"eval_{name}"
        greater = logging.greater_is_better
        if greater is None:
            greater = not metric.endswith("loss")
        return cls(metric, greater)

    @property
    def step(self) -> int | None:
        return self.keep.step

    def is_better(self, metrics: dict) -> bool:
        if self.metric not in metrics:
            raise ConfigError(f"logging.metric_for_best_model: {self.metric!r} is not an eval metric; the eval logs "
                              f"{', '.join(sorted(k for k in metrics if k.startswith('eval_')))}")
        value = float(metrics[self.metric])
        return self.value is None or (value > self.value if self.greater else value < self.value)

    def record(self, step: int, metrics: dict) -> None:
        self.keep.step, self.value = int(step), float(metrics[self.metric])

    def state(self) -> dict:
        return {"step": self.step, "value": self.value}

    def restore(self, state: dict | None) -> None:
        if state and state.get("step") is not None:
            self.keep.step, self.value = int(state["step"]), float(state["value"])
