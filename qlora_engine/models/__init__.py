"""Models in and out of their files: resolving a directory or hub id (`hub`), the bundled default
model (`default_model`), safetensors read and written one tensor at a time (`tensorfiles`), the
structure walkers (`structure`: decoder blocks, linear layers, tensor owners), the streaming 4-bit
loader (`loader`), and random-weight checkpoints of any shape for tests and benchmarks
(`synthetic`).
May import: `quant`, transformers, accelerate, huggingface_hub.
"""
