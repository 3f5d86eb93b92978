"""The decoder blocks' weights during training: whether the layer weight pipeline runs and whether
the NF4 base lives in host memory (`weight_pipeline`, `offload_base`), the loader's placer for an
offloaded base, and the pipeline (`quant.pipeline.WeightPipeline`) put on the model's decoder blocks.

"auto" is the memory plan's decision. The trainer never imports the planner: `plan.memory`
registers its decision function here when it is imported (`run.finetune` imports it before a
run), and a recipe asks it with the run's settings, its model and its GPU. Without a planner, or on the
CPU, "auto" is off. Under FSDP both are off (FSDP gathers each block itself). Touches torch,
`quant.pipeline`, `models.loader` (the placer) and `models.structure` (the blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..lora.inject import lora_layers
from ..machine import fmt_bytes
from ..models.loader import Placer
from ..models.structure import decoder_layers
from ..quant.linear import NF4Linear
from ..quant.pipeline import PARTS, WeightPipeline, block_loads

SLOTS = 2  # the pipeline's double buffer: one block computing, the next loading
# (cfg, model source, device, processes) -> (pipeline, offload, one line saying why)
Planner = Callable[[object, object, torch.device, int], tuple[bool, bool, str]]
_planner: list[Planner] = []


def register_planner(fn: Planner) -> None:
    """The memory planner's decision for "auto" (set by `plan.solver` on import)."""
    _planner[:] = [fn]


@dataclass
class Weights:
    """What a run does with its base weights: `pipeline`, `offload`, and the line that says why."""

    pipeline: bool
    offload: bool
    why: str
    device: torch.device
    quiet: bool = False  # nothing worth a line: the CPU's default
    seed: int | None = None  # add_lora's seed: adapters an offloaded base left on the host are drawn again with it
    pipe: WeightPipeline | None = field(default=None, repr=False)

    def __post_init__(self):
        self.device = on_device(self.device)

    @property
    def placer(self) -> Placer | None:
        """The loader's placer: NF4 block weights straight to (pinned) host memory when offloaded."""
        return OffloadPlacer(self.device) if self.offload else None

    def attach(self, model: nn.Module) -> str | None:
        """Put the pipeline on the model's decoder blocks; returns the line that reports it (None when off)."""
        if not self.pipeline:
            return None if self.quiet else f"weight pipeline: off ({self.why})"
        _, blocks = decoder_layers(model)
        if not any(isinstance(m, NF4Linear) for m in blocks.modules()):
            self.pipeline = self.offload = False
            return "weight pipeline: off (the model's blocks hold no NF4 layers)"
        dtype = compute_dtype(model, self.device)
        if self.offload:
            adapters_to_device(model, self.device, self.seed)
        self.pipe = WeightPipeline(blocks, self.device, dtype, offload=self.offload, slots=SLOTS).hook_blocks()
        n = len(blocks)
        row = fmt_bytes(self.pipe.buffer[0].numel() * self.pipe.buffer.element_size())
        kind = str(dtype).replace("torch.", "")
        line = (f"weight pipeline: on ({self.why}); {self.pipe.slots} x {row} {kind} buffer (the largest block), "
                f"{block_loads(n)} block loads per forward + backward of {n} blocks")
        if self.offload:
            line += (f"; base offloaded: {fmt_bytes(self.pipe.host_bytes())} of NF4 weights in "
                     f"{'pinned ' if self.device.type == 'cuda' else ''}host memory, copied one block ahead")
        return line


def adapters_to_device(model: nn.Module, device: torch.device, seed: int | None) -> None:
    """`add_lora` creates each adapter beside its base layer, so an offloaded base (loaded through
    `OffloadPlacer`) leaves them on the host. Draw them again on the device, as add_lora would have
    there (seeded, in the same order, from the device's generator; the CPU generator ends as it
    would), so an offloaded run starts where a resident one does."""
    device = on_device(device)
    layers = lora_layers(model)
    if all(p.device == device for layer in layers.values() for p in layer.parameters(recurse=False)):
        return
    if seed is not None:
        torch.manual_seed(seed)
    for layer in layers.values():
        a, b = layer.initial_values(device) if seed is not None else (layer.lora_A.detach(), layer.lora_B.detach())
        layer.lora_A = nn.Parameter(a.to(device, layer.lora_A.dtype))
        layer.lora_B = nn.Parameter(b.to(device, layer.lora_B.dtype))


def on_device(device) -> torch.device:
    """`device` with its index ("cuda" -> "cuda:0"), so that it compares equal to a tensor's."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def compute_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype the blocks' matmuls see: bf16 under CUDA autocast (`evaluate.autocast`), else the base's own."""
    if device.type == "cuda":
        return torch.bfloat16
    layer = next((m for m in model.modules() if isinstance(m, NF4Linear)), None)
    return layer.weight_dtype if layer is not None else torch.bfloat16


def resolve(cfg, model_source, device: torch.device, fsdp: bool = False, processes: int = 1) -> Weights:
    """The run's choice for `cfg.weight_pipeline` and `cfg.offload_base` (True / False / "auto") on
    `device`; `model_source` is what the planner reads the shape from (a checkpoint directory or a
    config). Explicit values are honoured where they can run; "auto" asks the registered planner."""
    pipe, off = cfg.weight_pipeline, cfg.offload_base
    asked, quiet = pipe is True or off is True, False
    if fsdp:
        return Weights(False, False, "under FSDP, which gathers each block itself; weight_pipeline / offload_base "
                       "true is ignored", device, quiet=not asked)  # fmt: skip
    if cfg.base != "nf4":
        return Weights(False, False, f"the base is {cfg.base}, not NF4; weight_pipeline / offload_base true is ignored",
                       device, quiet=not asked)  # fmt: skip
    if "auto" in (pipe, off):
        if device.type != "cuda":
            pipe, off = pipe is True or off is True, off is True
            why = "auto: off on the CPU, where nothing computes beside the dequantize"
            quiet = not pipe
        elif _planner:
            planned_pipe, planned_off, why = _planner[0](cfg, model_source, device, processes)
            pipe = planned_pipe if pipe == "auto" else pipe
            off = planned_off if off == "auto" else off
            pipe = pipe or off
        else:
            pipe, off = pipe is True or off is True, off is True
            why = "auto: no memory plan was made (set weight_pipeline / offload_base true to force)"
    else:
        why, quiet = "set in the config", not pipe
    return Weights(bool(pipe), bool(off), why, device, quiet, cfg.seed)


class OffloadPlacer(Placer):
    """The loader's placer for an offloaded base: each decoder-block NF4 layer goes to (pinned)
    host memory as soon as it is quantized, so the GPU never holds the whole base; everything
    else goes to the device."""

    def quantized(self, layer: NF4Linear, name: str, packed: torch.Tensor, state) -> None:
        pin = self.device.type == "cuda"
        host = lambda t: None if t is None else (t.to("cpu").pin_memory() if pin else t.to("cpu"))  # noqa: E731
        layer.set_quantized(host(packed), state.to("cpu"))
        for part in PARTS[1:]:
            setattr(layer, part, host(getattr(layer, part)))

    def finish(self, model: nn.Module) -> None:
        for mod in model.modules():
            held = PARTS if isinstance(mod, NF4Linear) else ()
            for name, buf in list(mod._buffers.items()):
                if buf is not None and buf.device != self.device and name not in held:
                    mod._buffers[name] = buf.to(self.device)
