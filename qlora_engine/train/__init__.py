"""Training: the knobs (`config`), data to packed rows (`data`), the chunked loss (`loss`) and the
eval built on it (`evaluate`), varlen attention for packed rows (`attention`), per-layer
recomputation (`recompute`), optimizers and schedule (`optim`), resumable checkpoints
(`checkpoint`), and the loop itself as a recipe (`recipe`).
May import: `quant`, `models`, `lora`, datasets, transformers, accelerate, bitsandbytes.
Never imports `plan`: choosing "auto" settings is done before a recipe runs (`qlora_engine.run`).
"""
