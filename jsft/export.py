"""HF exports of a trained model, with the tokenizer and its chat template.

    full     <output_dir>/export    the whole model as transformers loads it (LoRA, if any, merged in)
    merged   <output_dir>/export    the same for a LoRA run: base + alpha/r * A @ B folded into each kernel
    adapter  <output_dir>/adapter   a PEFT adapter (adapter_config.json + adapter_model.safetensors)
    auto     full for full fine-tuning, adapter for LoRA

The train loop calls `export(model, tokenizer, config)` at the end. From a checkpoint:

    python -m jsft.export --config configs/<name>.py [--checkpoint STEP] --format full|merged|adapter [--out DIR]

Each format is written to `<dir>.partial` and renamed over `<dir>` only when complete, so a failed export (a full
disk: one error naming the directory and the space) leaves the previous export as it was and nothing half-written.
A checkpoint is checked against its manifest first (jsft.checkpoint): a damaged one is named, and without
--checkpoint the newest intact one is exported. Exporting into the run's own output_dir takes its lock
(jsft.outdir): not while a run trains there (export elsewhere with --out).
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jsft import outdir
from jsft.config import ConfigError, SFTConfig
from jsft.config_files import load

FORMATS = ("auto", "full", "merged", "adapter")


def resolve_formats(config: SFTConfig, formats=None) -> list[str]:
    formats = list(formats or config.logging.export_formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"logging.export_formats has {unknown}: choose from {', '.join(FORMATS)}")
    lora = config.lora.use_peft
    resolved = []
    for f in formats:
        f = ("adapter" if lora else "full") if f == "auto" else f
        if f in ("merged", "adapter") and not lora:
            raise ConfigError(f"export format {f!r} needs a LoRA run (lora.use_peft=True); use 'full'")
        if f not in resolved:
            resolved.append(f)
    return resolved


def export(model, tokenizer, config: SFTConfig, formats=None, out_dir=None, trained_embeddings=False,
           into_out_dir=False) -> dict[str, Path]:
    """Write each format; returns {format: directory}. trained_embeddings: the LoRA run also trained the whole
    embedding and lm_head (new tokens from a cloned chat template, or a grown vocabulary); the adapter then carries
    them, as PEFT's modules_to_save, so PEFT loads the trained rows. into_out_dir: one format, written into
    out_dir itself (as TRL's save_model(dir) does) instead of out_dir/export or out_dir/adapter."""
    from jsft import hf

    out = Path(out_dir) if out_dir is not None else Path(config.logging.output_dir)
    formats = resolve_formats(config, formats)
    if into_out_dir and len(formats) != 1:
        raise ConfigError(f"export into one directory takes one format, got {formats}")
    where = {"full": "export", "merged": "export", "adapter": "adapter"}
    written = {}
    for fmt in formats:
        target = out if into_out_dir else out / where[fmt]
        if fmt == "full":
            write = lambda d: hf.save_model(model, d, tokenizer=tokenizer)  # noqa: E731
        elif fmt == "merged":
            write = lambda d: hf.save_merged(model, d, tokenizer=tokenizer)  # noqa: E731
        else:
            def write(d):
                lc = config.lora
                base = config.model.model_name_or_path or "(random init: model.init_from_scratch)"
                hf.save_peft_adapter(model, d, base, lc.lora_r, lc.lora_alpha, lc.lora_dropout,
                                     lc.lora_target_modules, save_embeddings=trained_embeddings,
                                     use_rslora=lc.use_rslora, modules_to_save=lc.lora_modules_to_save)
                padded = _with_dummy_tokens(tokenizer, model.cfg.vocab_size) if trained_embeddings else tokenizer
                padded.save_pretrained(d)
        written[fmt] = write_complete(target, write, fmt, _export_bytes(model, fmt, trained_embeddings),
                                      replace=not into_out_dir)
    return written


def _export_bytes(model, fmt: str, trained_embeddings: bool) -> int:
    """About what a format writes: the model's parameters (an adapter: the LoRA ones, plus embedding and head when
    it carries them)."""
    size = lambda leaves: sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)  # noqa: E731
    if fmt != "adapter":
        return size(jax.tree.leaves(nnx.state(model, nnx.Param)))
    heads = [value[...] for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param))
             if trained_embeddings and str(path[0]) in ("embed_tokens", "lm_head")]
    return size(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) + size(heads)


