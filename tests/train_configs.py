"""Tiny run configs for the train/checkpoint/export tests (fp32, a ~30k-param Llama, rows of 64 tokens)."""

from jsft.config import DataConfig, LoggingConfig, LoraConfig, ModelConfig, SFTConfig, TrainingConfig

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def tiny_config(tokenizer_dir, dataset, output_dir, **sections) -> SFTConfig:
    """8 devices (conftest) x 1 row per device = 8 rows per micro-batch."""
    config = SFTConfig(
        model=ModelConfig(tokenizer_name_or_path=str(tokenizer_dir), init_from_scratch=dict(TINY), dtype="float32",
                          compute_dtype="float32", remat_policy="none"),
        data=DataConfig(dataset_name=str(dataset), max_length=64, packing=True, padding_free=True),
        training=TrainingConfig(learning_rate=1e-2, per_device_train_batch_size=1, max_steps=6,
                                lr_scheduler_type="constant", loss_chunk_size=128, seed=0,
                                compilation_cache_dir="none"),  # jax keeps one cache per process: tests opt in
        lora=LoraConfig(),
        logging=LoggingConfig(output_dir=str(output_dir), logging_steps=1, save_steps=3, save_total_limit=2,
                              report_to=["jsonl"], disable_tqdm=True),
    )
    for section, values in sections.items():
        for name, value in values.items():
            setattr(getattr(config, section), name, value)
    return config


CONFIG_FILE = '''
import sys
sys.path.insert(0, {tests!r})
from train_configs import tiny_config
config = tiny_config({tokenizer!r}, {dataset!r}, {output!r}, **{sections!r})
'''


def write_config_file(path, tests_dir, tokenizer_dir, dataset, output_dir, **sections):
    """The same config as a configs/<name>.py file, for `python -m jsft.train --config` subprocesses."""
    path.write_text(CONFIG_FILE.format(tests=str(tests_dir), tokenizer=str(tokenizer_dir), dataset=str(dataset),
                                       output=str(output_dir), sections=sections))
    return path
