"""jsft.data.token_bytes: token offsets from the ids of a byte-level BPE give the tokenizer's own assistant masks, and
every tokenizer where they would not is refused (None), so its masks come from the tokenizer's offsets."""

import numpy as np
import pytest

from jsft.data import batched, token_bytes

PIECES = ["ab", "cd", " ", "é", "😀", "x", "q", "\n", "  ", "<|im_end|>", "hello", " world", "12345", "e\u0301"]


def random_texts_and_spans(seed=0, n=300, pieces=PIECES):
    """Texts with multi-byte characters split over byte tokens, special tokens and digits; spans that start and end
    anywhere (inside tokens, inside characters), empty spans included."""
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(pieces, size=rng.integers(0, 40))) for _ in range(n)]
    spans = []
    for text in texts:
        cuts = np.sort(rng.choice(len(text) + 1, size=2 * rng.integers(0, 4), replace=True))
        spans.append([(int(a), int(b)) for a, b in cuts.reshape(-1, 2)])
    return texts, spans


def fast_and_reference_masks(tokenizer, texts, spans):
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    lengths = np.array([len(e) for e in encodings], dtype=np.int64)
    ids = np.array([i for e in encodings for i in e.ids], dtype=np.int64)
    want = batched._assistant_mask(encodings, spans, lengths)  # from the tokenizer's offsets
    on_one_axis = token_bytes.token_offsets(tokenizer, ids, lengths, texts, spans)
    got = None if on_one_axis is None else batched.overlap_mask(*on_one_axis)
    return got, want


def hf_tokenizer(backend, specials=("<|im_end|>",)):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=list(specials))


