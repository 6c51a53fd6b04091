"""Experiment trackers for `report_to`: Weights & Biases, Trackio and MLflow, as transformers' callbacks use them.

    trackers = open_trackers(["wandb", "mlflow"], logging_config, config_dict)   # on the main process only
    for t in trackers: t.log(step, {"loss": 2.3, ...}); ... ; t.close()

Each library is an optional extra (`pip install jsft[wandb]`, `jsft[trackio]`, `jsft[mlflow]`) imported only when
named. Their own environment variables work as with transformers: WANDB_PROJECT / WANDB_MODE=offline,
MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME, TRACKIO_DIR. Only finite numbers are logged (not the eval samples).
"""

from __future__ import annotations

import importlib.util
import math
import os

TRACKERS = {"wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}  # report_to name -> module


def installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name]) is not None


def numbers(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat(config: dict, prefix: str = "") -> dict:
    """{"training": {"learning_rate": 1e-4}} -> {"training.learning_rate": 1e-4} (MLflow's params are flat)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Wandb:
    def __init__(self, project: str, run_name: str | None, config: dict, output_dir: str):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=run_name, config=config,
                              dir=output_dir)

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(numbers(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, project: str, run_name: str | None, config: dict, output_dir: str):
        import trackio

        self.trackio = trackio
        trackio.init(project=project, name=run_name, config=config, embed=False)

    def log(self, step: int, metrics: dict) -> None:
        self.trackio.log(numbers(metrics), step=step)

    def close(self) -> None:
        self.trackio.finish()


class Mlflow:
    MAX_PARAM_CHARS = 6000  # MLflow refuses longer param values

    def __init__(self, project: str, run_name: str | None, config: dict, output_dir: str):
        import mlflow

        self.mlflow = mlflow
        if "MLFLOW_EXPERIMENT_NAME" in os.environ:
            mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[: self.MAX_PARAM_CHARS] for k, v in flat(config).items()})

    def log(self, step: int, metrics: dict) -> None:
        self.mlflow.log_metrics(numbers(metrics), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


KINDS = {"wandb": Wandb, "trackio": Trackio, "mlflow": Mlflow}


def open_trackers(report_to, project: str, run_name: str | None, config: dict, output_dir: str) -> list:
    return [KINDS[name](project, run_name, config, str(output_dir)) for name in report_to if name in KINDS]
