"""The data path: rows -> examples (formats, templates) -> packed rows -> batches."""

from jsft.data.examples import prepare_example
from jsft.data.formats import BadRowError, read_jsonl
from jsft.data.packing import pack
from jsft.data.templates import load_tokenizer

__all__ = ["BadRowError", "load_tokenizer", "pack", "prepare_example", "read_jsonl"]
