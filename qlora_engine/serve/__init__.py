"""Serving many LoRA adapters from one base over an OpenAI-compatible HTTP API (`qlora serve`).

The base is loaded once (NF4, or bf16); adapters are loaded and unloaded by name while requests run.
Requests are batched continuously, and one forward serves rows that use different adapters:
`multi_lora` (the per-row adapted linear layer), `adapters` (the registry: read, check, install,
remove), `kv_cache` (a cache per sequence, attention per row), `sampling`, `detokenize` (text and
stop strings as tokens arrive), `engine` (the scheduler thread), `app` (the FastAPI routes).
May import: `errors`, `quant`, `models`, `lora`, `generate`.
"""

from __future__ import annotations

from pathlib import Path


def build(model: str | Path, adapters: list[tuple[str, str]] = (), base: str = "nf4", device="cpu",
          max_batch: int = 32, base_name: str | None = None, shutdown_timeout: float = 30.0,
          engine_thread: bool = True):  # fmt: skip
    """(FastAPI app, app.Server) serving `model` (a directory or hub id) with `adapters`
    [(name, directory)]; a one-line InputError for a model or adapter that cannot be served.
    The engine thread starts with the app (its lifespan); with `engine_thread=False` the caller
    runs `server.engine.run()` on a thread of its choosing (`qlora serve`: the main one)."""
    import time

    import torch

    from ..models.hub import load_tokenizer, resolve_model
    from ..models.loader import BASE_DTYPE, QuantSpec, load_dense, load_model
    from .adapters import AdapterRegistry
    from .app import Server, build_app
    from .engine import Engine
    from .kv_cache import context_length

    model_dir = resolve_model(model)
    quant = QuantSpec()
    m = load_model(model_dir, device, quant=quant) if base == "nf4" else load_dense(model_dir, device)
    m.eval()
    tokenizer = load_tokenizer(model_dir)
    name = base_name or str(model)
    registry = AdapterRegistry(m, name, base, quant, BASE_DTYPE)
    with torch.no_grad():
        for adapter_name, path in adapters:
            registry.install(registry.prepare(adapter_name, path), int(time.time()))
    engine = Engine(m, tokenizer, registry, max_batch=max_batch)
    server = Server(engine, registry, tokenizer, name, context_length(m), str(model_dir))
    return build_app(server, shutdown_timeout, engine_thread), server


serve_app = build  # its name in the Python API (`qlora_engine.serve_app`); run it with uvicorn.run(app)
