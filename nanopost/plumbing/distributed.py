"""Data parallelism under torchrun: one process per device, PyTorch's own distributed stack.

    torchrun --nproc_per_node 2 scripts/sft.py ...        # 2 processes on this machine
    torchrun --nnodes 2 --node_rank R --rdzv-endpoint HOST:29500 --nproc_per_node 8 scripts/grpo.py ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `setup` joins the process group (NCCL when the
process has a GPU, gloo on the CPU); the script's `config.main_guard` leaves it at the end. Run
without torchrun, everything here is a single process and every collective is a no-op, so the
training loops have one code path.

The contract the loops keep: N processes compute the update that one process would compute on
the same global batch. Losses are normalised by global counts (tokens or sequences of the whole
step, over all ranks); DDP then averages gradients over ranks, so each rank's loss is multiplied
by the world size to turn that average back into the sum the global normaliser expects. The tests
check 2 gloo processes against 1 process on the same global batch.

Rank 0 alone logs and writes checkpoints; a checkpoint holds the whole model and optimizer state
keyed by parameter name, so a run resumes on another number of processes, with or without FSDP2.
A rank that fails ends the job: torchrun stops the others and names the rank. FSDP2 (`--fsdp`,
torch >= 2.6) shards each block and the rest of the model; sampling and evaluation gather the
weights (not the optimizer state) for their duration, since ranks generate different numbers of
tokens. GRPO's frozen reference model (`--beta > 0`) is a whole copy on each rank.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..model import Transformer
from .runtime import pick_device

try:  # FSDP2 is public from torch 2.6
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # pragma: no cover
    FSDPModule = fully_shard = init_device_mesh = None

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among `world` processes and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0 alone logs, writes metrics and writes checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def main_only(self, log: Callable[..., None]) -> Callable[..., None]:
        """`log` on rank 0, a no-op elsewhere: one progress line per job, not one per process."""
        return log if self.main else _quiet

    # -- collectives (no-ops in a single process) ---------------------------------------------

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of a list of numbers over all ranks (one collective for the list)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank (pickled: small Python objects only)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank: for decisions only rank 0 can make (time, monitor)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    pass


def setup(device: str = "auto") -> Dist:
    """Join the torchrun process group if there is one; otherwise a single process on `device`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device)
    if chosen.type == "cuda":
        if torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", world)):
            raise ValueError(f"{os.environ.get('LOCAL_WORLD_SIZE', world)} processes on this node but only "
                             f"{torch.cuda.device_count()} GPU(s); lower --nproc_per_node or use --device cpu")
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        # A rank that dies leaves the others waiting in a collective; torchrun notices the exit
        # and stops them, the timeout is only the last resort when a peer hangs without exiting.
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return Dist(rank=rank, world=world, local_rank=local_rank, device=chosen)


def shard(n: int, d: Dist, rank: int | None = None) -> range:
    """The contiguous block of range(n) that `rank` (default: this one) owns; sizes differ by <= 1."""
    r = d.rank if rank is None else rank
    base, extra = divmod(n, d.world)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def micro_batches(rows: list[int], d: Dist, micro: int = 0) -> list[tuple[list[int], bool]]:
    """This rank's block of `rows` in micro-batches of at most `micro` rows (0: one), as
    [(rows, real)]. Every rank gets as many as the largest block needs, since each backward is a
    collective: a rank whose block has run out gets stand-ins, the first row with real=False, for
    the caller to weigh by zero."""
    mine = [rows[i] for i in shard(len(rows), d)]
    per_rank = math.ceil(len(rows) / d.world)
    size = micro if 0 < micro < per_rank else max(per_rank, 1)
    parts = [mine[m * size : (m + 1) * size] for m in range(math.ceil(per_rank / size))]
    return [(part or rows[:1], bool(part)) for part in parts]


def wrap(model: nn.Module, d: Dist, fsdp: bool = False) -> nn.Module:
    """The module to train: DDP (or FSDP2 with fsdp=True) across ranks, the model itself alone.

    Call the wrapper for forward passes that need gradients; use `model` itself for sampling
    and evaluation, which must not synchronise anything.
    """
    if not d.active:
        return model
    if fsdp:
        if fully_shard is None:
            raise ValueError(f"--fsdp needs torch >= 2.6 (this is {torch.__version__})")
        # fully_shard's default mesh is CUDA whenever a GPU exists, even for CPU ranks.
        mesh = init_device_mesh(d.device.type, (d.world,))
        # One unit per block: its weights are gathered just before its forward and freed after.
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    # RoPE tables are the only buffers and are computed identically everywhere: no per-forward
    # broadcast (the flag was renamed in torch 2.13).
    ddp = nn.parallel.DistributedDataParallel
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    return ddp(model, device_ids=[d.device.index] if d.device.type == "cuda" else None, **no_sync)


def is_sharded(model: nn.Module) -> bool:
    return FSDPModule is not None and any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Whole weights on every rank for sampling and evaluation (FSDP2; a no-op otherwise).

    A sharded forward all-gathers its weights, a collective every rank must join, but ranks
    generate different numbers of tokens. Gathering everything once up front (weights only, not
    optimizer state) leaves forwards that need no other rank.
    """
    units = [m for m in model.modules() if FSDPModule is not None and isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on every rank (a collective under FSDP2)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist):
    """(model, optimizer or its state) whole on rank 0 for writing a checkpoint; None elsewhere.

    Under FSDP2 the shards are gathered onto rank 0's CPU (every rank must call this); the
    returned model is a CPU copy built without initialising weights.
    """
    if not is_sharded(model):
        return (model, optimizer) if d.main else None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if not d.main:
        return None
    with torch.device("meta"):
        whole = Transformer(model.config)
    whole.load_state_dict(weights, assign=True)
    return whole, optim


def sync_gradients(wrapped: nn.Module, enabled: bool):
    """Context for one backward: no gradient all-reduce unless `enabled` (the last micro-batch)."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel) and not enabled:
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()
