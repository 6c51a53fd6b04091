"""Deterministic tiny fixtures: a tokenizer, a random HF Llama checkpoint, and datasets in every TRL format.

Tests and the demo build everything they need from here, with no download. The same seed gives byte-identical
files. The rows carry one learnable rule, so a tiny model can be shown to learn it in minutes:

    spell: 4 0 9        ->  four zero nine        (digits to words)
    digits: four zero   ->  4 0                   (words to digits)

Chat rows add what real chat data has: an optional system message, 1-4 turns, and a long tail of lengths from a
few tokens to far over a typical `max_length` (a "notes:" preamble of filler words in the user message).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FILLER_WORDS = (
    "the a of to and in is it that for on with as was at by this be are from or an have not but what all were "
    "when we there can your which their said if do will each about how up out them then she many some so these "
    "would other into has more her two like him see time could no make than first been its who now people my "
    "made over did down only way find use may water long little very after words called just where most know"
).split()
SYSTEM_PROMPTS = [
    "You are a careful assistant.",
    "Answer with the words only.",
    "You convert between digits and words.",
]
EOS, PAD, IM_START, IM_END, BOS = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"

# ChatML with {% generation %} markers around what the assistant writes (its content and the closing <|im_end|>).
CHATML_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\ntools: ' + (tools | tojson) + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else %}{{ message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


# ----------------------------------------------------------------------------------------------- the task


def make_task(rng: random.Random, max_digits: int = 6) -> tuple[str, str]:
    """One (question, answer) pair that follows the rule."""
    digits = [rng.randrange(10) for _ in range(rng.randint(1, max_digits))]
    words = " ".join(DIGIT_WORDS[d] for d in digits)
    numbers = " ".join(str(d) for d in digits)
    if rng.random() < 0.5:
        return f"spell: {numbers}", words
    return f"digits: {words}", numbers


def _filler(rng: random.Random) -> str:
    """A long-tailed run of filler words: usually none, sometimes a few, rarely hundreds."""
    if rng.random() < 0.6:
        return ""
    n = min(int(math.exp(rng.uniform(1.0, 6.8))), 900)
    return "notes: " + " ".join(rng.choice(FILLER_WORDS) for _ in range(n)) + "\n"


def make_conversation(rng: random.Random) -> list[dict]:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for turn in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
        question, answer = make_task(rng)
        preamble = _filler(rng) if turn == 0 else ""
        messages.append({"role": "user", "content": preamble + question})
        messages.append({"role": "assistant", "content": answer})
    return messages


def make_rows(kind: str, n: int, seed: int) -> list[dict]:
    """Rows of one TRL dataset format: text, prompt_completion, messages, conversational_prompt_completion."""
    rng = random.Random(f"{kind}-{seed}")
    rows = []
    for _ in range(n):
        if kind == "text":
            question, answer = make_task(rng)
            rows.append({"text": f"{_filler(rng)}{question} => {answer}"})
        elif kind == "prompt_completion":
            question, answer = make_task(rng)
            rows.append({"prompt": f"{question} =>", "completion": f" {answer}"})
        elif kind == "messages":
            rows.append({"messages": make_conversation(rng)})
        elif kind == "conversational_prompt_completion":
            conversation = make_conversation(rng)
            rows.append({"prompt": conversation[:-1], "completion": conversation[-1:]})
        else:
            raise ValueError(f"unknown fixture kind {kind!r}")
    return rows


FORMATS = ("text", "prompt_completion", "messages", "conversational_prompt_completion")


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return path


def build_datasets(out_dir: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write `<format>.jsonl` (train) and `<format>_test.jsonl` (held out: another seed) for every format."""
    out = Path(out_dir)
    paths = {}
    for kind in FORMATS:
        paths[kind] = write_jsonl(make_rows(kind, n_train, seed), out / f"{kind}.jsonl")
        paths[f"{kind}_test"] = write_jsonl(make_rows(kind, n_test, seed + 10_000), out / f"{kind}_test.jsonl")
    return paths


# ----------------------------------------------------------------------------------------------- tokenizer


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """The bundled text the tokenizer is trained on: every fixture format, rendered as plain strings."""
    rng = random.Random(f"corpus-{seed}")
    lines = [" ".join(DIGIT_WORDS), " ".join(str(d) for d in range(10)), " ".join(FILLER_WORDS)]
    lines += ["system user assistant tools spell: digits: notes: =>"] * 20
    for _ in range(3000):
        question, answer = make_task(rng)
        lines.append(f"{_filler(rng)}{question} => {answer}")
    return lines


def build_tokenizer(out_dir: str | Path, vocab_size: int = 384, add_bos: bool = False, seed: int = 0) -> Path:
    """Train a byte-level BPE and save it as a transformers tokenizer directory with a ChatML template.

    eos = <|endoftext|>, pad = <|pad|>, chat turns <|im_start|>/<|im_end|>. With `add_bos` the tokenizer also
    prepends <|begin_of_text|> to every encoding (the Llama-3 behaviour).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS, PAD, IM_START, IM_END, BOS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=BOS if add_bos else None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=4096,
    )
    hf.chat_template = CHATML_TEMPLATE
    out = Path(out_dir)
    hf.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------- HF checkpoint

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def build_hf_checkpoint(
    out_dir: str | Path,
    vocab_size: int = 384,
    architecture: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
    **overrides,
) -> Path:
    """A tiny random HF checkpoint written by transformers (needs torch: the `test` extra).

    architecture: "llama", "qwen2" (qkv bias), "qwen3" (q/k norm) or "mistral". `overrides` go into the config,
    e.g. tie_word_embeddings=True, num_key_value_heads=1, or rope_parameters for Llama-3.1 scaling.
    """
    import torch
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[architecture]
    settings = dict(TINY_LLAMA, vocab_size=vocab_size, bos_token_id=None, eos_token_id=0, pad_token_id=1)
    if architecture == "qwen3":
        settings["head_dim"] = settings["hidden_size"] // settings["num_attention_heads"]
    settings.update(overrides)
    config = config_class(**settings)
    torch.manual_seed(seed)
    model = model_class(config).to(getattr(torch, dtype))
    with torch.no_grad():  # transformers inits norms to 1 and biases to 0; randomize them so parity tests see them
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    out = Path(out_dir)
    model.save_pretrained(out)
    return out


def build_all(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Tokenizer + datasets (+ the HF checkpoint when torch is installed) under one directory."""
    out = Path(out_dir)
    paths = {"tokenizer": build_tokenizer(out / "tokenizer", seed=seed)}
    paths.update(build_datasets(out / "data", seed=seed))
    try:
        import torch  # noqa: F401
    except ImportError:
        return paths
    paths["checkpoint"] = build_hf_checkpoint(out / "checkpoint", seed=seed)
    return paths


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "fixtures"
    for name, path in build_all(target).items():
        print(f"{name:40s} {path}")
