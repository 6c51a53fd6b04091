"""Orbax checkpoints of a run: what it takes to continue exactly where it stopped.

A checkpoint `<output_dir>/checkpoints/<step>/` holds two items:

    state  (Orbax PyTree, sharded arrays)  params: the TRAINABLE params only (all params in full fine-tuning; the
                                            LoRA params + new token rows with LoRA: the frozen base is rebuilt from
                                            model.model_name_or_path), rngs: the model's RNG streams (dropout),
                                            optimizer: step count + Optax state
    data   (JSON)                          step, the Grain iterator state, tokens seen, the config that made it

Saving is asynchronous (training continues while the arrays are written); Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint intact. Just before
that rename jsft writes `jsft_manifest.json` (every file's size and checksum, jsft.manifest), so a checkpoint is
complete exactly when it has its manifest. `save_total_limit` checkpoints are kept (Orbax deletes the oldest once a
newer one is complete). Restoring reads into the shapes, dtypes and shardings of the live model and optimizer, so a
checkpoint saved on one mesh restores onto another.

Before a resume (`restore_newest_intact`) or an export (`restore_params_intact`) the checkpoint is checked against
its manifest; a damaged one (a file missing, truncated or with other bytes, or one Orbax cannot read) is named with
the file, and the next older one is tried. A resume moves damaged checkpoints to `checkpoints.damaged/` (nothing is
deleted), so rotation never counts them. A full disk while saving is one CheckpointError naming the directory and
the space (see `save` and `wait`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import xxhash
from etils import epath
from flax import nnx

from jsft import manifest, outdir
from jsft.data import store
from jsft.errors import CheckpointError

# The settings whose change gives other parameter shapes or names (the model, its vocabulary, LoRA); compared with
# the checkpoint's when a restore finds other shapes. Settings of these sections that never change a shape are left out.
SHAPE_SECTIONS = ("model", "lora", "data.chat_template_path")
NO_SHAPE = ("model.dtype", "model.compute_dtype", "model.attention_impl", "model.remat_policy", "lora.lora_alpha",
            "lora.use_rslora",
            "lora.lora_dropout", "model.load_in_4bit", "model.load_in_8bit", "model.bnb_4bit_quant_type",
            "model.use_bnb_nested_quant", "model.bnb_4bit_quant_storage")  # QLoRA: the base is not in checkpoints
# The settings that decide which rows each step reads: a resume with others continues from a saved data position that
# counts steps of another plan (a warning names them).
DATA_PLAN_SECTIONS = ("data", "training.per_device_train_batch_size", "training.gradient_accumulation_steps",
                      "training.seed")
NOT_DATA_PLAN = ("data.dataset_num_proc", "data.cache_dir")


def checkpoint_dir(output_dir) -> Path:
    return Path(output_dir).absolute() / "checkpoints"


DAMAGED_DIR = "checkpoints.damaged"
# checkpoint directory -> (the step its manager is saving, the bytes of its arrays), for _write_manifest and errors
_saving: dict[str, tuple[int, int]] = {}


class KeepStep:
    """An Orbax preservation policy that keeps one step, changed as the run goes (the best checkpoint, kept from
    rotation as transformers keeps it): `keep.step = 40`."""

    def __init__(self, step: int | None = None):
        self.step = step

    def should_preserve(self, checkpoints, *, context):
        return [info.step == self.step for info in checkpoints]


def make_manager(output_dir, save_total_limit: int | None = 3, async_save: bool = True,
                 keep: KeepStep | None = None) -> ocp.CheckpointManager:
    """Orbax's manager of <output_dir>/checkpoints. Always Orbax's asynchronous checkpointer: only it runs a callback
    after the files are written and before the rename that completes a checkpoint, where jsft writes the manifest;
    async_save=False makes `save` wait for the write instead. keep: a step kept whatever save_total_limit says."""
    from orbax.checkpoint import checkpoint_managers as policies

    directory = checkpoint_dir(output_dir)
    _quiet_disk_full_logs()
    async_options = ocp.AsyncOptions(post_finalization_callback=lambda: _write_manifest(directory))
    rotation = dict(max_to_keep=save_total_limit) if keep is None else dict(
        preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(n=save_total_limit), keep]))
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True, async_options=async_options, create=True,
                                           **rotation)
    manager = ocp.CheckpointManager(directory, options=options)
    manager.jsft_async_save, manager.jsft_save_total_limit = async_save, save_total_limit  # for a new one alike
    manager.jsft_keep = keep
    return manager


def _write_manifest(directory: Path) -> None:
    """Orbax's post-finalization callback (its save thread, process 0): the step's files are complete and still in
    the temporary directory, which Orbax renames next."""
    final = directory / str(_saving[str(directory)][0])
    temporary = final.with_name(final.name + ocp.path.atomicity_types.TMP_DIR_SUFFIX)
    manifest.write(temporary if temporary.exists() else final)


class _DropDiskFullTracebacks(logging.Filter):
    """Orbax logs each failed write of a full disk with its traceback from several threads (hundreds of lines);
    jsft reports it once (CheckpointError), so those records are dropped."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        return not ((error is not None and outdir.is_disk_full(error))
                    or any(w in record.getMessage() for w in outdir.DISK_FULL_WORDS))


