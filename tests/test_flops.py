"""FLOPs per token, peak TFLOP/s and MFU: the counts match an HF Llama's weights and XLA's count of a compiled step."""

import jax
import numpy as np
import pytest

from jsft import flops as F


def test_matmul_params_counts_the_projection_weights_of_an_hf_llama():
    pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    expected = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n)
    assert F.matmul_params(cfg) == expected
    assert F.matmul_params(cfg.to_dict()) == expected
    seq = 10
    attention = 12 * 2 * 4 * 16 * seq
    assert F.flops_per_token(cfg, seq) == 6 * expected + attention


def test_effective_seq_len_sums_squares_of_document_lengths():
    assert F.effective_seq_len([[1, 1, 1, 2, 0, 0]]) == pytest.approx(2.5)
    assert F.effective_seq_len(np.ones((2, 8), np.int32)) == 8.0
    assert F.effective_seq_len([[0, 0]]) == 0.0


def test_peak_tflops_table_and_mfu():
    assert F.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert F.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert F.peak_tflops("NVIDIA H200") == 989.0
    assert F.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert F.peak_tflops("NVIDIA L40S") == 362.0
    assert F.peak_tflops("cpu") is None
    assert F.peak_tflops() is None  # the test machine is a CPU
    assert F.peak_tflops("cpu", override=100.0) == 100.0
    assert F.mfu(1000.0, 1e9, num_devices=2, peak=1.0) == pytest.approx(0.5)
    assert F.mfu(1000.0, 1e9, peak=None) is None


def test_model_flops_of_lora_count_no_frozen_weight_gradient():
    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    n, attention, adapters = F.matmul_params(cfg), F.attention_flops_per_token(cfg, 128), 22528
    assert attention == 12 * 2 * 4 * 16 * 128
    assert F.flops_per_token(cfg, 128) == 6 * n + attention  # full fine-tuning: the 6N convention
    lora = F.flops_per_token(cfg, 128, lora_params=adapters, frozen_params=F.lora_frozen_params(cfg))
    assert lora == 4 * n + 6 * adapters + attention
    with_head = F.flops_per_token(cfg, 128, lora_params=adapters, frozen_params=F.lora_frozen_params(cfg, True))
    assert with_head == lora + 2 * 64 * 512  # new token rows: the lm_head's weight gradient is computed
    assert F.hardware_flops_per_token(cfg, 128) == 6 * n + attention + 2 * 64 * 512  # logits recomputed
    assert F.hardware_flops_per_token(cfg, 128, remat="save_dots") == 6 * n + 4 / 3 * attention + 2 * 64 * 512


@pytest.mark.parametrize("mode,remat", [("full", "none"), ("lora", "full")])
def test_hardware_flops_match_xla_s_count_of_the_compiled_train_step(mode, remat):
    """jsft.step.train_step compiled for a tiny Llama (one 128-token document a row): XLA's cost analysis of the
    whole step (matmuls, elementwise, the optimizer) is within 3 % of hardware_flops_per_token, and a LoRA step
    executes far less than the 6N count would claim."""
    from flax import nnx

    from jsft import sharding, step
    from jsft.config import ShardingConfig, TrainingConfig
    from jsft.model.llama import Llama, LlamaConfig
    from jsft.model.lora import apply_lora
    from jsft.optim import make_optimizer, trainable_filter

    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
              intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
    length = 128
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)  # as jsft.sharding.create_mesh

    def make():
        # unrolled: XLA's cost analysis counts a scanned (while-loop) body once, not once per layer
        model = Llama(LlamaConfig.from_hf(hf), rngs=nnx.Rngs(0), attention_impl="xla", remat_policy=remat,
                      scan_layers=False)
        if mode == "lora":
            apply_lora(model, 8, 16.0, 0.0, rngs=nnx.Rngs(1))
        return model

    model = sharding.create_sharded_model(make, mesh)
    wrt = trainable_filter(lora=mode == "lora")
    tx, schedule = make_optimizer(TrainingConfig(learning_rate=1e-3), total_steps=10)
    optimizer = sharding.create_sharded_optimizer(model, tx, wrt, mesh)
    batch = dict(input_ids=np.zeros((1, 1, length), np.int32), segment_ids=np.ones((1, 1, length), np.int32),
                 positions=np.arange(length, dtype=np.int32)[None, None], targets=np.zeros((1, 1, length), np.int32),
                 loss_mask=np.ones((1, 1, length), bool))
    with jax.set_mesh(mesh):
        compiled = step.train_step.lower(model, optimizer, sharding.shard_batch(batch, mesh), loss_type="nll",
                                         chunk_size=length, schedule=schedule).compile()
    analysis = compiled.cost_analysis()
    xla_flops = (analysis[0] if isinstance(analysis, list) else analysis)["flops"] / length
    adapters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    counts = dict(lora_params=adapters, frozen_params=F.lora_frozen_params(hf)) if mode == "lora" else {}
    hardware = F.hardware_flops_per_token(hf, length, remat=remat, **counts)
    assert hardware == pytest.approx(xla_flops, rel=0.03)
    if mode == "lora":
        assert xla_flops < 0.85 * F.hardware_flops_per_token(hf, length, remat=remat, lora_params=adapters)