def write_complete(target: Path, write, what: str, needed: int, replace: bool = True) -> Path:
    """write(<target>.partial), then replace target with it; a full disk is one OutputDirError (the partial files
    removed, the previous target untouched). The free space is checked first against `needed` bytes.
    replace=False (a directory of the user's, export into_out_dir): the files are moved into target one by one
    instead, leaving its other files."""
    target = Path(target)
    outdir.make_dir(target.parent, "the export directory")
    partial, old = target.with_name(target.name + ".partial"), target.with_name(target.name + ".old")
    shutil.rmtree(partial, ignore_errors=True)
    free = outdir.free_bytes(target.parent)
    if free < needed:
        raise outdir.OutputDirError(_disk_full(what, target, free, needed))
    try:
        write(partial)
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        if outdir.is_disk_full(e):
            raise outdir.OutputDirError(_disk_full(what, target, outdir.free_bytes(target.parent), needed)) from None
        raise
    if not replace:
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(partial.iterdir()):
            destination = target / path.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            path.replace(destination)
        partial.rmdir()
        return target
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    partial.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _disk_full(what: str, target: Path, free: int, needed: int) -> str:
    kept = "; the export already there is unchanged" if target.exists() else ""
    return (f"disk full writing the {what} export to {target}: {outdir.human(free)} free, it needs about "
            f"{outdir.human(needed)} (nothing half-written is left{kept}). Fix: free space on that disk, or export "
            "elsewhere: python -m jsft.export --config ... --out DIR (the checkpoints are intact)")


def _with_dummy_tokens(tokenizer, vocab_size: int):
    """A copy of the tokenizer padded with TRL's dummy tokens <extra_id_N> to the model's grown vocabulary, as TRL's
    clone_chat_template leaves it: PEFT's recipe `base.resize_token_embeddings(len(tokenizer))` then gives the base
    the shape of the adapter's embedding and head."""
    tokenizer = copy.deepcopy(tokenizer)
    index = 0
    while len(tokenizer) < vocab_size:
        tokenizer.add_tokens(f"<extra_id_{index}>")
        index += 1
    return tokenizer


def export_checkpoint(config: SFTConfig, step: int | None = None, formats=None, out_dir=None) -> dict[str, Path]:
    """Rebuild the run's model (base weights + the checkpoint's trained params) and export it."""
    from jsft import build, checkpoint, sharding

    output_dir = config.logging.output_dir
    checkpoint.check_step(checkpoint.checkpoint_dir(output_dir), step, checkpoint.steps(output_dir))
    into_run = out_dir is None or Path(out_dir).absolute() == Path(output_dir).absolute()
    with outdir.claim(output_dir, enabled=into_run and jax.process_index() == 0):
        mesh = sharding.create_mesh(config.sharding)
        tokenizer, added = build.build_tokenizer(config)
        model, grew = build.build_model(config, tokenizer, mesh)
        trained_embeddings = bool(added) or grew
        wrt = build.trainable(config, model, trained_embeddings)
        with checkpoint.make_manager(output_dir, config.logging.save_total_limit, async_save=False) as manager:
            step = checkpoint.restore_params_intact(manager, model, wrt, step, config)
        print(f"export: checkpoint {step} of {config.logging.output_dir}")
        return export(model, tokenizer, config, formats, out_dir, trained_embeddings)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jsft.export", description="Export a jsft checkpoint to HF.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--format", action="append", choices=FORMATS, default=None, help="repeatable; default: "
                        "logging.export_formats")
    parser.add_argument("--out", default=None, help="directory to export under (default: logging.output_dir)")
    args = parser.parse_args(argv)
    config = load(args.config, args.set)
    for fmt, path in export_checkpoint(config, args.checkpoint, args.format, args.out).items():
        print(f"export ({fmt}): {path}")


if __name__ == "__main__":
    from jsft import cli

    cli.run(main)
