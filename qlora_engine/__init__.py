"""qlora_engine: QLoRA fine-tuning on one GPU (or a CPU): NF4 base, LoRA adapters, exact export.

The Python API is the objects the `qlora` command uses:

    import qlora_engine as qe
    model = qe.load_model("SmolLM2-135M-Instruct")          # a directory or a hub id -> NF4 base
    tokenizer = qe.load_tokenizer("SmolLM2-135M-Instruct")
    result = qe.finetune(model=model, tokenizer=tokenizer, train_data=[{"prompt": ..., "completion": ...}],
                         max_steps=50, output_dir="runs/x")
    print(qe.generate_text(model, tokenizer, "What is ...?"))
    qe.export_merged("SmolLM2-135M-Instruct", "runs/x/adapter", "runs/x/merged")

Importing the package loads nothing: each name is imported on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# name -> module that defines it (relative to this package)
_API = {
    # models: a checkpoint directory or hub id -> a model with an NF4 base
    "load_model": "models.loader", "load_plain": "models.loader", "QuantSpec": "models.loader",
    "resolve_model": "models.hub", "load_tokenizer": "models.hub",
    # lora: adapters on any nn.Module, loralib's helpers, the PEFT format
    "add_lora": "lora.inject", "merge_lora": "lora.inject", "unmerge_lora": "lora.inject",
    "lora_state_dict": "lora.inject", "load_lora_state_dict": "lora.inject",
    "mark_only_lora_as_trainable": "lora.inject",
    "save_adapter": "lora.peft_format", "load_adapter": "lora.peft_format", "load_with_adapter": "lora.peft_format",
    # training
    "RunConfig": "train.config", "Recipe": "train.recipe", "finetune": "run",
    # planning
    "plan_run": "plan.solver",
    # out of the engine
    "export_merged": "export.merge", "quantize_checkpoint": "export.bnb4", "generate_text": "generate",
    "export_gguf": "export.gguf", "export_gguf_lora": "export.gguf_lora", "serve_app": "serve",
    # errors
    "QloraError": "errors", "InputError": "errors", "RunError": "errors",
}  # fmt: skip

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qlora_engine' has no attribute {name!r}")


def __dir__():
    return __all__
