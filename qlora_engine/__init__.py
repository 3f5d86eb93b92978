"""qlora_engine: QLoRA fine-tuning on one GPU (or a CPU): NF4 base, LoRA adapters, exact export."""

__version__ = "0.1.0"
