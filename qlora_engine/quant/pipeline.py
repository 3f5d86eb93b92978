"""The layer weight pipeline: each block's NF4 weights dequantized once into a reused buffer, one
block ahead of the compute, and (with offload) the packed weights kept in host memory and copied
over one block ahead.

A `WeightPipeline` takes the blocks of a model in execution order (any nn.Modules holding
`NF4Linear` layers; the caller finds them, this package knows no model structure) and a buffer of
`slots` (2: a double buffer) rows, each as large as the largest block's weights in the compute
dtype. Block j always goes to slot j % slots, tagged with j. While block i computes, block i + 1
(forward) or i - 1 (backward) is dequantized into the other slot: on CUDA on a side stream, ordered
by events; elsewhere synchronously, the same code. A block's recompute and its backward run back to
back, so they share one dequantize (and the last two blocks of the forward are still there when the
backward starts, as are the first two when the next forward starts).

Each `NF4Linear` of a block gets `layer.pipeline = self`; its matmuls then ask `weight(layer, x)`
for a view of its dequantized weight and multiply with it (x · Wᵀ, dy · W), the same arithmetic as
the reference op (dequantize to x's dtype, one matmul), so results are bit-identical on the CPU.
Correctness never depends on the prefetch: a block that is not in its slot is loaded on demand
(training, or offloaded), or the layer falls back to its own per-call path (`None`).

With `offload=True`, every block's packed codes and quantization constants move to host memory
(pinned when the buffer is on CUDA), and a load first copies them into a device staging area (one
per slot), then dequantizes from there. On the CPU the "device" is host memory too: the copy still
happens, so the code path runs and is tested.
May import: torch and this package.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Sequence

import torch
from torch import nn

from . import cuda
from .linear import NF4Linear

# bytes: every view into the buffers starts here (CUDA vector loads; the CPU BLAS sees a fresh tensor's alignment)
ALIGN = 256
PARTS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map")  # an NF4Linear's tensors, packed first


def _up(n: int, to: int) -> int:
    return -(-n // to) * to


def nf4_layers(block: nn.Module) -> list[NF4Linear]:
    """The NF4Linear layers of a block, in module order (adapted layers hold theirs as `base_layer`)."""
    return [m for m in block.modules() if isinstance(m, NF4Linear)]


def block_loads(blocks: int, slots: int = 2) -> int:
    """Block loads (dequantize passes; with offload, host-to-device copies) per forward + backward
    in steady state: each block once per direction, except the `slots` blocks at each turn that
    are still in their slots."""
    return max(0, 2 * blocks - 2 * slots)


class _EnterBackward(torch.autograd.Function):
    """y = x, marking the start of a block's backward: when dL/dy arrives, that block's backward
    (with recompute: its recompute) is next, so the pipeline prefetches the block before it.

    Gradient: dL/dx = dL/dy (identity).
    """

    @staticmethod
    def forward(ctx, x, pipeline, index):
        ctx.pipeline, ctx.index = pipeline, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.pipeline.enter(ctx.index, -1)
        return grad, None, None


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread (a block called from a recompute)."""
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # an older torch: the backward markers alone steer the prefetch
        return False


