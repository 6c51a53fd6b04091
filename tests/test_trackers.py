"""report_to wandb / trackio / mlflow: a real run logs its loss to each, offline or to local files."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jsft import fixtures, progress
from train_configs import write_config_file

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def tracked_run(tokenizer_dir, tmp_path_factory):
    """One 3-step run reporting to all three trackers, in its own process (each library keeps global state)."""
    root = tmp_path_factory.mktemp("tracked")
    data = fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 8, seed=5), root / "pc.jsonl")
    config = write_config_file(root / "c.py", TESTS, tokenizer_dir, data, root / "run",
                               data={"packing": False, "padding_free": False},
                               training={"max_steps": 3},
                               logging={"save_strategy": "no", "report_to": ["jsonl", "wandb", "trackio", "mlflow"],
                                        "run_name": "tiny-run", "project": "jsft-tests"})
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", TRACKIO_DIR=str(root / "trackio"),
               MLFLOW_TRACKING_URI=f"file://{root / 'mlruns'}", MLFLOW_ALLOW_FILE_STORE="true",
               XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(TESTS.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "jsft.train", "--config", str(config)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [r["loss"] for r in progress.read_metrics(root / "run") if "loss" in r]
    assert len(losses) == 3
    return root, losses


def test_mlflow_gets_the_losses_and_the_config(tracked_run):
    from mlflow.tracking import MlflowClient

    root, losses = tracked_run
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=f"file://{root / 'mlruns'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.run_name for r in runs] == ["tiny-run"]
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(losses)
    assert runs[0].data.params["training.max_steps"] == "3"


def test_trackio_gets_the_losses(tracked_run, monkeypatch):
    root, losses = tracked_run
    monkeypatch.setenv("TRACKIO_DIR", str(root / "trackio"))
    code = ("from trackio.sqlite_storage import SQLiteStorage; "
            "print([(l['step'], l['loss']) for l in SQLiteStorage.get_logs('jsft-tests', 'tiny-run')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         timeout=120)
    logged = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 (our own child's repr of a list)
    assert [s for s, _ in logged] == [1, 2, 3] and [v for _, v in logged] == pytest.approx(losses)


def test_wandb_writes_an_offline_run_under_output_dir(tracked_run):
    root, _ = tracked_run
    files = glob.glob(str(root / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1 and os.path.getsize(files[0]) > 0


def test_trackers_get_finite_numbers_only():
    """What every tracker is handed: finite numbers (eval samples, NaN and bools are left out)."""
    from jsft.trackers import flat, numbers

    assert numbers({"loss": 2.5, "grad_norm": float("nan"), "eval_generations": [{"reply": "x"}], "epoch": 1,
                    "interrupted": True}) == {"loss": 2.5, "epoch": 1.0}
    assert flat({"training": {"learning_rate": 1e-4, "optim_args": {}}, "seed": 3}) == {
        "training.learning_rate": 1e-4, "training.optim_args": {}, "seed": 3}


def test_report_to_all_none_and_missing_libraries(monkeypatch):
    from jsft import trackers
    from jsft.config import ConfigError, SFTConfig
    from jsft.validate import validate

    config = SFTConfig()
    config.model.model_name_or_path, config.data.dataset_name = "ckpt", "d.jsonl"
    config.logging.report_to = ["all"]
    assert validate(config).logging.report_to == ["jsonl", "tensorboard", "wandb", "trackio", "mlflow"]
    config.logging.report_to = ["none"]
    assert validate(config).logging.report_to == []
    monkeypatch.setattr(trackers, "installed", lambda name: name != "mlflow")
    config.logging.report_to = ["jsonl", "mlflow"]
    with pytest.raises(ConfigError, match=r"mlflow is not installed: pip install 'jsft\[mlflow\]'"):
        validate(config)
