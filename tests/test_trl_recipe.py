"""What a TRL user runs, unchanged: a typical recipe YAML, the `jsft` command on PATH, the Python API."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from jsft import SFTTrainer, TrainerCallback, fixtures, progress

ROOT = Path(__file__).resolve().parent.parent

RECIPE = """\
model_name_or_path: {model}
dataset_name: {train}
dataset_test_split: {test}
output_dir: {out}
use_cpu: true
bf16: false
max_length: 64
packing: false
per_device_train_batch_size: 1
num_train_epochs: 2
learning_rate: 1.0e-3
optim: adafactor
neftune_noise_alpha: 5
eval_strategy: epoch
save_strategy: epoch
load_best_model_at_end: true
metric_for_best_model: loss
report_to: wandb
run_name: recipe
logging_steps: 1
use_peft: true
lora_r: 4
lora_alpha: 8
lora_target_modules: all-linear
"""


def _env(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _jsft_command():
    """The console script `pip install -e .` puts beside the interpreter (scripts/setup.sh does that install)."""
    command = shutil.which("jsft", path=str(Path(sys.executable).parent))
    assert command is not None, f"no `jsft` script in {Path(sys.executable).parent}: run `pip install -e .`"
    return command


def test_a_trl_recipe_yaml_runs_unchanged_through_the_jsft_command(checkpoint_dir, tokenizer_dir, tmp_path):
    """report_to wandb (offline), eval each epoch, the best model at the end, Adafactor, NEFTune, LoRA."""
    model = tmp_path / "model"  # an HF model directory as the hub gives it: weights, config and tokenizer
    shutil.copytree(checkpoint_dir, model)
    shutil.copytree(tokenizer_dir, model, dirs_exist_ok=True)
    train = fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 16, seed=1), tmp_path / "train.jsonl")
    test = fixtures.write_jsonl(fixtures.make_rows("prompt_completion", 8, seed=2), tmp_path / "test.jsonl")
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(RECIPE.format(model=model, train=train, test=test, out=tmp_path / "out"))
    done = subprocess.run([_jsft_command(), "train", "--config", str(recipe)], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = progress.read_metrics(tmp_path / "out")
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) == 2  # one an epoch
    best = min(evals, key=lambda r: r["eval_loss"])["step"]
    assert ("load_best_model_at_end: checkpoint" in done.stdout) == (best != evals[-1]["step"])
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))


def test_jsft_train_the_demo_for_20_steps(tmp_path):
    done = subprocess.run([_jsft_command(), "train", "--config", str(ROOT / "configs" / "demo.py"), "--max_steps",
                           "20", "--output_dir", str(tmp_path / "demo")], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: 20 steps" in done.stdout


class StopAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_log(self, step, logs):
        return "loss" in logs and step >= self.step


def test_the_python_api_trains_from_an_in_memory_dataset_with_a_formatting_func_and_a_stopping_callback(
        tokenizer, checkpoint_dir, tmp_path):
    from jsft import SFTConfig

    rows = fixtures.make_rows("prompt_completion", 16, seed=3)
    dataset = datasets.Dataset.from_list([{"question": r["prompt"], "answer": r["completion"]} for r in rows])
    args = {"output_dir": str(tmp_path / "api"), "max_steps": 10, "learning_rate": 1e-2, "use_cpu": True,
            "bf16": False, "per_device_train_batch_size": 1, "logging_steps": 1, "save_strategy": "no",
            "max_length": 64, "report_to": "none"}
    trainer = SFTTrainer(model=str(checkpoint_dir), args=args, train_dataset=dataset, processing_class=tokenizer,
                         formatting_func=lambda row: f"Q: {row['question']}\nA: {row['answer']}",
                         callbacks=[StopAtStep(3)])
    assert isinstance(trainer.args, SFTConfig)
    output = trainer.train()
    assert output.global_step == 3 and trainer.summary["stopped_by_callback"]
    written = [json.loads(line) for line in (tmp_path / "api" / "inputs" / "train.jsonl").read_text().splitlines()]
    assert written[0] == {"text": f"Q: {rows[0]['prompt']}\nA: {rows[0]['completion']}"}
