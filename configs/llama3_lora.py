"""Llama-3-8B LoRA on a single GPU (80 GB): bf16 frozen base, fp32 adapters on every linear layer.

Set model.model_name_or_path to a local HF checkpoint directory (config.json + *.safetensors + tokenizer files):

    python -m jsft.train --config configs/llama3_lora.py --set model.model_name_or_path=/models/llama3-8b-instruct \
        --set data.dataset_name=/data/chat.jsonl
    python -m jsft.export --config configs/llama3_lora.py --format merged     # or adapter (the default export)
"""

from jsft.config import (DataConfig, LoggingConfig, LoraConfig, ModelConfig, SFTConfig, ShardingConfig,
                         TrainingConfig)

config = SFTConfig(
    model=ModelConfig(
        model_name_or_path="/models/llama3-8b-instruct",  # PLACEHOLDER: a local HF checkpoint directory
        dtype="bfloat16",
        compute_dtype="bfloat16",
        attention_impl="auto",
        remat_policy="full",
    ),
    data=DataConfig(
        dataset_name="/data/chat.jsonl",  # PLACEHOLDER: local data file or directory
        max_length=4096,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        assistant_only_loss=True,
    ),
    training=TrainingConfig(
        learning_rate=1e-4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        num_train_epochs=1.0,
        warmup_ratio=0.03,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        loss_chunk_size=2048,
    ),
    lora=LoraConfig(use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target_modules="all-linear"),
    sharding=ShardingConfig(mesh_shape={"data": -1, "fsdp": 1, "tensor": 1}),
    logging=LoggingConfig(output_dir="output/llama3-8b-lora", logging_steps=10, save_steps=500, save_total_limit=2,
                          export_formats=["adapter", "merged"]),
)
