"""The memory planner: says before a run whether it fits, and picks batch size, sequence length or
rank. `shapes` (any model description -> a ModelShape; one block's activations), `presets` (the
built-in model table), `gpus` (the GPU table), `memory` (the byte-level model of one training step,
fed by the engine's own code where it can be), `solver` (the largest setting that fits; the calls
a run makes before and after training). `python -m qlora_engine.plan` is `qlora plan`.
May import: `train` (config, optim names, the loss), `models`, `lora`, transformers (meta only).
"""
