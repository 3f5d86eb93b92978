"""Activation recomputation ("gradient checkpointing") per decoder layer, with an option to keep
the saved layer inputs in pinned host memory instead of on the GPU.

Each decoder layer runs without autograd in the forward pass; only its input is kept. In the
backward pass the layer is run again, with the RNG and the autocast settings as they were (so LoRA
dropout masks repeat and every op runs in the same dtype), and backpropagated. Works on any model whose decoder blocks `models.structure.decoder_layers` finds.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.structure import decoder_layers


class _Offloaded:
    """A tensor copied to pinned host memory on a side stream; `get()` brings it back."""

    stream: torch.cuda.Stream | None = None

    def __init__(self, t: torch.Tensor):
        if _Offloaded.stream is None:
            _Offloaded.stream = torch.cuda.Stream(t.device)
        self.device, self.requires_grad = t.device, t.requires_grad
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        side = _Offloaded.stream
        side.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(side):
            self.host.copy_(t, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(side)
        t.record_stream(side)  # the allocator must not reuse t before the copy has read it

    def get(self) -> torch.Tensor:
        torch.cuda.current_stream(self.device).wait_event(self.done)
        return self.host.to(self.device, non_blocking=True)


def _autocast_state(device_type: str) -> dict:
    enabled = torch.is_autocast_enabled(device_type)
    return {"enabled": enabled, "dtype": torch.get_autocast_dtype(device_type),
            "cache_enabled": torch.is_autocast_cache_enabled()}


class _Recompute(torch.autograd.Function):
    """out = layer(x) with nothing of the layer saved but x (or its host copy) and the RNG states.

    Backward: recompute out = layer(x) with grad enabled and the saved RNG states, then
    backpropagate dL/dout through it; returns dL/dx. The LoRA parameters inside receive their
    gradients from that inner backward. `anchor` requires grad so that backward runs even when x
    does not (the first layer's input comes from a frozen embedding).
    """

    @staticmethod
    def forward(ctx, run, offload, anchor, x):
        ctx.run = run
        # The backward runs outside the caller's autocast region: replay the forward's settings.
        ctx.autocast = _autocast_state(x.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        with torch.no_grad():
            out = run(x)
        if offload and x.is_cuda:
            ctx.offloaded = _Offloaded(x.detach())
        else:
            ctx.offloaded = None
            ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x = ctx.offloaded.get() if ctx.offloaded is not None else ctx.saved_tensors[0]
        x = x.detach().requires_grad_(True)
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            with torch.enable_grad(), torch.autocast(x.device.type, **ctx.autocast):
                out = ctx.run(x)
        torch.autograd.backward(out, grad_out)
        return None, None, None, x.grad


def enable(model: nn.Module, offload: bool = False) -> int:
    """Recompute every decoder layer in backward; returns the number of layers wrapped."""
    _, layers = decoder_layers(model)
    anchor = torch.zeros((), requires_grad=True)
    for layer in layers:
        if getattr(layer, "_qlora_recompute", None) is not None:
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, _layer=layer, **kwargs):
            if not (_layer.training and torch.is_grad_enabled()):
                return _inner(*args, **kwargs)
            x = args[0] if args else kwargs.pop("hidden_states")
            rest = args[1:]
            kwargs["use_cache"] = False
            kwargs.pop("past_key_values", None)
            extra = {}

            def run(h):
                out = _inner(h, *rest, **kwargs)
                if isinstance(out, tuple):
                    extra["tail"] = out[1:]
                    return out[0]
                return out

            y = _Recompute.apply(run, offload, anchor, x)
            return (y, *extra["tail"]) if "tail" in extra else y

        layer._qlora_recompute = inner
        layer.forward = forward
    return len(layers)


def disable(model: nn.Module) -> None:
    _, layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, "_qlora_recompute", None) is not None:
            del layer.forward  # the instance attribute set by enable(); the class's forward shows again
            layer._qlora_recompute = None
