"""LoRA: the adapted layers (`layers`: the shared base, Embedding and Conv; `linear`: the linear
layer with its fused autograd), putting them into any model and loralib's helpers (`inject`), and
the PEFT on-disk format with models rebuilt from it (`peft_format`).
May import: `quant`, `models`.
"""

from .inject import add_lora, lora_layers, lora_state_dict, mark_only_lora_as_trainable, merge_lora, unmerge_lora
from .layers import LoraConv, LoraEmbedding, LoraLayer, lora_scaling
from .linear import LoraLinear

__all__ = ["LoraConv", "LoraEmbedding", "LoraLayer", "LoraLinear", "add_lora", "lora_layers", "lora_scaling",
           "lora_state_dict", "mark_only_lora_as_trainable", "merge_lora", "unmerge_lora"]
