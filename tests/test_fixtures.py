"""The fixture builder is deterministic and builds what it was asked for."""

import filecmp
import json

import numpy as np

from jsft import fixtures


def test_two_builds_are_byte_identical(tmp_path):
    for build in ("a", "b"):
        fixtures.build_tokenizer(tmp_path / build / "tokenizer")
        fixtures.build_datasets(tmp_path / build / "data", n_train=300, n_test=30)
    names = ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
    names += [f"data/{kind}{split}.jsonl" for kind in fixtures.FORMATS for split in ("", "_test")]
    for name in names:
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name


def test_tokenizer_has_special_tokens_and_generation_template(tokenizer):
    assert tokenizer.eos_token == fixtures.EOS and tokenizer.pad_token == fixtures.PAD
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    messages = [{"role": "user", "content": "spell: 1 2"}, {"role": "assistant", "content": "one two"}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(trained) == "one two<|im_end|>"


def test_bos_tokenizer_prepends_bos_once(bos_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    ids = tok("spell: 3").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_rows_follow_the_rule_and_lengths_are_long_tailed(data_dir, tokenizer):
    rows = [json.loads(line) for line in open(data_dir / "messages.jsonl")]
    assert len(rows) == 2000
    for row in rows[:200]:
        for user, assistant in zip(row["messages"][-2::-2], row["messages"][-1::-2]):
            question = user["content"].splitlines()[-1]
            kind, _, arg = question.partition(": ")
            if kind == "spell":
                assert assistant["content"] == " ".join(fixtures.DIGIT_WORDS[int(d)] for d in arg.split())
            else:
                assert assistant["content"] == " ".join(str(fixtures.DIGIT_WORDS.index(w)) for w in arg.split())
    lengths = np.array([len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
                        for r in rows[:500]])
    assert lengths.min() < 40 and np.median(lengths) < 200 and lengths.max() > 1024
    train = {json.dumps(r) for r in rows}
    test = [json.loads(line) for line in open(data_dir / "messages_test.jsonl")]
    assert len(test) == 200 and sum(json.dumps(r) in train for r in test) < 20  # another seed; short rows repeat by chance


def test_checkpoint_loads_in_transformers_with_the_requested_config(make_checkpoint):
    import torch
    import transformers

    path = make_checkpoint("tied_gqa4", tie_word_embeddings=True, num_key_value_heads=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    config = model.config
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert config.num_key_value_heads == 1 and config.tie_word_embeddings and config.vocab_size == 384
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(torch.tensor([[3, 4, 5]])).logits
    assert logits.shape == (1, 3, 384) and torch.isfinite(logits).all()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