def _quiet_disk_full_logs() -> None:
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _DropDiskFullTracebacks) for f in absl.filters):
        absl.addFilter(_DropDiskFullTracebacks())


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
    """Start an asynchronous save of `step` (returns at once; call `wait(manager)` before exit).
    data_state: the Grain iterator's get_state(). extra: small JSON-able facts (tokens seen, config)."""
    meta = {"step": int(step), "data_iterator": _iterator_state_to_json(data_state), **(extra or {})}
    state = _train_state(model, optimizer)
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(meta))
    wait(manager)  # the previous save (Orbax's save would wait too): its errors are reported as its own
    _check_space(manager.directory, int(step))
    _saving[str(manager.directory)] = (int(step), sum(x.nbytes for x in jax.tree.leaves(state)))
    try:
        started = manager.save(int(step), args=args, force=force)
    except Exception as e:
        _raise_if_disk_full(manager.directory, e)
        raise
    if not getattr(manager, "jsft_async_save", True):
        wait(manager)
    return started


def wait(manager: ocp.CheckpointManager) -> None:
    """manager.wait_until_finished(), with a full disk reported as one CheckpointError (the partial step removed)."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        if str(manager.directory) in _saving:
            _raise_if_disk_full(manager.directory, e)
        raise


def _newest_size(directory) -> tuple[int, int] | None:
    """(step, bytes) of the newest complete checkpoint under directory, or None."""
    done = [int(p.name) for p in Path(directory).iterdir() if p.name.isdigit()] if Path(directory).exists() else []
    if not done:
        return None
    return max(done), outdir.tree_bytes(Path(directory) / str(max(done)))


def _check_space(directory, step: int) -> None:
    """Refuse to start a save the disk cannot hold: less free space than the newest checkpoint takes (the same
    arrays; before the first one, nothing is checked: Orbax compresses, so the arrays' bytes are only a bound)."""
    newest = _newest_size(directory)  # every process: they see the same shared disk, so all stop alike
    if newest is None:
        return
    free = outdir.free_bytes(directory)
    if free < newest[1]:
        raise CheckpointError(_disk_full_message(directory, step, free, newest, 0))


def _raise_if_disk_full(directory, error: BaseException) -> None:
    if not outdir.is_disk_full(error):
        return
    step, array_bytes = _saving[str(directory)]
    partial = Path(directory) / (str(step) + ocp.path.atomicity_types.TMP_DIR_SUFFIX)
    if jax.process_index() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays; Orbax never lists it as complete
    raise CheckpointError(_disk_full_message(directory, step, outdir.free_bytes(directory), _newest_size(directory),
                                             array_bytes)) from None


def _disk_full_message(directory, step: int, free: int, newest, array_bytes: int) -> str:
    kept = sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())
    need = (f"; checkpoint {newest[0]} of this run takes {outdir.human(newest[1])}" if newest else
            f"; the arrays of a checkpoint hold {outdir.human(array_bytes)} (Orbax compresses them)")
    intact = (f"The checkpoints saved before it ({', '.join(map(str, kept))}) are intact and nothing of checkpoint "
              f"{step} is left. " if kept else f"Nothing of checkpoint {step} is left. ")
    return (f"disk full while saving checkpoint {step} to {directory}: {outdir.human(free)} free{need}. {intact}"
            "Fix: free space on that disk (or lower logging.save_total_limit, or set logging.output_dir on a larger "
            "disk), then resume with the same command")


