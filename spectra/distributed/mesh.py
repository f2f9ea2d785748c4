"""Process group and mesh: where this rank sits (`ParallelContext`), and the per-rank helpers a training loop uses.

`init_parallel` joins the torchrun process group and builds the 2-D ("dp", "tp") :class:`DeviceMesh`; without
torchrun it returns a single-process context and starts nothing. The helpers (this rank's rows of a global
batch, the global-batch mean of a loss, the global gradient norm, a barrier) are no-ops on one process. How a
model is split over the mesh is in :mod:`spectra.distributed.plans`.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import ConfigError, DeviceError

# --- process group and mesh -----------------------------------------------------------------------

@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits: ranks, device and the ("dp", "tp") mesh (None in a plain single process)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dp: int
    tp: int
    mesh: object | None  # torch.distributed.device_mesh.DeviceMesh

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes checkpoints and shows the progress bar."""
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data shard (ranks of one tensor-parallel group read the same rows)."""
        return self.rank // self.tp

    @property
    def distributed(self) -> bool:
        return self.mesh is not None


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_parallel(dp: int = 1, tp: int = 1, backend: str | None = None, device: str | None = None,
                  timeout_s: float = 600.0) -> ParallelContext:
    """Join the torchrun process group and build the ("dp", "tp") mesh; dp * tp must equal the world size.

    Without torchrun and with dp = tp = 1 this returns a single-process context and starts nothing.
    `backend` defaults to nccl on CUDA and gloo on CPU; each rank takes the GPU of its LOCAL_RANK.
    """
    _check_positive(dp=dp, tp=tp)
    if not launched_by_torchrun():
        if dp * tp != 1:
            raise ConfigError(f"--dp {dp} --tp {tp} needs {dp * tp} processes; launch with "
                              f"`torchrun --nproc-per-node {dp * tp} -m spectra train ...`")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return ParallelContext(0, 1, 0, dev, 1, 1, None)
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if dp * tp != world:
        raise ConfigError(f"--dp {dp} x --tp {tp} = {dp * tp} ranks, but torchrun started {world} processes; "
                          f"make --nproc-per-node (times nodes) equal dp * tp")
    dev = _rank_device(device, local_rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        # The group this call started ends before the interpreter tears down: left to teardown, gloo's threads
        # sometimes abort a finished rank ("terminate called without an active exception", SIGABRT).
        atexit.register(_end_process_group)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(dev.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return ParallelContext(rank, world, local_rank, dev, dp, tp, mesh)


def _end_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _rank_device(device: str | None, local_rank: int) -> torch.device:
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was requested but no CUDA GPU is available; use --device cpu (gloo)")
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                              f"start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(kind)


def is_main_process() -> bool:
    """Rank 0 (or a plain single process): the one that logs, shows progress and writes checkpoints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shutdown_parallel(ctx: ParallelContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")


# --- data and metrics -----------------------------------------------------------------------------

def local_batch(batch: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """This rank's rows of a global batch that every rank draws identically (same seed, same position).

    Drawing the global batch everywhere keeps the sample order, and hence the losses and the resume
    position, independent of the mesh; ranks of one tensor-parallel group share their rows.
    """
    if ctx.dp == 1:
        return batch
    if batch.shape[0] % ctx.dp:
        raise ConfigError(f"global batch of {batch.shape[0]} sequences does not split over --dp {ctx.dp}; "
                          f"use a batch size divisible by {ctx.dp}")
    rows = batch.shape[0] // ctx.dp
    return batch[ctx.dp_rank * rows:(ctx.dp_rank + 1) * rows]


class RankShardedLoader:
    """Wraps a loader whose ``next_batch()`` gives global (inputs, targets): yields this rank's rows.

    The position (``state_dict``) is the wrapped loader's, identical on every rank and every mesh.
    """

    def __init__(self, loader, ctx: ParallelContext) -> None:
        self.loader, self.ctx = loader, ctx

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        return tuple(local_batch(t, self.ctx) for t in self.loader.next_batch())

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def mean_over_data_parallel(value: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """The global-batch mean of a per-rank mean (for reporting; gradients are already averaged)."""
    if ctx.dp == 1:
        return value.detach()
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.mesh["dp"].get_group())
    return out / ctx.dp


def barrier(ctx: ParallelContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_text(ctx: ParallelContext, text: str | None, src: int = 0) -> str | None:
    """Rank `src`'s `text` (None included) on every rank, sent as bytes in tensors (no pickling): how a check only
    rank 0 can make (the run directory's lock) stops every rank with its reason, not with a closed connection."""
    if not ctx.distributed:
        return text
    # NCCL moves only device tensors; gloo takes CPU ones
    device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    data = (text or "").encode()
    size = torch.tensor([len(data) if text is not None else -1], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src)
    n = int(size.item())
    if n < 0:
        return None
    if n == 0:
        return ""
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if ctx.rank == src else \
        torch.empty(n, dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=src)
    return bytes(payload.cpu().tolist()).decode()


def first_refusal(ctx: ParallelContext, text: str | None) -> str | None:
    """The `text` of the lowest rank that has one, on every rank: a check each rank makes on its own device
    (the memory estimate) stops all of them with the same line when any one of them refuses."""
    if not ctx.distributed:
        return text
    device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    src = torch.tensor([ctx.rank if text is not None else ctx.world_size], dtype=torch.int64, device=device)
    dist.all_reduce(src, op=dist.ReduceOp.MIN)
    first = int(src.item())
    return None if first == ctx.world_size else broadcast_text(ctx, text, src=first)


def clip_grad_norm_(model: nn.Module, max_norm: float, ctx: ParallelContext) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the global gradient, whatever mix of shards the ranks hold.

    Each rank adds the squares of its local gradient elements, divided by how many ranks hold the same
    elements (replicated tensors, replicated mesh dimensions), and one all-reduce gives the global norm.
    Gradients are never Partial here: FSDP2 reduce-scatters them and TP plans give them the parameter's
    placement.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not ctx.distributed:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    from torch.distributed.tensor import DTensor, Replicate

    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    locals_ = []
    for p in params:
        grad, replicas = p.grad, ctx.world_size
        if isinstance(grad, DTensor):
            shards = 1
            for mesh_dim, placement in enumerate(grad.placements):
                if not isinstance(placement, Replicate):
                    shards *= grad.device_mesh.size(mesh_dim)
            replicas = ctx.world_size // shards
            grad = grad.to_local()
        locals_.append(grad)
        total += grad.detach().double().pow(2).sum() / replicas
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    norm = total.sqrt().float()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    with torch.no_grad():
        for grad in locals_:
            grad.mul_(coef.to(grad.dtype))
    return norm
