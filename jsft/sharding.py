"""Device mesh, partition rules, and multi-host start.

Every device sits on one mesh with three axes, outermost first:

    data    replicas of the whole model; each holds a different slice of the batch (plain data parallel)
    fsdp    parameters, gradients and optimizer state split along `embed`; batch split too (ZeRO-3 style)
    tensor  matmuls split along heads / mlp / vocab (Megatron style); the batch is NOT split here

Parameters name their dimensions with logical axes (metadata `out_sharding`, e.g. ("embed", "mlp")).
`RULES`, the one table below, maps each logical axis to mesh axes; nothing else in jsft decides placement.

    mesh = create_mesh(config.sharding)                     # data=-1: all remaining devices
    model = create_sharded_model(lambda: Llama(...), mesh)  # random init, never whole on one device
    model, _ = hf.load_model(path, shardings=model_shardings(abstract_model, mesh))  # or: read into shards
    optimizer = create_sharded_optimizer(model, tx, wrt, mesh)  # Adam state built in its shards
    batch = shard_batch(local_numpy_batch, mesh)            # process-local [A, B_local, L] -> global [A, B, L]
    with jax.set_mesh(mesh):
        metrics = train_step(model, optimizer, batch)       # the step ends with constrain(model/optimizer)

A dimension that its mesh axes do not divide (e.g. a vocab of 32001 rows on tensor=2) is replicated along those
axes, with one warning naming the parameter, its shape and the axis: training stays correct, only that tensor
costs more memory. A batch that does not divide is an error (see `shard_batch`). "q_heads"/"kv_heads" name the
flattened heads*head_dim axis: with tensor <= the head count each device holds whole heads; a larger tensor axis
(8 devices, 2 kv heads) still computes the same numbers but splits heads and adds communication.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from types import MappingProxyType

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# The one table: logical axis -> mesh axis, tuple of mesh axes, or None (replicated). Read-only.
RULES: Mapping[str, str | tuple[str, ...] | None] = MappingProxyType({
    # activations and batches
    "batch": ("data", "fsdp"),
    "length": None,
    "heads": "tensor",  # the (unflattened) head axis of q/k/v activations: model/attention.py splits kernels on it
    # parameters (and, by inheritance, their gradients and optimizer state)
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,  # the stacked decoder layers' leading axis: every device holds every layer (scanned over)
    "lora_rank": None,
})


class ShardingError(ValueError):
    """A mesh or a placement that cannot work; the message names the parameter, shape or axis and the fix."""


# ----------------------------------------------------------------------------------------------- mesh


def mesh_axis_sizes(mesh_shape: Mapping[str, int], device_count: int) -> tuple[int, int, int]:
    """{"data": -1, "fsdp": 2} with 8 devices -> (4, 2, 1). Missing axes are 1; one axis may be -1 (the rest)."""
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"mesh_shape has unknown axes {sorted(unknown)}: use {', '.join(MESH_AXES)}")
    sizes = [int(mesh_shape.get(axis, 1)) for axis in MESH_AXES]
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh_shape {dict(mesh_shape)}: each axis is a positive size or -1 (the rest)")
    if sizes.count(-1) > 1:
        raise ShardingError(f"mesh_shape {dict(mesh_shape)}: at most one axis may be -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % fixed:
            raise ShardingError(
                f"mesh_shape {dict(mesh_shape)}: the fixed axes use {fixed} devices, which does not divide the "
                f"{device_count} devices present; choose sizes whose product divides {device_count}"
            )
        sizes[sizes.index(-1)] = device_count // fixed
    elif fixed != device_count:
        raise ShardingError(
            f"mesh_shape {dict(mesh_shape)} uses {fixed} devices but {device_count} are present; "
            "make the product equal the device count, or set one axis to -1"
        )
    return tuple(sizes)


def create_mesh(sharding_config, devices=None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh from a ShardingConfig (or a mesh_shape dict) over `devices` (all).

    Devices are ordered by (process, id), so the innermost axis (tensor) stays inside one host, then fsdp, and
    data is outermost (it crosses hosts first: only gradients travel between data replicas).
    """
    mesh_shape = getattr(sharding_config, "mesh_shape", sharding_config)
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    sizes = mesh_axis_sizes(mesh_shape, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# ----------------------------------------------------------------------------------------------- rules


def logical_to_spec(names, shape, mesh: Mesh, where: str = "array") -> PartitionSpec:
    """Logical axis names -> PartitionSpec via RULES; a dim its mesh axes do not divide is replicated (warning).

    ("embed", "mlp"), shape (64, 128): mesh (1, 4, 2) -> P("fsdp", "tensor"); mesh (1, 8, 1) -> P("fsdp").
    Mesh axes of size 1 and trailing Nones are left out, so the spec is the one XLA hands back from a jitted
    step (equal specs, not just equivalent ones: jit caches on them and would otherwise compile twice).
    """
    if len(names) != len(shape):
        raise ShardingError(f"{where}: logical axes {tuple(names)} do not match its shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in RULES:
            raise ShardingError(
                f"{where}: logical axis {name!r} (shape {tuple(shape)}) is not in jsft.sharding.RULES; "
                f"known axes: {', '.join(RULES)}"
            )
        rule = RULES[name]
        axes = () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)  # size-1 axes: canonical spec
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % size:
            warnings.warn(
                f"jsft.sharding: {where} shape {tuple(shape)}: dim {name!r}={dim} is not divisible by mesh axes "
                f"{axes} (size {size}); replicating that dim",
                stacklevel=3,
            )
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:  # canonical form, as XLA returns it: P("fsdp") not P("fsdp", None)
        spec.pop()
    return PartitionSpec(*spec)


def _logical_names(variable: nnx.Variable):
    metadata = variable.get_metadata()
    return metadata.get("out_sharding") or metadata.get("sharding_names")


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def model_specs(state, mesh):
    """An nnx.State (or a graph node: model, optimizer) -> the same tree with a PartitionSpec in each Variable.

    Works on abstract state (from nnx.eval_shape) as well as real arrays, and on an abstract mesh. Variables
    without logical axes (step counters, rng keys, scalars) are replicated: P(). So is optimizer state whose
    shape is not its param's (Adafactor's factored row/column statistics, placeholders): a vector per matrix.
    """
    if not isinstance(state, nnx.State):
        state = nnx.state(state)

    def one(path, variable):
        names = _logical_names(variable)
        shape = np.shape(variable.get_value())
        optimizer_stat = bool(path) and str(getattr(path[0], "key", path[0])) == "opt_state"
        if names is None or (optimizer_stat and (len(names) != len(shape) or math.prod(shape) == 1)):
            return variable.replace(PartitionSpec())
        return variable.replace(logical_to_spec(tuple(names), shape, mesh, _path_name(path)))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def model_shardings(state, mesh: Mesh):
    """Like `model_specs`, with a NamedSharding on `mesh` in each Variable: for jax.device_put, jit, Orbax."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), model_specs(state, mesh))


def abstract_with_shardings(state, mesh: Mesh):
    """State -> the same tree of jax.ShapeDtypeStruct carrying shardings: a restore target for Orbax."""
    if not isinstance(state, nnx.State):
        state = nnx.state(state)
    shardings = model_shardings(state, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, shardings)


def shard_model(node, mesh: Mesh):
    """Place every Variable of a model or optimizer (in place) on `mesh` by its logical axes; returns `node`.

    The arrays must hold the same values on every process (same seed, or loaded from the same files).
    """
    state = nnx.state(node)
    nnx.update(node, jax.device_put(state, model_shardings(state, mesh)))
    return node


def constrain(node, mesh: Mesh | None = None):
    """Inside a jitted step, last thing: pin every Variable of `node` (model, optimizer) to its sharding.

    Without it XLA picks output layouts itself (e.g. norm scales split over fsdp), the next call sees new input
    shardings and compiles the step a second time. `mesh` defaults to the one set by `with jax.set_mesh(mesh):`
    around the call; with no mesh set this does nothing (single device).
    """
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return node
    state = nnx.state(node)
    nnx.update(node, jax.tree.map(_constrain_leaf, state, model_specs(state, mesh)))
    return node


def shard_activation(x, names: tuple):
    """Inside a model under `with jax.set_mesh(mesh)`: pin an activation to its logical axes via RULES.

    h = shard_activation(h, ("batch", "length", "embed")) -> P(("data", "fsdp")): "embed" would map to fsdp, which
    the batch already uses, so the hidden dim stays whole. No mesh set: returns x unchanged.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(tuple(names), x.shape, mesh, "activation"))


