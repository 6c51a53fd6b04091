"""The demo: fine-tune a tiny random Llama on the bundled spell/digits chat task, on CPU, with no download.

Builds (once, cached in output/demo_fixtures_8k) a byte-level BPE tokenizer and the chat datasets from
jsft.fixtures, then trains with assistant-only loss and BFD packing. `python -m jsft.demo --config configs/demo.py`
(scripts/demo.sh) shows the held-out exact-match accuracy before and after too (jsft.demo); `jsft train --config
configs/demo.py` just trains.
"""

from pathlib import Path

from jsft import fixtures
from jsft.config import (DataConfig, LoggingConfig, ModelConfig, SFTConfig, ShardingConfig, TrainingConfig)

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "output" / "demo_fixtures_8k"  # built once; output*/ is git-ignored
if not (CACHE / "tokenizer" / "tokenizer.json").exists():
    fixtures.build_tokenizer(CACHE / "tokenizer")
if not (CACHE / "data" / "messages_test.jsonl").exists():
    fixtures.build_datasets(CACHE / "data", n_train=8000)  # enough rows that 400 steps never repeat one

config = SFTConfig(
    model=ModelConfig(
        tokenizer_name_or_path=str(CACHE / "tokenizer"),
        init_from_scratch=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                               num_key_value_heads=8, max_position_embeddings=512, rms_norm_eps=1e-5,
                               rope_theta=10000.0, tie_word_embeddings=False),
        dtype="float32",
        compute_dtype="float32",
        remat_policy="none",
    ),
    data=DataConfig(
        dataset_name=str(CACHE / "data" / "messages.jsonl"),
        dataset_test_split=str(CACHE / "data" / "messages_test.jsonl"),
        max_length=128,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        assistant_only_loss=True,
    ),
    training=TrainingConfig(
        learning_rate=3e-3,
        per_device_train_batch_size=16,
        max_steps=700,
        warmup_ratio=0.05,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        loss_chunk_size=512,
        seed=0,
    ),
    sharding=ShardingConfig(mesh_shape={"data": -1}),
    logging=LoggingConfig(
        output_dir=str(ROOT / "output" / "demo"),
        logging_steps=10,
        eval_steps=200,
        save_steps=200,
        save_total_limit=1,
        resume_from_checkpoint=False,
        num_eval_generations=2,
    ),
)
