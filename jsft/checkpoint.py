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
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from jsft.hf import CheckpointError

# The settings whose change gives other parameter shapes or names (the model, its vocabulary, LoRA); compared with
# the checkpoint's when a restore finds other shapes. Settings of these sections that never change a shape are left out.
SHAPE_SECTIONS = ("model", "lora", "data.chat_template_path")
NO_SHAPE = ("model.dtype", "model.compute_dtype", "model.attention_impl", "model.remat_policy", "lora.lora_alpha",
            "lora.lora_dropout", "model.load_in_4bit", "model.load_in_8bit", "model.bnb_4bit_quant_type",
            "model.use_bnb_nested_quant", "model.bnb_4bit_quant_storage")  # QLoRA: the base is not in checkpoints
# The settings that decide which rows each step reads: a resume with others continues from a saved data position that
# counts steps of another plan (a warning names them).
DATA_PLAN_SECTIONS = ("data", "training.per_device_train_batch_size", "training.gradient_accumulation_steps",
                      "training.seed")
NOT_DATA_PLAN = ("data.dataset_num_proc", "data.cache_dir")


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


def steps(output_dir) -> list[int]:
    """The steps of the complete checkpoints under output_dir, oldest first ([] when there are none)."""
    if not checkpoint_dir(output_dir).exists():
        return []
    with ocp.CheckpointManager(checkpoint_dir(output_dir)) as manager:
        return sorted(manager.all_steps())


def check_step(directory, step: int | None, available: list[int]) -> int:
    """`step` (None: the latest) when the checkpoint exists; else a CheckpointError naming the steps there are."""
    if not available:
        raise CheckpointError(f"no checkpoint under {directory}: train first (a run saves every logging.save_steps), "
                              "or set logging.output_dir to the output directory of the run that saved them")
    if step is None:
        return max(available)
    if step not in available:
        raise CheckpointError(f"{directory} has no checkpoint for step {step}; its steps are "
                              f"{', '.join(map(str, available))}: choose one of them (or none, for the latest)")
    return step


def set_aside(output_dir) -> Path:
    """Move a run's checkpoints to checkpoints.previous (replacing an older set there), for a fresh start with
    logging.resume_from_checkpoint=False (a TRL config's default): the last run's checkpoints are not deleted up
    front, so a rerun that crashes at once, or was started by mistake, still leaves them."""
    import shutil

    current = checkpoint_dir(output_dir)
    previous = current.with_name("checkpoints.previous")
    if jax.process_index() == 0:
        shutil.rmtree(previous, ignore_errors=True)
        current.rename(previous)
    return previous


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


def restore(manager: ocp.CheckpointManager, model, optimizer, step: int | None = None, config=None) -> dict:
    """Load checkpoint `step` (default: the latest) into model and optimizer in place; returns its JSON item with
    "data_iterator" ready for the iterator's set_state(). config (an SFTConfig or its to_dict(); default: the
    config.json that jsft.train writes to output_dir before resuming) names the changed settings when the checkpoint
    holds other parameter shapes than this model (see check_shapes)."""
    step = check_step(manager.directory, step, sorted(manager.all_steps()))
    live = _train_state(model, optimizer)
    check_shapes(manager.directory, step, live, config)
    restored = manager.restore(step, args=ocp.args.Composite(state=_restore_args(live), data=ocp.args.JsonRestore()))
    state = restored["state"]
    for target, key in ((model, "params"), (model, "rngs"), (optimizer, "optimizer")):
        flt = (optimizer.wrt if key == "params" else nnx.RngState) if target is model else ...
        current = nnx.state(target, flt)
        nnx.replace_by_pure_dict(current, state[key])
        nnx.update(target, current)
    meta = dict(restored["data"])
    meta["data_iterator"] = _iterator_state_from_json(meta.get("data_iterator"))
    changed = _setting_differences(manager.directory, step, config, DATA_PLAN_SECTIONS, NOT_DATA_PLAN)
    if changed:
        warnings.warn(
            f"resuming checkpoint {step} with other data settings than the run that wrote it: "
            + ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in changed)
            + ". The saved data position counts steps of the old plan, so from here this run trains other rows than "
            "the interrupted run would have (start fresh in another output_dir to train the new plan from step 0)",
            UserWarning, stacklevel=2)
    return meta


def read_meta(output_dir, step: int) -> dict:
    """The JSON item of a checkpoint without touching the arrays (e.g. its config, for jsft.export)."""
    return _read_meta_in(checkpoint_dir(output_dir), step)


