"""Out of the engine: an adapter merged exactly onto the weights it was trained on and written as a
16-bit checkpoint (`merge`), its fidelity report (`report`), checkpoints in bitsandbytes'
4-bit format (`bnb4`: `qlora quantize`, `export --quantize`), and GGUF for llama.cpp / Ollama
(`gguf`: the merged model; `gguf_lora`: the adapter alone; `gguf_vocab`: the tokenizer; `kquants`:
Q4_K/Q6_K; `llamacpp`: the check in llama.cpp itself, when llama-cpp-python is installed).
`python -m qlora_engine.export` is `qlora export`.
May import: `quant`, `models`, `lora`, `train.evaluate` (the shared NLL).
"""

# --format gguf's tensor types (`gguf.py`); here so that the CLI's parser imports nothing heavy
GGUF_TYPES = ("bf16", "f16", "q8_0", "q4_0", "q4_k_m")
