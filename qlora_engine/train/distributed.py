"""Training on more than one process, on PyTorch's own stack: torch.distributed (gloo on the CPU,
NCCL on CUDA), started by `torchrun` or `accelerate launch`, with DDP or FSDP2 (`fully_shard`).

- **DDP**: every rank holds the whole NF4 base. Only the LoRA parameters are synchronised (the
  frozen base and every buffer are kept out of DDP's broadcasts), their gradients all-reduced in
  buckets overlapped with the backward; non-final micro-batches skip it (`no_sync`).
- **FSDP2**: the packed NF4 codes and their first-level scales become frozen uint8 parameters that
  `fully_shard` splits across ranks (FSDP2 gathers mixed dtypes as bytes, so no float "storage
  dtype" trick is needed); the small second-level state and code tables stay replicated buffers.
  Each decoder block is a unit, gathered for its forward, its recompute and its backward, never
  re-quantized or cast. LoRA parameters and optimizer state are sharded too. The model is built on
  the meta device, sharded, then filled tensor by tensor: each weight is read (and quantized) once
  and each rank keeps only its part, so no rank ever holds the 16-bit model or the whole NF4 one.
- The data order is the single process's: each optimizer step takes the same global rows, rank r
  the r-th slice of them; the loss is normalised by the step's global target count, so a 2-rank x
  batch b run computes what a 1 x 2b run does.
- A rank that dies makes the others fail in their next collective (gloo resets the connection);
  the error path turns that into one line. Each worker also stops when its launcher dies.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError, RunError
from ..lora.inject import lora_layers
from ..models.loader import Placer
from ..models.structure import decoder_layers
from ..quant.linear import NF4Linear
from .loss import causal_lm_loss



def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    strategy: str  # ddp | fsdp

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return float(t)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (e.g. a stop signal that reached only some)."""
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    @property
    def comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def finish(self) -> None:
        """Leave cleanly: without the barrier and destroy, gloo's threads can abort the interpreter at exit."""
        if dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
        gc.collect()


def _die_with_parent() -> None:
    """SIGTERM when the launcher dies (a SIGKILLed torchrun would otherwise leave its workers running)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def setup(cfg) -> Dist | None:
    """Join the process group when a launcher started several processes; None for one process."""
    world = world_size()
    if world <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    _die_with_parent()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    strategy = cfg.strategy if cfg.strategy != "auto" else "ddp"  # run.finetune resolves auto from the plan
    return Dist(rank, world, local_rank, device, strategy)


def lost_rank(e: BaseException) -> RunError:
    """The one line for a collective that failed because another rank went away."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return RunError(f"another process of this {world_size()}-process run stopped ({text[:160]}); this one stops too. "
                    "Resume with the same launch command and --resume")  # fmt: skip


# ---- the loss, through the wrapper DDP and FSDP expect ----------------------------------------------


