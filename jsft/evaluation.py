"""Evaluation: the eval loss and accuracy over the whole eval split, sample replies to eval conversations, and
the eval a run logs (both printed and written to the metrics).

    with eval_mode(model):
        metrics = evaluate(config, model, eval_data, mesh, eval_rows(config, mesh))   # eval_loss, ...
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np

from jsft import sharding, step
from jsft.build import build_model, build_tokenizer
from jsft.config import SFTConfig
from jsft.data.formats import BadRowError, check_messages
from jsft.data.pipeline import prepare_dataset, read_rows
from jsft.generate import chat_prompt_ids, chat_replies
from jsft.loss import normalize


@contextlib.contextmanager
def eval_mode(model):
    """Dropout (LoRA's) off inside, back on after: for eval loss, generations and the demo's accuracy."""
    model.eval()
    try:
        yield model
    finally:
        model.train()


def evaluate(config, model, eval_data, mesh, rows_per_micro_batch: int) -> dict:
    """eval_loss, eval_mean_token_accuracy, eval_entropy over every row of the eval split (exact: the last batch
    is filled with empty rows, which have no trained token)."""
    index, count = sharding.data_process_split(mesh)
    global_rows = rows_per_micro_batch * count
    totals = None
    with jax.set_mesh(mesh):
        for start in range(0, eval_data.num_rows, global_rows):
            mine = np.arange(start + index * rows_per_micro_batch, start + (index + 1) * rows_per_micro_batch)
            length = eval_data.step_length(np.arange(start, min(start + global_rows, eval_data.num_rows)))
            batch = _padded_rows(eval_data, mine[mine < eval_data.num_rows], rows_per_micro_batch, length)
            sums = step.eval_step(model, sharding.shard_batch(batch, mesh), loss_type=config.training.loss_type,
                                  chunk_size=config.training.loss_chunk_size,
                                  label_smoothing=config.training.label_smoothing_factor)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    means = normalize(totals, totals["num_trained"])
    return {f"eval_{k}": float(v) for k, v in means.items()}


def _padded_rows(prepared, row_ids, num_rows: int, length: int) -> dict:
    """prepared.batch(row_ids, length) plus empty rows (padding, segment 0, nothing trained) up to num_rows:
    [1, num_rows, length]."""
    batch = prepared.batch(row_ids, length) if len(row_ids) else None
    L = length
    empty = {"input_ids": np.full((num_rows, L), prepared.pad_id, np.int32),
             "segment_ids": np.zeros((num_rows, L), np.int32),
             "positions": np.zeros((num_rows, L), np.int32), "targets": np.full((num_rows, L), prepared.pad_id, np.int32),
             "loss_mask": np.zeros((num_rows, L), bool)}
    if batch is not None:
        for k in empty:
            empty[k][: len(row_ids)] = batch[k]
    return {k: v[None] for k, v in empty.items()}


def _conversation(row: dict, index: int) -> list[dict] | None:
    """The chat of an eval row: `messages`, ShareGPT `conversations`, or conversational prompt + completion."""
    for field in ("messages", "conversations"):
        if isinstance(row.get(field), list):
            return check_messages(row[field], index, field)
    if isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
        return check_messages(row["prompt"] + row["completion"], index, "prompt")
    return None


def eval_generations(config, model, tokenizer, n: int) -> list[dict]:
    """Greedy replies to the first n eval conversations (chat data only), cut before their last assistant turn."""
    if n <= 0 or config.data.dataset_test_split is None:
        return []
    rows = read_rows(config, "eval")[0]
    conversations, references = [], []
    for index, row in enumerate(rows.select(range(min(len(rows), 4 * n)))):
        try:
            messages = _conversation(row, index)
        except BadRowError:  # a row preparation already refused (or skipped): no sample from it
            continue
        if messages is None:  # not chat data: eval loss only
            return []
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            continue
        prompt = messages[:last]
        if len(chat_prompt_ids(tokenizer, prompt)) > (config.data.max_length or 512):
            continue
        conversations.append(prompt)
        references.append(messages[last]["content"])
        if len(conversations) == n:
            break
    replies = chat_replies(model, tokenizer, conversations, max_new_tokens=64)
    return [{"prompt": c[-1]["content"], "reply": r, "reference": ref}
            for c, r, ref in zip(conversations, replies, references)]


def evaluate_only(config: SFTConfig) -> dict:
    """The eval metrics of the configured model as it is (no training): the Python API's evaluate() before
    train()."""
    sharding.initialize_distributed(config.sharding)
    mesh = sharding.create_mesh(config.sharding)
    tokenizer, _ = build_tokenizer(config)
    eval_data = prepare_dataset(config, tokenizer, "eval")
    model, _ = build_model(config, tokenizer, mesh)
    model.set_max_segments(eval_data.stats["max_documents_per_row"])
    with eval_mode(model):
        return evaluate(config, model, eval_data, mesh, eval_rows(config, mesh))


def eval_rows(config, mesh) -> int:
    """This process's eval rows per batch."""
    rows = config.training.per_device_eval_batch_size * math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    return rows // sharding.data_process_split(mesh)[1]


def run_eval(config, model, tokenizer, eval_data, mesh, writer, step_no, bar) -> dict:
    """The eval a run logs at step_no: the metrics and num_eval_generations sample replies, printed (above the
    progress bar, when there is one) and written; returns the metrics."""
    with eval_mode(model):
        result = evaluate(config, model, eval_data, mesh, eval_rows(config, mesh))
        samples = eval_generations(config, model, tokenizer, config.logging.num_eval_generations)
    say = bar.write if bar is not None else print
    say(f"eval @ {step_no}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    for s in samples:
        say(f"  user: {s['prompt'][-80:]!r}\n  model: {s['reply']!r}  (reference {s['reference']!r})")
    writer.write(step_no, {**result, **({"eval_generations": samples} if samples else {})})
    return result