def byte_level_bpe(pre_tokenizer=None, normalizer=None, unk=None, lstrip=False, post_processor=None):
    """A small byte-level BPE trained here; Llama-3-like pre-tokenizer by default (regex Split, then ByteLevel)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    if normalizer is not None:
        tok.normalizer = normalizer
    if post_processor is not None:
        tok.post_processor = post_processor
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[unk] if unk else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world ab cd é 😀 12345 x q", "assistant\n    return x\n        return y"] * 50,
                            trainer=trainer)
    tok.add_special_tokens([AddedToken("<|im_end|>", lstrip=lstrip, special=True)])
    return hf_tokenizer(tok)


def test_fixture_tokenizer_offsets_from_ids_give_the_tokenizers_masks(tokenizer):
    texts, spans = random_texts_and_spans()
    got, want = fast_and_reference_masks(tokenizer, texts, spans)
    assert got is not None  # the fixture tokenizer takes the fast path
    np.testing.assert_array_equal(got, want)
    assert want.any() and not want.all()


def test_llama3_like_pre_tokenizer_takes_the_fast_path_with_the_same_masks():
    texts, spans = random_texts_and_spans(seed=1)
    got, want = fast_and_reference_masks(byte_level_bpe(), texts, spans)
    assert got is not None
    np.testing.assert_array_equal(got, want)


def _refused_tokenizers():
    from tokenizers import Regex, normalizers, pre_tokenizers, processors

    return {
        "prefix_space": lambda: byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=True)),
        "split_removes": lambda: byte_level_bpe(pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\s+"), behavior="removed"), pre_tokenizers.ByteLevel(use_regex=False)])),
        "lowercase": lambda: byte_level_bpe(normalizer=normalizers.Lowercase()),
        "unknown_token": lambda: byte_level_bpe(unk="<unk>"),
        "lstrip_added_token": lambda: byte_level_bpe(lstrip=True),
        "metaspace": lambda: byte_level_bpe(pre_tokenizers.Metaspace()),
        "trimmed_offsets": lambda: byte_level_bpe(post_processor=processors.ByteLevel(trim_offsets=True)),
        "trimmed_in_a_sequence": lambda: byte_level_bpe(post_processor=processors.Sequence([
            processors.ByteLevel(trim_offsets=True)])),
    }


@pytest.mark.parametrize("kind", list(_refused_tokenizers()))
def test_tokenizers_whose_tokens_are_not_the_texts_bytes_are_refused(kind):
    tokenizer = _refused_tokenizers()[kind]()
    assert token_bytes.byte_lengths(tokenizer) is None
    texts, spans = random_texts_and_spans(seed=2, n=20)
    got, _ = fast_and_reference_masks(tokenizer, texts, spans)
    assert got is None


def test_nfc_normalizer_is_fast_on_nfc_text_and_refused_on_other_text():
    from tokenizers import normalizers

    tokenizer = byte_level_bpe(normalizer=normalizers.NFC())
    nfc, nfc_spans = random_texts_and_spans(seed=3, pieces=[p for p in PIECES if p != "e\u0301"])
    got, want = fast_and_reference_masks(tokenizer, nfc, nfc_spans)
    assert got is not None
    np.testing.assert_array_equal(got, want)
    texts, spans = random_texts_and_spans(seed=3)
    assert any("e\u0301" in t for t in texts)  # NFC composes these: the ids no longer spell the text's bytes
    got, _ = fast_and_reference_masks(tokenizer, texts, spans)
    assert got is None


def test_rows_whose_tokens_do_not_add_up_are_refused(tokenizer):
    texts, spans = ["hello world", "ab cd"], [[(0, 5)], [(1, 2)]]
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    lengths = np.array([len(e) for e in encodings], dtype=np.int64)
    ids = np.array([i for e in encodings for i in e.ids], dtype=np.int64)
    assert token_bytes.token_offsets(tokenizer, ids, lengths, texts, spans) is not None
    assert token_bytes.token_offsets(tokenizer, ids, lengths, ["hello world!", "ab cd"], spans) is None
    ids[0] = len(tokenizer) + 5  # an id past the table
    assert token_bytes.token_offsets(tokenizer, ids, lengths, texts, spans) is None


def test_the_table_is_rebuilt_when_tokens_are_added(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    before = token_bytes.byte_lengths(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool_call|>"]})
    after = token_bytes.byte_lengths(tokenizer)
    assert len(after) == len(before) + 1 and after[-1] == len("<|tool_call|>")
    texts, spans = ["a <|tool_call|> é b"], [[(2, 16)]]
    got, want = fast_and_reference_masks(tokenizer, texts, spans)
    np.testing.assert_array_equal(got, want)


def test_a_chunk_whose_rows_do_not_add_up_gets_its_masks_from_the_tokenizers_offsets():
    """End to end through examples.prepare_examples: NFC recomposes 'e' + combining accent, so the fast path refuses the
    chunk and the masks come from a second encode with offsets; they equal apply_chat_template's, row by row."""
    from tokenizers import normalizers

    from jsft import fixtures
    from jsft.config import DataConfig
    from jsft.data import examples

    tokenizer = byte_level_bpe(normalizer=normalizers.NFC())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                                  "eos_token": "<|im_end|>"})
    tokenizer.chat_template = fixtures.CHATML_TEMPLATE
    rows = [{"messages": [{"role": "user", "content": f"cafe\u0301 {k}"},
                          {"role": "assistant", "content": f"ok e\u0301 {k} 😀"}]} for k in range(6)]
    config = DataConfig(assistant_only_loss=True, max_length=None)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    ids = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    flat = np.array([i for e in ids for i in e.ids])
    lengths = np.array([len(e) for e in ids])
    assert token_bytes.byte_lengths(tokenizer) is not None
    assert token_bytes.token_offsets(tokenizer, flat, lengths, texts, [[] for _ in texts]) is None
    got = examples.prepare_examples(rows, tokenizer, config)
    for k, row in enumerate(rows):
        want = tokenizer.apply_chat_template(row["messages"], return_dict=True, return_assistant_tokens_mask=True)
        np.testing.assert_array_equal(got[k]["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got[k]["loss_mask"], np.asarray(want["assistant_masks"], dtype=bool))
        assert got[k]["loss_mask"].any()


def test_a_post_processor_that_trims_offsets_keeps_the_tokenizers_masks():
    """GPT-2 style ByteLevel with trim_offsets=True: the tokenizer's offsets leave out a token's spaces, so the token
    '\\n   ' that opens indented code is not in the assistant mask apply_chat_template gives (nor TRL's); the batched
    path must give the same mask."""
    from tokenizers import pre_tokenizers, processors

    from jsft import fixtures
    from jsft.config import DataConfig
    from jsft.data import examples

    tokenizer = byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                               post_processor=processors.ByteLevel(trim_offsets=True))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                                  "eos_token": "<|im_end|>"})
    tokenizer.chat_template = fixtures.CHATML_TEMPLATE
    rows = [{"messages": [{"role": "user", "content": "code"},
                          {"role": "assistant", "content": f"    return x + {k}"}]} for k in range(4)]
    config = DataConfig(assistant_only_loss=True, max_length=None)
    got = examples.prepare_examples(rows, tokenizer, config)
    for k, row in enumerate(rows):
        want = tokenizer.apply_chat_template(row["messages"], return_dict=True, return_assistant_tokens_mask=True)
        np.testing.assert_array_equal(got[k]["loss_mask"], np.asarray(want["assistant_masks"], dtype=bool))
