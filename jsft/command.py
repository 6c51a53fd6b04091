"""The `jsft` command: `jsft train`, `jsft export`, `jsft chat`, each exactly `python -m jsft.<command>`.

    jsft train --config configs/llama3.py
    jsft train --config sft.yaml --learning_rate 1e-4 --max_length 4096 --packing
    jsft train --model_name_or_path ./Llama-3.2-1B --dataset_name ./chat.jsonl --use_peft   (like `trl sft`)
    jsft export --config configs/llama3.py --format merged
    jsft chat --model output/export
"""

from __future__ import annotations

import runpy
import sys

COMMANDS = {"train": "jsft.train", "export": "jsft.export", "chat": "jsft.chat"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        first = f"unknown command {argv[0]!r}. " if argv and argv[0] not in ("-h", "--help") else ""
        print(f"{first}usage: jsft {{{','.join(COMMANDS)}}} [options]  (jsft <command> --help for its options)\n"
              + __doc__.split("\n\n")[1], file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module = COMMANDS[argv[0]]
    sys.argv = [f"jsft {argv[0]}", *argv[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)  # the module's own entry: same exit statuses


if __name__ == "__main__":
    main()