def _constrain_leaf(x, spec):
    return jax.lax.with_sharding_constraint(x, spec) if hasattr(x, "shape") else x


def create_sharded(constructor: Callable, mesh: Mesh, *args):
    """`constructor(*args)` compiled with its outputs in their shards: no device ever holds the whole result.

    args are graph nodes (e.g. the model an optimizer is built for), passed into the jit, not baked in as constants.
    """
    abstract = nnx.eval_shape(constructor, *args)
    shardings = model_shardings(nnx.state(abstract), mesh)

    @nnx.jit
    def build(*args):
        node = constructor(*args)
        nnx.update(node, jax.lax.with_sharding_constraint(nnx.state(node), shardings))
        return node

    with jax.set_mesh(mesh):
        return build(*args)


def create_sharded_model(constructor: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """Build `constructor()` (e.g. a random-init Llama) directly into its shards."""
    return create_sharded(constructor, mesh)


def create_sharded_optimizer(model, tx, wrt, mesh: Mesh) -> nnx.Optimizer:
    """nnx.Optimizer(model, tx, wrt=wrt) with its state (Adam moments, master weights) built in its shards.

    Plain nnx.Optimizer(...) builds state that optax creates with jnp.zeros(shape) whole on one device (only
    zeros_like would follow the params); for an 8B model that is 64 GB of float32 moments on device 0.
    """
    return create_sharded(lambda m: nnx.Optimizer(m, tx, wrt=wrt), mesh, model)


# ----------------------------------------------------------------------------------------------- batches


def batch_spec(ndim: int) -> PartitionSpec:
    """[A, B, L] -> P(None, ("data", "fsdp"), None); [B, L] -> P(("data", "fsdp"), None); [B] -> P(batch)."""
    batch_axis = 1 if ndim == 3 else 0
    spec = [None] * ndim
    spec[batch_axis] = RULES["batch"]
    return PartitionSpec(*spec)


def data_process_split(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process loads slice `index` of `count` equal slices of the global batch.

    Processes whose devices hold the same batch rows (a tensor axis that crosses hosts) get the same index, so
    count can be smaller than jax.process_count(). Pass these to the data pipeline's per-process split.
    """
    process_grid = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
    return batch_split(process_grid, jax.process_index())


def batch_split(process_grid: np.ndarray, process_index: int) -> tuple[int, int]:
    """data_process_split on a grid of the mesh's shape holding each device's process index.

    Process grid (data=2, fsdp=1, tensor=2) [[[0, 0]], [[1, 1]]]: process 1 -> (1, 2).
    Process grid (1, 1, tensor=4) [[[0, 0, 1, 1]]]: both processes hold every row -> (0, 1).
    """
    # the batch shard each device holds = its position on the batch axes, row-major over (data, fsdp)
    positions = np.indices(process_grid.shape)
    shard_of = np.zeros(process_grid.shape, dtype=int)
    for axis in RULES["batch"]:
        i = MESH_AXES.index(axis)
        shard_of = shard_of * process_grid.shape[i] + positions[i]
    groups: dict[int, set[int]] = {}
    for process, shard in zip(process_grid.flat, shard_of.flat):
        groups.setdefault(int(process), set()).add(int(shard))
    distinct = sorted({tuple(sorted(g)) for g in groups.values()})
    flat = sorted(s for g in distinct for s in g)
    size = len(distinct[0])
    if flat != list(range(shard_of.max() + 1)) or any(g != tuple(range(g[0], g[0] + size)) for g in distinct):
        raise ShardingError(
            f"mesh {process_grid.shape}: processes hold overlapping or uneven batch shards {distinct}; "
            "keep the tensor axis inside one host or make data*fsdp a multiple of the process count"
        )
    return distinct.index(tuple(sorted(groups[process_index]))), len(distinct)


def shard_batch(batch, mesh: Mesh):
    """Process-local numpy arrays [A, B_local, L] (or [B_local, L]) -> global jax.Arrays split on B over
    (data, fsdp). A pytree (dict) of arrays in, the same pytree out.

    The global batch is B_local * count, where (_, count) = data_process_split(mesh). B_local must be a multiple
    of the batch shards this process holds.
    """
    _, count = data_process_split(mesh)
    shards = math.prod(mesh.shape[a] for a in RULES["batch"])

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ShardingError("shard_batch: got a scalar; every batch entry needs a batch dimension")
        b_local = x.shape[1 if x.ndim == 3 else 0]
        if b_local % (shards // count):
            raise ShardingError(
                f"shard_batch: local batch {x.shape}: B_local={b_local} must be a multiple of the {shards // count} "
                f"batch shards this process holds (data*fsdp={shards} over {count} data slices)"
            )
        return jax.make_array_from_process_local_data(NamedSharding(mesh, batch_spec(x.ndim)), x)

    return jax.tree.map(one, batch)


# ----------------------------------------------------------------------------------------------- multi-host

# Environment variables that announce a multi-process launch jax.distributed.initialize() can read by itself.
_AUTO_ENV = {
    "SLURM_NTASKS": "SLURM_JOB_ID",  # srun
    "OMPI_COMM_WORLD_SIZE": "OMPI_COMM_WORLD_RANK",  # mpirun (Open MPI)
}


def use_cpu() -> None:
    """TRL's use_cpu=True: run on the CPU even where an accelerator is present (before JAX starts a backend)."""
    jax.config.update("jax_platforms", "cpu")
    if jax.devices()[0].platform != "cpu":  # a backend had already started
        raise ShardingError("sharding.use_cpu=True, but JAX already runs on "
                            f"{jax.devices()[0].platform}: set JAX_PLATFORMS=cpu in the environment instead")


def initialize_distributed(sharding_config) -> tuple[int, int]:
    """Start multi-process JAX when the run spans several processes; returns (process_index, process_count).

    Explicit: coordinator_address, num_processes, process_id from the config. Auto: under srun (SLURM_NTASKS > 1)
    or mpirun (OMPI_COMM_WORLD_SIZE > 1), or with JAX_COORDINATOR_ADDRESS set, JAX reads them itself. Otherwise
    (one process) nothing happens. Call it before anything touches a device.

    Under SLURM, JAX gives each task the one GPU of index SLURM_LOCALID (launch one task per GPU); with
    --ntasks-per-node=1 the task gets every GPU of its node (SLURM_GPUS_ON_NODE) instead.
    """
    if getattr(sharding_config, "use_cpu", False):
        use_cpu()
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    address = getattr(sharding_config, "coordinator_address", None)
    if address is not None:
        num, pid = sharding_config.num_processes, sharding_config.process_id
        if num is None or pid is None:
            raise ShardingError(
                "sharding.coordinator_address is set: also set sharding.num_processes and sharding.process_id "
                "(or leave all three unset to auto-detect SLURM / Open MPI)"
            )
        if not 0 <= pid < num:
            raise ShardingError(f"sharding.process_id={pid} must be in [0, num_processes={num})")
        jax.distributed.initialize(address, num, pid)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or any(
        int(os.environ.get(size, "1")) > 1 and marker in os.environ for size, marker in _AUTO_ENV.items()
    ):
        jax.distributed.initialize(local_device_ids=_slurm_node_devices())
    return jax.process_index(), jax.process_count()


def _slurm_node_devices() -> list[int] | None:
    """All GPUs of the node when SLURM runs one task per node; None lets JAX choose (one GPU per task)."""
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]  # "8" or "1(x4)"
    gpus = os.environ.get("SLURM_GPUS_ON_NODE")
    if "SLURM_JOB_ID" in os.environ and per_node == "1" and gpus:
        return list(range(int(gpus)))
    return None
