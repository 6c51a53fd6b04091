"""Orbax checkpoints of a run: what it takes to continue exactly where it stopped.

A checkpoint `<output_dir>/checkpoints/<step>/` holds two items:

    state  (Orbax PyTree, sharded arrays)  params: the TRAINABLE params only (all params in full fine-tuning; the
                                            LoRA params + new token rows with LoRA: the frozen base is rebuilt from
                                            model.model_name_or_path), rngs: the model's RNG streams (dropout),
                                            optimizer: step count + Optax state
    data   (JSON)                          step, the Grain iterator state, tokens seen, the config that made it

Saving is asynchronous (training continues while the arrays are written); Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint intact.
`save_total_limit` old checkpoints are kept. Restoring reads into the shapes, dtypes and shardings of the live
model and optimizer, so a checkpoint saved on one mesh restores onto another.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx


def checkpoint_dir(output_dir) -> Path:
    return Path(output_dir).absolute() / "checkpoints"


def make_manager(output_dir, save_total_limit: int | None = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=save_total_limit, enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(checkpoint_dir(output_dir), options=options)


def latest_step(output_dir) -> int | None:
    """The newest complete checkpoint's step under output_dir, or None."""
    if not checkpoint_dir(output_dir).exists():
        return None
    with ocp.CheckpointManager(checkpoint_dir(output_dir)) as manager:
        return manager.latest_step()


def remove_all(output_dir) -> None:
    """Delete every checkpoint of output_dir (a fresh start with logging.resume_from_checkpoint=False)."""
    import shutil

    if jax.process_index() == 0:
        shutil.rmtree(checkpoint_dir(output_dir), ignore_errors=True)


def _train_state(model, optimizer) -> dict:
    return {
        "params": nnx.state(model, optimizer.wrt).to_pure_dict(),
        "rngs": nnx.state(model, nnx.RngState).to_pure_dict(),
        "optimizer": nnx.state(optimizer).to_pure_dict(),
    }


def _iterator_state_to_json(state):
    if isinstance(state, bytes):
        return {"bytes": state.decode()}
    return state


def _iterator_state_from_json(state):
    if isinstance(state, dict) and set(state) == {"bytes"}:
        return state["bytes"].encode()
    return state


def save(manager: ocp.CheckpointManager, step: int, model, optimizer, data_state, extra: dict | None = None,
         force: bool = False) -> bool:
    """Start an asynchronous save of `step` (returns at once; call `manager.wait_until_finished()` before exit).
    data_state: the Grain iterator's get_state(). extra: small JSON-able facts (tokens seen, config)."""
    meta = {"step": int(step), "data_iterator": _iterator_state_to_json(data_state), **(extra or {})}
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(_train_state(model, optimizer)), data=ocp.args.JsonSave(meta))
    return manager.save(int(step), args=args, force=force)


def _abstract(tree):
    """Shape, dtype and sharding of each live array: the restore target (so another mesh works)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _restore_args(live, partial: bool = False):
    abstract = _abstract(live)
    return ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                  partial_restore=partial)


def restore(manager: ocp.CheckpointManager, model, optimizer, step: int | None = None) -> dict:
    """Load checkpoint `step` (default: the latest) into model and optimizer in place; returns its JSON item with
    "data_iterator" ready for the iterator's set_state()."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {manager.directory}")
    live = _train_state(model, optimizer)
    restored = manager.restore(step, args=ocp.args.Composite(state=_restore_args(live), data=ocp.args.JsonRestore()))
    state = restored["state"]
    for target, key in ((model, "params"), (model, "rngs"), (optimizer, "optimizer")):
        flt = (optimizer.wrt if key == "params" else nnx.RngState) if target is model else ...
        current = nnx.state(target, flt)
        nnx.replace_by_pure_dict(current, state[key])
        nnx.update(target, current)
    meta = dict(restored["data"])
    meta["data_iterator"] = _iterator_state_from_json(meta.get("data_iterator"))
    return meta


def read_meta(output_dir, step: int) -> dict:
    """The JSON item of a checkpoint without touching the arrays (e.g. its config, for jsft.export)."""
    return json.loads((checkpoint_dir(output_dir) / str(step) / "data" / "metadata").read_text())


def restore_params(manager: ocp.CheckpointManager, model, wrt, step: int | None = None) -> int:
    """Only the trained params of a checkpoint into `model` (no optimizer needed: for export). Returns the step."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {manager.directory}")
    live = {"params": nnx.state(model, wrt).to_pure_dict()}
    restored = manager.restore(step, args=ocp.args.Composite(state=_restore_args(live, partial=True)))
    current = nnx.state(model, wrt)
    nnx.replace_by_pure_dict(current, restored["state"]["params"])
    nnx.update(model, current)
    return step