class WeightPipeline:
    """Dequantized weights of `blocks` (sequence of modules in execution order) in a buffer of
    `slots` rows on `device` in `dtype`; `offload=True` keeps the packed weights in host memory.

    `stats` counts what happened: `loads` (block dequantize passes), `copied_bytes` (host to device,
    offload only), `hits` and `misses` (matmuls that found their block in its slot or had to load it
    on demand), `fallbacks` (matmuls left to the per-call path: another dtype or device, or eval
    with the block not in its slot)."""

    def __init__(self, blocks: Sequence[nn.Module], device, dtype: torch.dtype = torch.bfloat16,
                 offload: bool = False, slots: int = 2):  # fmt: skip
        if slots < 2:
            raise ValueError(f"the pipeline needs at least 2 slots (one computing, one loading), got {slots}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # so that x.device compares equal
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.dtype, self.offload, self.slots = device, dtype, offload, slots
        self.modules = list(blocks)
        self.layers = [nf4_layers(b) for b in self.modules]
        if not any(self.layers):
            raise ValueError("none of the blocks holds an NF4Linear: nothing to pipeline")
        esize = torch.empty((), dtype=dtype).element_size()
        self.index: dict[int, tuple[int, int]] = {}  # id(layer) -> (block, element offset in its slot)
        self.block_elems = []
        for j, layers in enumerate(self.layers):
            off = 0
            for layer in layers:
                if id(layer) in self.index:
                    raise ValueError(f"an NF4Linear appears in blocks {self.index[id(layer)][0]} and {j}")
                self.index[id(layer)] = (j, off)
                off += _up(layer.out_features * layer.in_features * esize, ALIGN) // esize
            self.block_elems.append(off)
        self.buffer = torch.empty(slots, max(self.block_elems), dtype=dtype, device=self.device)
        self.tags = [-1] * slots  # the block each slot holds, -1: none
        self.ready: list = [None] * slots  # CUDA: the event of the slot's last write
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.stats: Counter = Counter()
        self.profile, self.marks = False, []  # profile: time every load's copies and dequantize (`timings`)
        self.staging = None
        if offload:
            self._offload()
        self.hooks = []
        for layers in self.layers:
            for layer in layers:
                layer.pipeline = self

    # ---- where things live ---------------------------------------------------------------------

    def _offload(self) -> None:
        """Move every block's packed weights and constants to host memory (pinned for a CUDA
        buffer) and lay out a staging area of `slots` rows for their copies on the device."""
        pin = self.device.type == "cuda"
        self.layout: dict[int, list[tuple[str, int, int]]] = {}  # id(layer) -> [(part, byte offset, bytes)]
        largest = 0
        for layers in self.layers:
            off = 0
            for layer in layers:
                parts = []
                for name in PARTS:
                    t = getattr(layer, name)
                    if t is None:
                        continue
                    host = t.detach().to("cpu")
                    if pin and not host.is_pinned():
                        host = host.pin_memory()
                    setattr(layer, name, host)
                    nbytes = host.numel() * host.element_size()
                    parts.append((name, off, nbytes))
                    off += _up(nbytes, ALIGN)
                self.layout[id(layer)] = parts
            largest = max(largest, off)
        self.staging = torch.empty(self.slots, largest, dtype=torch.uint8, device=self.device)

    def all_layers(self) -> list[NF4Linear]:
        """Every NF4Linear this pipeline serves, block after block."""
        return [layer for layers in self.layers for layer in layers]

    def host_bytes(self) -> int:
        """Bytes of packed weights and constants kept in host memory (offload), else 0."""
        if not self.offload:
            return 0
        return sum(n for parts in self.layout.values() for _, _, n in parts)

    def device_bytes(self) -> int:
        """Bytes this pipeline allocated on its device: the buffer, and the staging area with offload."""
        n = self.buffer.numel() * self.buffer.element_size()
        return n + (0 if self.staging is None else self.staging.numel())

    # ---- loading ---------------------------------------------------------------------------------

    def _sources(self, layer: NF4Linear, slot: int) -> dict[str, torch.Tensor | None]:
        """The layer's packed weight and constants on the device: its own tensors, or (offload)
        their copies in the slot's staging row, issued on the current stream."""
        if not self.offload:
            return {name: getattr(layer, name) for name in PARTS}
        row, out = self.staging[slot], dict.fromkeys(PARTS)
        for name, off, nbytes in self.layout[id(layer)]:
            host = getattr(layer, name)
            dst = row[off : off + nbytes].view(host.dtype).view(host.shape)
            dst.copy_(host, non_blocking=True)
            out[name] = dst
            self.stats["copied_bytes"] += nbytes
        return out

    def _load(self, j: int) -> None:
        """Dequantize block j into slot j % slots: on CUDA on the side stream, after everything
        already queued on the current stream (the slot's previous block may still be read)."""
        slot = j % self.slots
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            marks = [self._mark()] if self.profile else None
            sources = [self._sources(layer, slot) for layer in self.layers[j]]  # all copies first: one burst
            if marks:
                marks.append(self._mark())
            for layer, src in zip(self.layers[j], sources):
                _, off = self.index[id(layer)]
                n, k = layer.out_features, layer.in_features
                out = self.buffer[slot, off : off + n * k].view(n, k)
                w = cuda.dequantize(src["weight"], src["absmax"], src["quant_map"], src["nested_absmax"],
                                    src["nested_quant_map"], layer.offset, layer.blocksize, [n, k], self.dtype,
                                    out=out)  # fmt: skip
                if w is not out:  # the reference kernel (CPU, or a case the CUDA kernel does not cover)
                    out.copy_(w)
            if marks:
                self.marks.append((*marks, self._mark()))
            if self.stream is not None:
                self.ready[slot] = torch.cuda.Event()
                self.ready[slot].record(self.stream)
        self.tags[slot] = j
        self.stats["loads"] += 1

    def _mark(self):
        if self.stream is None:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.stream)
        return ev

    def timings(self) -> tuple[float, float]:
        """(seconds copying host to device, seconds dequantizing) of the loads since `profile` was
        set (CUDA: event times on the side stream, after a synchronize); the record is then cleared."""
        if self.stream is not None:
            self.stream.synchronize()
            span = lambda a, b: a.elapsed_time(b) / 1e3  # noqa: E731
        else:
            span = lambda a, b: b - a  # noqa: E731
        copy = sum(span(a, b) for a, b, _ in self.marks)
        deq = sum(span(b, c) for _, b, c in self.marks)
        self.marks = []
        return copy, deq

    def enter(self, i: int, step: int) -> None:
        """Block i is about to compute, going in direction `step` (+1 forward, -1 backward): make
        sure it is in its slot and start loading the next one."""
        for j in (i, i + step):
            if 0 <= j < len(self.layers) and self.tags[j % self.slots] != j:
                self._load(j)

    def weight(self, layer: NF4Linear, x: torch.Tensor) -> torch.Tensor | None:
        """The dequantized weight [out, in] of `layer` for a matmul with `x`, or None: use the
        layer's own per-call path."""
        j, off = self.index[id(layer)]
        slot = j % self.slots
        if x.dtype != self.dtype or x.device != self.device:
            if self.offload:  # the packed weights are on the host: the per-call path cannot read them
                raise RuntimeError(f"the offloaded base computes in {self.dtype} on {self.device}; got {x.dtype} on "
                                   f"{x.device}")  # fmt: skip
            self.stats["fallbacks"] += 1
            return None
        if self.tags[slot] != j:
            if not (layer.training or self.offload):
                self.stats["fallbacks"] += 1
                return None
            self.stats["misses"] += 1
            self._load(j)
        else:
            self.stats["hits"] += 1
        if self.ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        n, k = layer.out_features, layer.in_features
        return self.buffer[slot, off : off + n * k].view(n, k)

    def invalidate(self) -> None:
        """Forget what the slots hold (the packed weights changed)."""
        self.tags = [-1] * self.slots

    # ---- around the blocks -------------------------------------------------------------------------

    def hook_blocks(self) -> "WeightPipeline":
        """Steer the prefetch from the blocks' own calls: a forward pre-hook enters each block
        (backward direction when autograd calls it from a recompute), and its output is marked so
        that the backward enters it too. Only in training mode; eval uses what is in the slots."""

        for i, block in enumerate(self.modules):

            def pre(module, args, _i=i):
                if module.training:
                    self.enter(_i, -1 if _in_backward() else 1)

            def post(module, args, out, _i=i):
                if not (module.training and torch.is_grad_enabled()):
                    return None
                first = out[0] if isinstance(out, tuple) else out
                if not (isinstance(first, torch.Tensor) and first.requires_grad):
                    return None
                marked = _EnterBackward.apply(first, self, _i)
                return (marked, *out[1:]) if isinstance(out, tuple) else marked

            self.hooks += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
        return self

    def close(self, restore: bool = True) -> None:
        """Detach from the layers and blocks; `restore` moves offloaded weights back to the device."""
        if self.stream is not None:  # nothing may still be writing the buffers when they are freed
            self.stream.synchronize()
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for layers in self.layers:
            for layer in layers:
                if layer.pipeline is self:
                    layer.pipeline = None
                if self.offload and restore:
                    for name in PARTS:
                        t = getattr(layer, name)
                        if t is not None:
                            setattr(layer, name, t.to(self.device))
        self.buffer = self.staging = None
        self.tags = [-1] * self.slots
