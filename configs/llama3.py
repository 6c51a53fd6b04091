"""Llama-3-8B full fine-tune on one GPU node (8 x 80 GB): bf16, FSDP over all devices, BFD packing at 8192.

Set model.model_name_or_path to a local HF checkpoint directory (config.json + *.safetensors + tokenizer files),
e.g. the one `huggingface-cli download meta-llama/Meta-Llama-3-8B-Instruct --local-dir /models/llama3-8b-instruct`
writes; and data.dataset_name to your data (a .jsonl with `messages`, or any TRL format).

    python -m jsft.train --config configs/llama3.py --set model.model_name_or_path=/models/llama3-8b-instruct \
        --set data.dataset_name=/data/chat.jsonl
"""

from jsft.config import (DataConfig, LoggingConfig, ModelConfig, SFTConfig, ShardingConfig, TrainingConfig)

config = SFTConfig(
    model=ModelConfig(
        model_name_or_path="/models/llama3-8b-instruct",  # PLACEHOLDER: a local HF checkpoint directory
        dtype="bfloat16",
        compute_dtype="bfloat16",
        attention_impl="auto",  # cuDNN flash attention with packed segments on GPU
        remat_policy="full",
    ),
    data=DataConfig(
        dataset_name="/data/chat.jsonl",  # PLACEHOLDER: local data file or directory
        max_length=8192,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        assistant_only_loss=True,
    ),
    training=TrainingConfig(
        learning_rate=1e-5,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,  # 8 GPUs x 1 row x 4 = 32 rows of 8192 tokens a step
        num_train_epochs=1.0,
        warmup_ratio=0.03,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        master_weights_fp32=True,  # bf16 params, fp32 master copy in the (sharded) optimizer state
        loss_chunk_size=2048,
    ),
    sharding=ShardingConfig(mesh_shape={"data": 1, "fsdp": -1, "tensor": 1}),
    logging=LoggingConfig(output_dir="output/llama3-8b-sft", logging_steps=10, save_steps=500,
                          save_total_limit=2, export_formats=["full"]),
)
