"""jsft: supervised fine-tuning of causal language models in JAX/Flax, with TRL's semantics.

    from jsft import SFTConfig, SFTTrainer, TrainerCallback     # the Python API (jsft.trainer)
"""

from jsft.callbacks import TrainerCallback
from jsft.config import SFTConfig
from jsft.trainer import SFTTrainer, TrainOutput

__all__ = ["SFTConfig", "SFTTrainer", "TrainerCallback", "TrainOutput"]