def _abstract(tree):
    """Shape, dtype and sharding of each live array: the restore target (so another mesh works)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _restore_args(live, partial: bool = False):
    abstract = _abstract(live)
    return ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                  partial_restore=partial)


def restore(manager: ocp.CheckpointManager, model, optimizer, step: int | None = None, config=None,
            data_fingerprint: dict | None = None) -> dict:
    """Load checkpoint `step` (default: the latest) into model and optimizer in place; returns its JSON item with
    "data_iterator" ready for the iterator's set_state(). config (an SFTConfig or its to_dict(); default: the
    config.json that jsft.train writes to output_dir before resuming) names the changed settings when the checkpoint
    holds other parameter shapes than this model (see check_shapes). data_fingerprint: this run's (see
    data_fingerprint), compared with the checkpoint's."""
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
    check_data_fingerprint(manager.directory, step, meta.get("data_fingerprint"), data_fingerprint, config)
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


# ----------------------------------------------------------------------------------------------- verified restore


def damage(directory, step: int) -> str | None:
    """What is wrong with checkpoint `step` under directory by its manifest (naming the file), or None when it
    matches (or has no manifest: written by a jsft before manifests; then only a failing restore tells)."""
    folder = Path(directory) / str(step)
    return manifest.check(folder) if manifest.has_manifest(folder) else None


def _first_intact(directory, candidates: list[int], read, what: str):
    """(step, read(step), [(damaged step, problem)]) for the first candidate that matches its manifest and reads;
    each damaged one is warned about by name. CheckpointError (a checkpoint that does not fit this run) is not
    damage: it is raised as it is."""
    damaged = []
    for step in candidates:
        problem = damage(directory, step)
        if problem is None:
            try:
                return step, read(step), damaged
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 -- any failure to read is damage here; the message keeps its words
                problem = f"Orbax cannot read it ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
        damaged.append((step, problem))
        later = [c for c in candidates if c < step]
        then = f"trying checkpoint {later[0]}" if later else "no older checkpoint is left"
        warnings.warn(f"checkpoint {step} is damaged: {problem}. {then} for the {what}", UserWarning, stacklevel=3)
    listed = "; ".join(f"{step}: {problem}" for step, problem in damaged)
    raise CheckpointError(f"no intact checkpoint under {directory} for the {what} ({listed}). Fix: restore the "
                          f"files from a copy, or move {directory} away to start fresh")


def _move_damaged(directory, damaged: list[tuple[int, str]]) -> Path | None:
    """Move damaged checkpoints to checkpoints.damaged/<step> (nothing deleted): Orbax then neither lists them nor
    counts them for save_total_limit, and the step can be saved again."""
    if not damaged:
        return None
    target = Path(directory).with_name(DAMAGED_DIR)
    if jax.process_index() == 0:
        target.mkdir(exist_ok=True)
        for step, _ in damaged:
            name, n = str(step), 1
            while (target / name).exists():
                name, n = f"{step}.{n}", n + 1
            (Path(directory) / str(step)).rename(target / name)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jsft: damaged checkpoints moved")
    return target


def restore_newest_intact(manager: ocp.CheckpointManager, model, optimizer, config=None,
                          data_fingerprint: dict | None = None):
    """Resume: the newest checkpoint that matches its manifest and restores, into model and optimizer. Damaged newer
    ones are named (warnings) and moved to checkpoints.damaged/. Returns (manager, meta): the manager is a new one
    when checkpoints were moved (Orbax lists a directory's steps once). CheckpointError when none is intact."""
    directory = Path(manager.directory)
    candidates = sorted(manager.all_steps(), reverse=True)
    read = lambda step: restore(manager, model, optimizer, step, config, data_fingerprint)  # noqa: E731
    step, meta, damaged = _first_intact(directory, candidates, read, "resume")
    moved = _move_damaged(directory, damaged)
    if moved is not None:
        manager.close()
        manager = make_manager(directory.parent, manager.jsft_save_total_limit, manager.jsft_async_save,
                               manager.jsft_keep)
        print(f"resume: damaged checkpoint(s) {', '.join(str(d) for d, _ in damaged)} moved to {moved} (delete them "
              f"when you have looked); resuming checkpoint {step}, the newest intact one")
    return manager, meta