def _read_meta_in(directory, step: int) -> dict:
    return json.loads((Path(directory) / str(step) / "data" / "metadata").read_text())


def restore_params(manager: ocp.CheckpointManager, model, wrt, step: int | None = None, config=None) -> int:
    """Only the trained params of a checkpoint into `model` (no optimizer needed: for export). Returns the step.
    config: as for `restore`."""
    step = check_step(manager.directory, step, sorted(manager.all_steps()))
    live = {"params": nnx.state(model, wrt).to_pure_dict()}
    check_shapes(manager.directory, step, live, config, partial=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=_restore_args(live, partial=True)))
    current = nnx.state(model, wrt)
    nnx.replace_by_pure_dict(current, restored["state"]["params"])
    nnx.update(model, current)
    return step


# ----------------------------------------------------------------------------------------------- shape check


def check_shapes(directory, step: int, live: dict, config=None, partial: bool = False) -> None:
    """CheckpointError when checkpoint `step` holds other arrays or shapes than the live tree (e.g. lora.lora_r 4 ->
    8, or lora.use_peft switched): it names the settings that differ from the run that wrote the checkpoint, then
    the first differing array with both shapes. partial: the live tree is a part of the checkpoint (export)."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        stored = _flat_shapes(handler.metadata(epath.Path(directory) / str(step) / "state").tree)
    finally:
        handler.close()
    difference = _first_difference(stored, _flat_shapes(live), partial)
    if difference is None:
        return
    settings = _setting_differences(directory, step, config)
    where = f"the checkpoint at {directory} step {step}"
    if settings:
        before = ", ".join(f"{key}={old!r}" for key, old, _ in settings)
        now = ", ".join(f"{key}={new!r}" for key, _, new in settings)
        raise CheckpointError(f"{where} was written with {before}; this run has {now}: use the same settings to "
                              f"resume or export it, or start a fresh logging.output_dir ({difference})")
    raise CheckpointError(f"{where} does not fit this run's model: {difference}. Fix: use the settings of the run "
                          "that wrote it (model, lora, data.chat_template_path, training.optim), or start a fresh "
                          "logging.output_dir")


def _key_name(key) -> str:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _flat_shapes(tree) -> dict[str, tuple]:
    """{'params.layers.0.mlp.up_proj.lora_a': (64, 4), ...} of a tree of arrays or of Orbax's array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): _stored_shape(leaf) for path, leaf in leaves}


def _stored_shape(leaf) -> tuple:
    """The shape Orbax stores for a leaf: a typed PRNG key (e.g. LoRA dropout's) as its raw key data."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.random.key_data(leaf).shape)
    return tuple(getattr(leaf, "shape", None) or ())


def _first_difference(stored: dict, wanted: dict, partial: bool) -> str | None:
    """The first array (params first) missing on one side or of another shape, in words; None when all fit."""
    order = lambda key: (not key.startswith("params."), key)
    for key in sorted(wanted, key=order):
        if key not in stored:
            return f"this run has {key} {list(wanted[key])}, the checkpoint has no such array"
        if stored[key] != wanted[key]:
            return f"{key} has shape {list(stored[key])} in the checkpoint, {list(wanted[key])} in this run"
    if not partial:
        for key in sorted(stored, key=order):
            if key not in wanted:
                return f"the checkpoint has {key} {list(stored[key])}, this run has no such array"
    return None


def _setting_differences(directory, step: int, config, sections=SHAPE_SECTIONS,
                         ignored=NO_SHAPE) -> list[tuple[str, object, object]]:
    """(setting, checkpoint's value, this run's value) of the settings in `sections` that differ."""
    if config is None:
        run_config = Path(directory).parent / "config.json"  # jsft.train writes it before it resumes
        config = json.loads(run_config.read_text()) if run_config.exists() else None
    written = _read_meta_in(directory, step).get("config")
    if config is None or not written:
        return []
    current = json.loads(json.dumps(config if isinstance(config, dict) else config.to_dict()))  # tuples -> lists
    differences = []
    for section in sections:
        name, _, field = section.partition(".")
        old, new = written.get(name, {}), current.get(name, {})
        keys = [field] if field else sorted(set(old) | set(new))
        for key in keys:
            setting = f"{name}.{key}"
            if setting not in ignored and old.get(key) != new.get(key):
                differences.append((setting, old.get(key), new.get(key)))
    return differences
