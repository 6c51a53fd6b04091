"""The demo, a caller of the trainer: `python -m jsft.demo --config configs/demo.py [--set ...]` (what
scripts/demo.sh runs) is `python -m jsft.train` with DemoChecks among the run's callbacks: the held-out exact match
before and after training, the export reloaded by transformers, a sample conversation.

Exact match: for each held-out conversation, the first user question (with its system message, if any) is
answered greedily; it counts when the reply equals the reference answer (the rule's answer: `spell: 4 0` ->
`four zero`). Prompts longer than 40 tokens (long "notes:" preambles) are left out, and the count says so.
"""

from __future__ import annotations

import numpy as np

from jsft import cli, train
from jsft.callbacks import TrainerCallback
from jsft.data.sources import load_rows
from jsft.evaluation import eval_mode
from jsft.generate import chat_prompt_ids, chat_replies

MAX_PROMPT_TOKENS = 40


def _first_questions(config, tokenizer, limit: int = 200):
    prompts, answers = [], []
    for row in load_rows(config.data, "eval"):
        messages = row["messages"]
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = messages[:first]
        if len(chat_prompt_ids(tokenizer, prompt)) > MAX_PROMPT_TOKENS:
            continue
        prompts.append(prompt)
        answers.append(messages[first]["content"])
        if len(prompts) == limit:
            break
    return prompts, answers


def accuracy(model, tokenizer, config, label: str) -> dict:
    prompts, answers = _first_questions(config, tokenizer)
    replies = chat_replies(model, tokenizer, prompts, max_new_tokens=24, batch_size=len(prompts))
    hits = sum(r == a for r, a in zip(replies, answers))
    result = {"correct": hits, "total": len(prompts), "accuracy": hits / max(len(prompts), 1)}
    print(f"demo: held-out exact match {label}: {hits}/{len(prompts)} = {result['accuracy']:.1%}")
    return result


def reload_check(model, export_dir) -> float | None:
    """Max |logit difference| between jsft and transformers loading the export (None without transformers/torch)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("demo: transformers/torch not installed, skipping the reload check")
        return None
    ids = np.array([[5, 17, 42, 99, 7, 3, 250, 11]], np.int32)
    ours = np.asarray(model(ids, np.arange(8, dtype=np.int32)[None], np.ones_like(ids)))
    hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    diff = float(np.max(np.abs(ours - theirs)))
    print(f"demo: transformers reloads {export_dir}: max |logit difference| vs jsft = {diff:.2e}")
    return diff


def after_training(model, tokenizer, config, summary: dict, before: dict | None) -> dict:
    after = accuracy(model, tokenizer, config, label="after training")
    result = {"before": before, "after": after}
    export_dir = summary["exports"].get("full") or summary["exports"].get("merged")
    if export_dir:
        result["reload_max_abs_diff"] = reload_check(model, export_dir)
    conversation = [{"role": "user", "content": "spell: 3 1 4 1 5"}]
    reply = chat_replies(model, tokenizer, [conversation], max_new_tokens=24)[0]
    conversation2 = conversation + [{"role": "assistant", "content": reply},
                                    {"role": "user", "content": "digits: nine two six"}]
    reply2 = chat_replies(model, tokenizer, [conversation2], max_new_tokens=24)[0]
    print("demo: a sample conversation")
    for role, text in (("user", conversation[0]["content"]), ("assistant", reply),
                       ("user", conversation2[-1]["content"]), ("assistant", reply2)):
        print(f"  {role:>9}: {text}")
    result["sample"] = [reply, reply2]
    if before is not None:
        print(f"demo: accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%}")
    return result


class DemoChecks(TrainerCallback):
    """The demo's checks as a callback: the accuracy before the first step, and after the run's export the accuracy,
    the reload check and a sample conversation (`result`)."""

    def __init__(self):
        self.config, self.before, self.result = None, None, None

    def on_train_begin(self, config, model, tokenizer) -> None:
        self.config = config
        with eval_mode(model):
            self.before = accuracy(model, tokenizer, config, label="before training")

    def on_train_end(self, summary: dict) -> None:
        with eval_mode(summary["model"]):
            self.result = after_training(summary["model"], summary["tokenizer"], self.config, summary, self.before)


def main(argv=None) -> dict:
    """`python -m jsft.train`'s command line, with the demo's checks; the summary gets them as "demo"."""
    checks = DemoChecks()
    summary = train.main(argv, callbacks=[checks])
    summary["demo"] = checks.result
    return summary


if __name__ == "__main__":
    raise SystemExit(cli.run(main)["exit_status"])  # exit statuses as python -m jsft.train's
