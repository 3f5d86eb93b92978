"""Out of the engine: an adapter merged exactly onto the weights it was trained on and written as a
16-bit checkpoint (`merge`), its fidelity report (`report`), and checkpoints in bitsandbytes'
4-bit format (`bnb4`: `qlora quantize`, `export --quantize`). `python -m qlora_engine.export` is
`qlora export`.
May import: `quant`, `models`, `lora`, `train.evaluate` (the shared NLL).
"""