def restore_params_intact(manager: ocp.CheckpointManager, model, wrt, step: int | None = None, config=None) -> int:
    """Export: restore_params of checkpoint `step` after checking it (CheckpointError naming the damaged file), or
    with step=None of the newest intact one (a damaged newer one is warned about; nothing is moved). Returns the
    step."""
    directory = Path(manager.directory)
    available = sorted(manager.all_steps())
    chosen = check_step(directory, step, available)
    if step is None:
        read = lambda s: restore_params(manager, model, wrt, s, config)  # noqa: E731
        return _first_intact(directory, sorted(available, reverse=True), read, "export")[0]
    try:
        problem = damage(directory, chosen)
        if problem is None:
            return restore_params(manager, model, wrt, chosen, config)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- as in _first_intact
        problem = f"Orbax cannot read it ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
    others = [s for s in available if s != chosen]
    fix = (f"Fix: export another one (--checkpoint {others[-1]}; the steps there: {', '.join(map(str, others))}), or "
           "leave --checkpoint out for the newest intact one" if others else
           "There is no other checkpoint: restore its files from a copy")
    raise CheckpointError(f"checkpoint {chosen} under {directory} is damaged: {problem}. {fix}")


# ----------------------------------------------------------------------------------------------- data fingerprint


def data_fingerprint(prepared) -> dict:
    """Identity of the tokenized training examples (what a saved data position counts rows of): their number, tokens
    and a hash of tokens, trained mask and offsets. Content, not the token cache key's file size and mtime, so a
    copied or touched file with the same rows is the same data (~9 GB/s: 0.1 s for 100M tokens)."""
    examples = prepared.examples
    h = xxhash.xxh3_128()
    for array in (examples.tokens, examples.loss_mask, examples.offsets):
        for piece in store.read_chunks(array):  # a store's arrays in bounded plain reads (jsft.data.store)
            h.update(np.ascontiguousarray(piece).data)
    return {"examples": int(len(examples.offsets) - 1), "tokens": int(len(examples.tokens)), "hash": h.hexdigest()}


def check_data_fingerprint(directory, step: int, saved: dict | None, current: dict | None, config=None) -> None:
    """Warn (by name) when the training data differs from the data checkpoint `step` was trained on: its saved
    position then points into other rows. A warning, not an error, as for changed data settings: fixing a few rows
    and resuming is a normal thing to do, but it must never pass silently."""
    if not saved or not current or saved.get("hash") == current.get("hash"):
        return
    name = None
    if config is not None:
        name = (config if isinstance(config, dict) else config.to_dict()).get("data", {}).get("dataset_name")
    source = f" (data.dataset_name={name})" if name else ""
    if "examples" in saved and "examples" in current:
        what = (f"{saved['examples']:,} -> {current['examples']:,} examples, {saved['tokens']:,} -> "
                f"{current['tokens']:,} tokens, token hash")
    else:  # a stream (jsft.data.streaming): the hash of its files, sizes and mtimes, not of its tokens
        what = "streamed source (files, sizes, mtimes) hash"
    warnings.warn(
        f"the training data{source} changed since checkpoint {step} was written: {what} "
        f"{str(saved.get('hash'))[:12]} -> {str(current.get('hash'))[:12]}. The saved data position counts rows "
        "of the old data, so from here this run trains other rows than the interrupted run would have (start fresh "
        "in another output_dir to train the new data from step 0)", UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------- shape check

PER_LAYER = re.compile(r"(^|\.)layers\.\d+\.")  # a per-layer array path: checkpoints from before the stacking
STACKED_SINCE = "21024fe"  # the merge that stacked the decoder layers (2026-12-02)


def check_shapes(directory, step: int, live: dict, config=None, partial: bool = False) -> None:
    """CheckpointError when checkpoint `step` holds other arrays or shapes than the live tree (e.g. lora.lora_r 4 ->
    8, or lora.use_peft switched): it names the settings that differ from the run that wrote the checkpoint, then
    the first differing array with both shapes. partial: the live tree is a part of the checkpoint (export)."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        stored = _flat_shapes(handler.metadata(epath.Path(directory) / str(step) / "state").tree)
    finally:
        handler.close()
    wanted = _flat_shapes(live)
    difference = _first_difference(stored, wanted, partial)
    if difference is None:
        return
    where = f"the checkpoint at {directory} step {step}"
    per_layer = sorted(k for k in stored if PER_LAYER.search(k))
    if per_layer and not any(PER_LAYER.search(k) for k in wanted):
        raise CheckpointError(
            f"{where} holds one array per decoder layer ({per_layer[0]}, ...): it was written by a jsft from before "
            f"the layers were stacked into one [num_layers, ...] array (commit {STACKED_SINCE}), which this jsft "
            "cannot restore. Fix: export it with the jsft that wrote it (`git checkout "
            f"{STACKED_SINCE}^1`, then `python -m jsft.export --config <its config>`) and start a new run from the "
            "export, or start a fresh logging.output_dir")
    settings = _setting_differences(directory, step, config)
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
