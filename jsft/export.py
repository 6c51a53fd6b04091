"""HF exports of a trained model, with the tokenizer and its chat template.

    full     <output_dir>/export    the whole model as transformers loads it (LoRA, if any, merged in)
    merged   <output_dir>/export    the same for a LoRA run: base + alpha/r * A @ B folded into each kernel
    adapter  <output_dir>/adapter   a PEFT adapter (adapter_config.json + adapter_model.safetensors)
    auto     full for full fine-tuning, adapter for LoRA

The train loop calls `export(model, tokenizer, config)` at the end. From a checkpoint:

    python -m jsft.export --config configs/<name>.py [--checkpoint STEP] --format full|merged|adapter [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from jsft.config import ConfigError, SFTConfig, load

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
            written[fmt] = hf.save_model(model, target, tokenizer=tokenizer)
        elif fmt == "merged":
            written[fmt] = hf.save_merged(model, target, tokenizer=tokenizer)
        else:
            lc = config.lora
            base = config.model.model_name_or_path or "(random init: model.init_from_scratch)"
            written[fmt] = hf.save_peft_adapter(model, target, base, lc.lora_r, lc.lora_alpha,
                                                lc.lora_dropout, lc.lora_target_modules,
                                                save_embeddings=trained_embeddings)
            padded = _with_dummy_tokens(tokenizer, model.cfg.vocab_size) if trained_embeddings else tokenizer
            padded.save_pretrained(written[fmt])
    return written


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
    from jsft import checkpoint, sharding, train
    from jsft.optim import trainable_filter

    output_dir = config.logging.output_dir
    step = checkpoint.check_step(checkpoint.checkpoint_dir(output_dir), step, checkpoint.steps(output_dir))
    mesh = sharding.create_mesh(config.sharding)
    tokenizer, added = train.build_tokenizer(config)
    model, grew = train.build_model(config, tokenizer, mesh)
    trained_embeddings = bool(added) or grew
    wrt = trainable_filter(config.lora.use_peft, new_token_rows=trained_embeddings)
    with checkpoint.make_manager(output_dir, config.logging.save_total_limit, async_save=False) as manager:
        step = checkpoint.restore_params(manager, model, wrt, step, config)
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
