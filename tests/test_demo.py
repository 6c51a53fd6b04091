"""The demo is a caller of the trainer: `python -m jsft.demo` is `python -m jsft.train` with the DemoChecks
callback (accuracy before and after, the export reloaded by transformers, a sample conversation)."""

from pathlib import Path

from jsft import demo, fixtures
from train_configs import write_config_file


def test_the_demo_runs_the_trainer_with_its_checks_as_a_callback(tokenizer_dir, tmp_path, capsys):
    train = fixtures.write_jsonl(fixtures.make_rows("messages", 24, seed=1), tmp_path / "train.jsonl")
    test = fixtures.write_jsonl(fixtures.make_rows("messages", 12, seed=2), tmp_path / "test.jsonl")
    config_file = write_config_file(tmp_path / "demo_config.py", Path(__file__).parent, tokenizer_dir, train,
                                    tmp_path / "run", data={"dataset_test_split": str(test), "max_length": 128},
                                    training={"max_steps": 2}, logging={"save_strategy": "no",
                                                                        "num_eval_generations": 0})
    summary = demo.main(["--config", str(config_file)])
    printed = capsys.readouterr().out
    checks = summary["demo"]
    assert summary["steps"] == 2 and summary["exit_status"] == 0
    assert checks["before"]["total"] == checks["after"]["total"] > 0  # the same held-out questions, both times
    assert checks["reload_max_abs_diff"] < 1e-4 and len(checks["sample"]) == 2
    lines = [line for line in printed.splitlines() if line.startswith(("demo:", "plan:", "export", "done:"))]
    assert lines[0].startswith("demo: held-out exact match before training")  # before the plan: the model as built
    assert lines.index(next(x for x in lines if x.startswith("export"))) < lines.index(
        next(x for x in lines if x.startswith("demo: held-out exact match after training")))
    assert lines[-1].startswith("done: 2 steps") and "demo: accuracy" in lines[-2]
