"""The Llama family model (llama.py), packed attention (attention.py) and LoRA (lora.py)."""

from jsft.model.llama import Llama, LlamaConfig, ModelConfigError
from jsft.model.lora import apply_lora, merge_lora

__all__ = ["Llama", "LlamaConfig", "ModelConfigError", "apply_lora", "merge_lora"]
