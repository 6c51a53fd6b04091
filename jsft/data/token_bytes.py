"""Token offsets without the tokenizer's offset tracking, for byte-level BPE tokenizers (Llama 3, Qwen2.5).

Assistant masks need to know which tokens overlap the assistant's characters. The tokenizer can report every token's
character offsets, but tracking them costs about a sixth of its encoding time (`encode_batch` against
`encode_batch_fast`). For a byte-level BPE the offsets follow from the token ids alone: each token IS a run of the
text's bytes (its vocabulary string spells one byte per character), and an added token is its own text. So a token's
byte offsets are the running sum of its table length (`byte_lengths`).

That holds only where nothing adds or removes bytes between the text and the tokens: no normalizer (or NFC on text
that is already NFC), pre-tokenizers that keep every byte (ByteLevel without a prefix space, Split that keeps its
delimiters, Digits), no unknown token, no added token that swallows the whitespace around it, no post-processor that
trims whitespace off the offsets (transformers' masks follow the trimmed offsets). Every other tokenizer
gets None and the caller asks the tokenizer for the offsets. As a check, each row's token byte lengths must add up
to its text's UTF-8 length, else `token_offsets` gives None too.
"""

from __future__ import annotations

import json
import unicodedata
import weakref

import numpy as np

_NOT_A_TOKEN = -(1 << 40)  # an id outside the table: its row can never add up
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (vocab size, table or None)


def _keeps_every_byte(pre_tokenizer: dict | None) -> bool:
    kind = (pre_tokenizer or {}).get("type")
    if kind == "Sequence":
        return all(_keeps_every_byte(p) for p in pre_tokenizer["pretokenizers"])
    if kind == "ByteLevel":
        return not pre_tokenizer.get("add_prefix_space")
    if kind == "Split":
        return pre_tokenizer.get("behavior") != "Removed"
    return kind == "Digits"


def _trims_offsets(state) -> bool:
    """A post-processor that trims whitespace off token offsets (ByteLevel / RoBERTa `trim_offsets`): the tokenizer's
    offsets, which assistant masks follow, are then not the tokens' bytes."""
    if isinstance(state, dict):
        return bool(state.get("trim_offsets")) or any(_trims_offsets(v) for v in state.values())
    return isinstance(state, list) and any(_trims_offsets(v) for v in state)


def _state(component) -> dict | None:
    return None if component is None else json.loads(component.__getstate__())


def _table(tokenizer) -> np.ndarray | None:
    backend = tokenizer.backend_tokenizer
    normalizer, pre_tokenizer, model = _state(backend.normalizer), _state(backend.pre_tokenizer), _state(backend.model)
    post_processor = _state(backend.post_processor)
    byte_level = '"ByteLevel"' in json.dumps(pre_tokenizer)
    added = backend.get_added_tokens_decoder()
    if not (
        byte_level and _keeps_every_byte(pre_tokenizer)
        and (normalizer is None or normalizer.get("type") == "NFC")
        and model.get("type") == "BPE" and model.get("unk_token") is None
        and not any(token.lstrip or token.rstrip for token in added.values())
        and not _trims_offsets(post_processor)
    ):
        return None
    vocab = backend.get_vocab(with_added_tokens=False)
    table = np.full(max([*vocab.values(), *added, -1]) + 1, _NOT_A_TOKEN, dtype=np.int64)
    for token, i in vocab.items():
        table[i] = len(token)  # byte-level alphabet: one character per byte
    for i, token in added.items():
        table[i] = len(token.content.encode())
    return table


def byte_lengths(tokenizer) -> np.ndarray | None:
    """Per token id, how many bytes of the text the token stands for; None where the tokenizer is not a byte-level
    BPE that keeps every byte (module doc). Cached per tokenizer; rebuilt when tokens are added."""
    size = tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    cached = _TABLES.get(tokenizer)
    if cached is None or cached[0] != size:
        cached = (size, _table(tokenizer))
        _TABLES[tokenizer] = cached
    return cached[1]


def _normalizer_changes(tokenizer, text: str) -> bool:
    return tokenizer.backend_tokenizer.normalizer is not None and not unicodedata.is_normalized("NFC", text)


def token_offsets(tokenizer, ids: np.ndarray, lengths: np.ndarray, texts: list[str], spans: list):
    """(token byte offsets [n, 2], spans as byte offsets [m, 2]) of texts laid end to end: row k's offsets count from
    the first byte of texts[k], so all spans and tokens lie on one axis and overlap_mask takes them in one call.
    None where the table does not apply or a row's tokens do not add up to its text (the caller then asks the
    tokenizer for offsets)."""
    table = byte_lengths(tokenizer)
    if table is None or (len(ids) and int(ids.max()) >= len(table)):
        return None
    row_bytes, byte_spans, base = np.zeros(len(texts), dtype=np.int64), [], 0
    for k, (text, row_spans) in enumerate(zip(texts, spans)):
        if text.isascii():
            row_bytes[k] = len(text)
            byte_spans += [(base + a, base + b) for a, b in row_spans]
        else:
            if _normalizer_changes(tokenizer, text):
                return None
            row_bytes[k] = len(text.encode())
            byte_spans += [(base + len(text[:a].encode()), base + len(text[:b].encode())) for a, b in row_spans]
        base += int(row_bytes[k])
    ends = np.cumsum(table[ids])
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    cum = np.concatenate([[0], ends])
    if not np.array_equal(cum[bounds[1:]] - cum[bounds[:-1]], row_bytes):
        return None
    offsets = np.stack([ends - table[ids], ends], axis=1)
    return offsets, np.asarray(byte_spans, dtype=np.int64).reshape(-1, 2)
