"""The plan: what a run will do, printed before its first step (sizes, tokens per step, the attention kernel,
the compiled memory per device for the longest rows a step can have), and the train step compiled for it.

    plan, compiled = print_plan(config, model, optimizer, wrt, first_batch, mesh, total_steps, start_step, schedule,
                                train_data)
    train_step = PlannedStep(compiled, train_data.max_length, **step.train_options(config.training), schedule=schedule)
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from jsft import sharding, step
from jsft.model.attention import plan_report
from jsft.model.llama import Attention
from jsft.model.quant import bytes_by_dtype, quantized_kernels
from jsft.validate import quantization


def count_params(model, wrt) -> tuple[int, int]:
    """(all params, trainable params); a quantized kernel counts as the weights it holds."""
    size = lambda state: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))  # noqa: E731
    quantized = sum(int(np.prod(k.shape)) for k in quantized_kernels(model).values())
    return size(nnx.state(model, nnx.Param)) + quantized, size(nnx.state(model, wrt))



def _abstract_batch(batch, mesh, length: int):
    """The global step's shapes, with rows of `length` tokens."""
    spec = lambda x: jax.sharding.NamedSharding(mesh, sharding.batch_spec(x.ndim))  # noqa: E731
    _, count = sharding.data_process_split(mesh)
    return {k: jax.ShapeDtypeStruct((v.shape[0], v.shape[1] * count, length, *v.shape[3:]), v.dtype, sharding=spec(v))
            for k, v in batch.items()}



class PlannedStep:
    """The train step: the plan's AOT-compiled executable for batches of the planned shapes (so a run compiles the
    step once, not once for the plan and again at the first step), jsft.step.train_step (compiled per shape by
    jit) for others, e.g. a step whose rows are padded shorter (data.pad_to_multiple_of)."""

    def __init__(self, compiled, length: int | None, **static):
        self.compiled, self.length, self.static = compiled, length, static

    def __call__(self, model, optimizer, batch):
        if self.compiled is not None and batch["input_ids"].shape[-1] == self.length:
            try:
                return self.compiled(model, optimizer, batch)
            except (TypeError, ValueError) as e:  # argument shapes/shardings unlike the plan's (checked before it runs)
                print(f"plan: the compiled step does not take this batch ({type(e).__name__}: {e}); compiling again")
                self.compiled = None
        return step.train_step(model, optimizer, batch, **self.static)


def print_plan(config, model, optimizer, wrt, batch, mesh, total_steps, start_step, schedule,
               train_data) -> tuple[dict, object]:
    """What the run will do, before the first step: sizes, tokens per step, the compiled memory per device (for the
    longest rows a step can have). Returns (plan, the compiled step for those rows, or None)."""
    total, trainable = count_params(model, wrt)
    A, B, _ = batch["input_ids"].shape
    L = max(train_data.lengths())  # the longest rows a step can have
    _, count = sharding.data_process_split(mesh)
    plan = {"params": total, "trainable_params": trainable, "micro_batches": A, "rows_per_micro_batch": B * count,
            "max_length": L, "tokens_per_step": A * B * count * L, "total_steps": total_steps,
            "devices": jax.device_count(), "mesh": dict(mesh.shape)}
    print(f"plan: {total:,} params, {trainable:,} trainable ({trainable / max(total, 1):.2%}); mesh {dict(mesh.shape)} "
          f"on {jax.device_count()} x {jax.devices()[0].device_kind}")
    base_bytes = bytes_by_dtype(model)
    plan["base_bytes_by_dtype"] = base_bytes
    size = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"  # noqa: E731
    print("plan: frozen base " + ", ".join(f"{dt} {size(n)}" for dt, n in base_bytes.items())
          + f" (whole model, all devices){_quantization_note(config)}")
    print(f"plan: {A} micro-batch(es) x {B * count} rows x {L} tokens = {A * B * count * L:,} token slots per step; "
          f"steps {start_step} -> {total_steps}")
    lengths = train_data.lengths()
    if train_data.buckets is not None:
        plan["step_lengths"] = lengths
        print(f"plan: group_by_length: each step's rows come from one of {len(lengths)} length buckets {lengths} "
              f"(each compiled on first use); the memory below is for {L}")
    elif len(lengths) > 1:
        plan["step_lengths"] = lengths
        print(f"plan: each step's rows are padded to its longest row rounded up to a multiple of "
              f"{train_data.pad_to_multiple_of} (data.pad_to_multiple_of): {len(lengths)} possible lengths "
              f"{lengths[0]}..{lengths[-1]}, each compiled on first use; the memory below is for {L}")
    elif train_data.stats["packing"] == "none" and train_data.stats.get("fill_rate", 1) < 0.5:
        print(f"plan: unpacked rows are {train_data.stats['fill_rate']:.0%} tokens, the rest padding to {L}: set "
              "data.packing=True (documents stay apart), or data.pad_to_multiple_of=64 to pad each step only to its "
              "longest row (one compile per length)")
    attention = next(m for _, m in nnx.iter_modules(model) if isinstance(m, Attention))  # every layer's is alike
    tensor = mesh.shape.get("tensor", 1)
    heads = model.cfg.num_heads // tensor if model.cfg.num_heads % tensor == 0 else model.cfg.num_heads
    entries, lines = plan_report(  # probes the attention kernels here; an explicit impl that cannot run stops here
        attention.impl, model.compute_dtype, L, attention.head_dim, q_heads=model.cfg.num_heads,
        kv_heads=model.cfg.num_kv_heads, max_segments=attention.max_segments,
        rows_per_device=max(1, B * count // math.prod(mesh.shape[a] for a in ("data", "fsdp"))),
        heads_per_device=heads, device_bytes=(jax.local_devices()[0].memory_stats() or {}).get("bytes_limit"))
    plan.update(entries)
    for line in lines:
        print(f"plan: {line}")
    compiled = None
    try:
        with jax.set_mesh(mesh):
            compiled = step.train_step.lower(model, optimizer, _abstract_batch(batch, mesh, L),
                                             **step.train_options(config.training), schedule=schedule).compile()
        mem = compiled.memory_analysis()
        if mem is not None:
            gib = lambda n: n / 2**30  # noqa: E731
            need = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes \
                - mem.alias_size_in_bytes
            plan["memory_per_device_bytes"] = int(need)
            stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
            limit = stats.get("bytes_limit")
            verdict = "" if limit is None else (f" of {gib(limit):.2f} GiB: fits" if need <= limit
                                                else f" but the device has {gib(limit):.2f} GiB: WILL NOT FIT")
            print(f"plan: compiled step needs {gib(need):.2f} GiB per device{verdict} (arguments "
                  f"{gib(mem.argument_size_in_bytes):.2f}, temporaries {gib(mem.temp_size_in_bytes):.2f}). To use less: "
                  "lower training.per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch), "
                  "model.remat_policy='full', a larger sharding.mesh_shape fsdp, lora.use_peft=True, or "
                  "data.max_length.")
    except Exception as e:  # the estimate is advice; the run itself reports real failures
        print(f"plan: no compiled memory estimate ({type(e).__name__}: {e})")
    return plan, compiled


def _quantization_note(config) -> str:
    q = quantization(config)
    if q is None:
        return ""
    nested = " + nested" if q["nested"] else ""
    kind = "int8 (LLM.int8 rows)" if q["quant_type"] == "int8" else q["quant_type"] + nested
    return f"; projections quantized: {kind}, embeddings, lm_head and norms in {config.model.dtype}"