class Step(nn.Module):
    """The model and its loss as one module: DDP and FSDP hook a module's forward, and the chunked
    loss needs the hidden states, not the logits, so the wrapper is what they wrap."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, n_norm: float | None, chunk: int):
        return causal_lm_loss(self.model, batch, n_norm=n_norm, chunk=chunk)


def wrap_ddp(model: nn.Module, d: Dist) -> nn.Module:
    """DDP over the LoRA parameters only: nothing frozen and no buffer is broadcast or synchronised."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    step = Step(model)
    frozen = [n for n, p in step.named_parameters() if not p.requires_grad] + [n for n, _ in step.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(step, frozen)
    ids = [d.device.index] if d.device.type == "cuda" else None
    # find_unused_parameters stays False: every LoRA parameter takes part in every step, and True
    # breaks the per-layer recompute (a reentrant backward). No static_graph: it fails with no_sync.
    return DDP(step, device_ids=ids)


def shard_model(step: nn.Module, d: Dist) -> None:
    """fully_shard every decoder block, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(d)
    _, blocks = decoder_layers(step.model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(step, mesh=mesh)


def _mesh(d: Dist):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(d.device.type, (d.world,))


# ---- FSDP loading: build on meta, shard, then keep only this rank's part of each tensor ---------------


def _as_param(module: nn.Module, name: str, t: torch.Tensor) -> None:
    module._buffers.pop(name, None)
    module.register_parameter(name, nn.Parameter(t, requires_grad=False))


def _fill(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's shard of `full` into a sharded parameter (or all of it into a plain one)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            param.copy_(distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None))
        else:
            param.copy_(full)


class ShardPlacer(Placer):
    """The loader's placer for FSDP: NF4 codes and scales become frozen parameters of known shape,
    `before_shard` adds the adapters (still on meta), the model is sharded and allocated empty,
    and every tensor read is cut to this rank's shard as it arrives."""

    def __init__(self, d: Dist, before_shard):
        super().__init__(d.device)
        self.d, self.before_shard = d, before_shard
        self.filled: set[str] = set()
        self.step: Step | None = None

    def prepare(self, model: nn.Module, quant_layers: dict) -> None:
        for name, spec in quant_layers.items():
            layer = model.get_submodule(name)
            n = layer.in_features * layer.out_features
            nblocks = -(-n // spec.blocksize)
            _as_param(layer, "weight", torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device="meta"))
            scale_dtype = torch.uint8 if spec.double_quant else torch.float32
            _as_param(layer, "absmax", torch.empty(nblocks, dtype=scale_dtype, device="meta"))
        self.before_shard(model)
        real = {n: b for n, b in model.named_buffers() if not b.is_meta}  # computed buffers (rotary tables)
        self.step = Step(model)
        shard_model(self.step, self.d)
        model.to_empty(device=self.device)
        for name, buf in real.items():
            _set_buffer(model, name, buf.to(self.device))
        self.expected = {n.replace(".base_layer.", ".") for n, _ in model.named_parameters()} - {n for n, _ in _lora_params(model)}

    def quantized(self, layer: NF4Linear, name: str, packed: torch.Tensor, state) -> None:
        layer = getattr(layer, "base_layer", layer)  # the adapters went on before the weights arrived
        state = state.to(self.device)
        _fill(layer.weight, packed.reshape(-1, 1).to(self.device))
        _fill(layer.absmax, state.absmax)
        layer.quant_map, layer.nested_quant_map, layer.nested_absmax = state.code, state.nested_code, state.nested_absmax
        layer.blocksize, layer.quant_type, layer.offset, layer.weight_dtype = (state.blocksize, state.quant_type,
                                                                              state.offset, state.dtype)  # fmt: skip
        self.filled |= {f"{name}.weight", f"{name}.absmax"}

    def tensor(self, model: nn.Module, name: str, t: torch.Tensor) -> bool:
        mod_name, _, attr = name.rpartition(".")
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            return False
        mod = getattr(mod, "base_layer", mod)  # a checkpoint names an adapted layer's own tensors
        if attr in mod._parameters:
            _fill(mod._parameters[attr], t.to(self.device))
        elif attr in mod._buffers:
            mod._buffers[attr] = t.to(self.device)
        else:
            return False
        self.filled.add(name)
        return True

    def unfilled(self, model: nn.Module) -> list[str]:
        return sorted(self.expected - self.filled)

    def finish(self, model: nn.Module) -> None:
        pass


def _set_buffer(model: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    model.get_submodule(mod_name)._buffers[attr] = t


def _lora_params(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if ".lora_A" in n or ".lora_B" in n]


def init_lora_shards(model: nn.Module, seed: int) -> None:
    """The adapters' starting values, drawn exactly as `add_lora(seed=seed)` draws them in one
    process, each rank keeping its shard (the model was built on meta, where nothing is drawn)."""
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        a, b = layer.initial_values()
        _fill(layer.lora_A, a)
        _fill(layer.lora_B, b)


def resident_nf4_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of packed codes and scales this rank holds, bytes of the whole model's)."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            for t in (m.weight, m.absmax):
                if isinstance(t, DTensor):
                    local += t.to_local().numel() * t.element_size()
                    total += t.numel() * t.element_size()
                else:
                    local += t.numel() * t.element_size()
                    total += t.numel() * t.element_size()
    return local, total


def gathered_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA tensor whole, on the CPU (a collective under FSDP: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in _lora_params(model):
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = t.detach().cpu()
    return out


def lora_state_for_dcp(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded LoRA parameters by name: what torch.distributed.checkpoint saves and loads in
    place (the DCP model-state helpers cannot map the NF4 layers' bitsandbytes-style keys)."""
    return dict(_lora_params(model))


def check_strategy(cfg, world: int) -> None:
    if cfg.strategy in ("ddp", "fsdp") and world <= 1:
        raise InputError(f"strategy {cfg.strategy} needs several processes: launch with torchrun --nproc-per-node N "
                         "(or accelerate launch --multi_gpu --num_processes N); one process runs with strategy auto")  # fmt: skip


def checkpoint_dir_for(path: Path) -> Path:
    return Path(path) / "dcp"


# ---- the loop's distributed pieces ----------------------------------------------------------------


@torch.no_grad()
def initialise_root(step: nn.Module, device: torch.device) -> None:
    """One tiny forward through the root, so that FSDP sets itself up with `step` as the root:
    eval and generation then call the model directly (blocks gathering themselves), and a block
    reached first that way would otherwise take itself for a root."""
    ids = torch.tensor([[1, 2]], device=device)
    batch = {"input_ids": ids, "position_ids": torch.tensor([[0, 1]], device=device),
             "targets": torch.tensor([[2, -100]], device=device)}  # fmt: skip
    step(batch, 1.0, 16)


class no_reduce:
    """FSDP: accumulate this micro-batch's gradients without reduce-scattering them (DDP's no_sync)."""

    def __init__(self, step: nn.Module):
        self.step = step

    def __enter__(self):
        self.step.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.step.set_requires_gradient_sync(True)


class unsharded_root:
    """FSDP: the root's parameters (embeddings, final norm, head) gathered, for code that calls the
    model directly instead of through the root's forward (eval, generation); the blocks gather
    themselves. A no-op for None."""

    def __init__(self, step: nn.Module | None):
        self.step = step

    def __enter__(self):
        if self.step is not None:
            self.step.unshard()

    def __exit__(self, *exc):
        if self.step is not None:
            self.step.reshard()


def save_sharded(d: Dist, out_dir: Path, model: nn.Module, step: nn.Module, optimizer, scheduler, pos, config: dict,
                 keep: int, base: str) -> Path:  # fmt: skip
    """An FSDP checkpoint: the sharded LoRA parameters and optimizer state through
    torch.distributed.checkpoint (every rank writes its part into `dcp/`), and, from rank 0, the
    gathered adapter in PEFT format, the schedule, RNG states, position and config, and the
    manifest. Written into a temporary directory and renamed once every rank is done."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from ..lora import peft_format
    from ..models import tensorfiles
    from .checkpoint import CHECKPOINTS, list_checkpoints, rng_state

    final = Path(out_dir) / CHECKPOINTS / f"step-{pos.step:08d}"
    tmp = None
    if d.main:
        final.parent.mkdir(parents=True, exist_ok=True)
        tensorfiles.remove_stale_temporaries(final)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    tmp = Path(d.broadcast(str(tmp) if tmp else None))
    try:
        dcp.save({"lora": lora_state_for_dcp(model), "optim": get_optimizer_state_dict(step, optimizer)},
                 checkpoint_id=str(checkpoint_dir_for(tmp)))  # fmt: skip
        values = gathered_lora(model)
        if d.main:
            peft_format.save_adapter(model, tmp, base, values=values)
            state = {"scheduler": scheduler.state_dict(), "rng": rng_state(), "position": pos.__dict__, "config": config,
                     "world": d.world}  # fmt: skip
            tensorfiles.save_torch(state, tmp / "state.pt")
            tensorfiles.write_manifest(tmp)
            tensorfiles.fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            tensorfiles.fsync_dir(final.parent)
            for old in list_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    d.barrier()
    return final


def load_sharded(path: Path, model: nn.Module, step: nn.Module, optimizer, scheduler):
    """Restore an FSDP checkpoint into the sharded model and optimizer (every rank reads its part)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from .checkpoint import Position, _load, set_rng_state

    if not (checkpoint_dir_for(path) / ".metadata").exists():
        raise InputError(f"{path} is not an FSDP checkpoint (no dcp/): resume it with the strategy it was saved with")
    state = {"lora": lora_state_for_dcp(model), "optim": get_optimizer_state_dict(step, optimizer)}
    dcp.load(state, checkpoint_id=str(checkpoint_dir_for(path)))
    set_optimizer_state_dict(step, optimizer, state["optim"])
    saved = _load(Path(path) / "state.pt")
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"])
    return Position(**saved["position"])
