"""`python -m jsft.chat --model <export dir>`: talk to an exported model in the terminal.

Each turn renders the whole conversation with the tokenizer's chat template and decodes the reply (jsft.generate,
with a KV cache: greedy by default, `--temperature 0.8 --top-k 40 --top-p 0.95` to sample). Commands: /reset
clears the conversation, /quit exits.
"""

from __future__ import annotations

import argparse

from jsft.generate import chat_replies


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jsft.chat", description="Chat with an exported HF model.")
    parser.add_argument("--model", required=True, help="an HF model directory (e.g. <output_dir>/export)")
    parser.add_argument("--system", default=None, help="a system message to start every conversation with")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)

    from jsft.data.templates import from_pretrained
    from jsft.hf import load_model

    tokenizer = from_pretrained(args.model, field="--model")
    if tokenizer.chat_template is None:
        raise SystemExit(f"{args.model}: the tokenizer has no chat template; export a model trained on chat data")
    model, _ = load_model(args.model, dtype=args.dtype, field="--model")
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print("chat: type a message (/reset, /quit)")
    seed = 0
    while True:
        try:
            text = input("user> ").strip()
        except EOFError:
            break
        if text == "/quit":
            break
        if text == "/reset":
            messages = list(start)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        seed += 1
        reply = chat_replies(model, tokenizer, [messages], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed)[0]
        print(f"assistant> {reply}")
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    from jsft import cli

    cli.run(main)
