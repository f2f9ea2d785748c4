"""Distributed pretraining on torchrun: data parallel (FSDP2 or DDP) and tensor parallel, applied from outside.

Everything here is PyTorch's own engine (torchtitan style): a 2-D :class:`DeviceMesh` ("dp", "tp"), DTensor
tensor-parallel plans (``parallelize_module`` with ColwiseParallel for q/k/v/gate/up and RowwiseParallel for
o/down), FSDP2 ``fully_shard`` or DDP on the "dp" dimension. The model code never learns about the mesh.

Ternary semantics under sharding (arXiv 2407.12327, Sec. 2): with tensor-parallel size P each rank ternarizes
its own shard with its own mean|W| and no all-reduce of the scale, which is exactly what a single-process
``TernaryLinear`` with ``model_parallel_size=P`` computes (``torch.tensor_split`` boundaries along
``shard_axis``). FSDP2 all-gathers the weights before forward, so the scale sees the full matrix (or its P
logical shards), never a partial FSDP shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from .block import is_block_linear
from .config import TRAINABLE_KINDS, ModelConfig, get_config
from .errors import ConfigError, DeviceError
from .linear import FloatLinear, TernaryLinear
from .ternary import COLUMN_PARALLEL

DP_MODES = ("fsdp", "ddp")


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
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(dev.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return ParallelContext(rank, world, local_rank, dev, dp, tp, mesh)


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


def shutdown_parallel(ctx: ParallelContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")


# --- configuration --------------------------------------------------------------------------------

def config_for_tensor_parallel(config: ModelConfig, tp: int) -> ModelConfig:
    """The config a `tp`-way run trains: a TriLM gets (at least) one scale per tensor-parallel shard.

    A model-parallel size of 1 becomes `tp`; a larger one must be a multiple of `tp` (each rank then holds
    model_parallel_size / tp logical shards, e.g. the 3.9B TriLM's 6 scales on 2, 3 or 6 GPUs).
    """
    if tp > 1 and config.weight_kind == "ternary" and config.model_parallel_size == 1:
        config = config.replace(model_parallel_size=tp)
    check_tensor_parallel(config, tp)
    return config


def tensor_parallel_overrides(preset: str, kind: str, overrides: dict, tp: int) -> dict:
    """Model overrides of a `tp`-way run of a preset, with its model-parallel size written out.

    Recording the size in the run's overrides keeps it on resume with another --tp (or on one process).
    """
    if tp == 1 or "model_parallel_size" in overrides:
        return overrides

    config = config_for_tensor_parallel(get_config(preset, weight_kind=kind, **overrides), tp)
    return {**overrides, "model_parallel_size": config.model_parallel_size}


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raise ConfigError unless `tp`-way sharding splits every matrix on its per-shard-scale boundaries."""
    if tp == 1:
        return
    if config.weight_kind not in TRAINABLE_KINDS:
        raise ConfigError(f"tensor parallelism trains the kinds {TRAINABLE_KINDS}, not {config.weight_kind!r}; "
                          f"load the checkpoint with kind='ternary' or 'float'")
    if config.num_heads % tp:
        raise ConfigError(f"--tp {tp} must divide num_heads ({config.num_heads}): each rank keeps whole heads")
    split = tp
    if config.weight_kind == "ternary":
        split = config.model_parallel_size
        if split % tp:
            raise ConfigError(f"--tp {tp} must divide the model-parallel size {split} (one scale per shard); "
                              f"set model_parallel_size to a multiple of {tp}")
    for name, size in (("hidden_size", config.hidden_size), ("intermediate_size", config.intermediate_size)):
        # DTensor shards like torch.chunk, per-shard scales like torch.tensor_split: they agree when
        # the size divides evenly, so require that rather than silently ternarizing misaligned shards.
        if size % split:
            raise ConfigError(f"{name} ({size}) must be divisible by {split} for {tp}-way tensor parallelism"
                              + (f" with {split} scales per matrix" if config.weight_kind == "ternary" else ""))


# --- applying parallelism -------------------------------------------------------------------------

def parallelize(model: nn.Module, ctx: ParallelContext, dp_mode: str = "fsdp",
                param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True,
                compile: bool = False) -> nn.Module:
    """Apply tensor parallelism on the "tp" mesh dimension, then FSDP2 or DDP on "dp"; returns the model.

    The model must live on `ctx.device` and be identical on every rank (same seed or same checkpoint).
    `param_dtype` (FSDP only) all-gathers and computes in that dtype while keeping fp32 master weights and
    fp32 gradient reduction. `compile` compiles each decoder block (after TP, before FSDP, as torchtitan
    does), which also fuses the ternarization (absmean, round, rescale) into a few kernels.
    Module and parameter names stay unchanged, so state dicts match a plain model.
    """
    if dp_mode not in DP_MODES:
        raise ConfigError(f"unknown data-parallel mode {dp_mode!r}; use one of {', '.join(DP_MODES)}")
    if not ctx.distributed:
        if compile:
            apply_compile(model)
        return model
    config = model.config
    check_tensor_parallel(config, ctx.tp)
    _check_same_weights(model, ctx)
    if ctx.tp > 1:
        apply_tensor_parallel(model, ctx.mesh["tp"])
    if compile:
        apply_compile(model)
    if ctx.dp > 1 or (dp_mode == "fsdp" and param_dtype is not None):
        if dp_mode == "fsdp":
            apply_fsdp(model, ctx.mesh["dp"], param_dtype, reshard_after_forward)
        else:
            apply_ddp(model, ctx.mesh["dp"], ctx.tp)
    return model


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Megatron-style plan per block: column-parallel q/k/v/gate/up, row-parallel o/down.

    Embedding, norms and lm head stay replicated: they are float in every kind, and their inputs are
    replicated across the tensor-parallel group, so each rank computes the same values and gradients.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    for layer in model.model.layers:
        plan = {}
        for name, module in layer.named_modules():
            if not is_block_linear(name):
                continue
            if not isinstance(module, (FloatLinear, TernaryLinear)):
                raise ConfigError(f"{name} is {type(module).__name__}; tensor parallelism trains FloatLinear "
                                  f"and TernaryLinear layers only")
            # The layer's own shard_axis, the axis its per-shard scales split, decides the style, so the
            # TP shards and the scale shards are the same slices (spectra.block: column-parallel 0, row-parallel 1).
            plan[name] = ColwiseParallel() if module.shard_axis == COLUMN_PARALLEL else RowwiseParallel()
        parallelize_module(layer, tp_mesh, plan)
        # Attention reshapes its projections into heads; after column sharding a rank holds num_heads / tp.
        layer.self_attn.num_heads = model.config.num_heads // tp


def apply_compile(model: nn.Module) -> None:
    """torch.compile every decoder block in place (names unchanged); blocks share one compiled graph."""
    for layer in model.model.layers:
        layer.compile()


def apply_fsdp(model: nn.Module, dp_mesh, param_dtype: torch.dtype | None = None,
               reshard_after_forward: bool = True) -> None:
    """FSDP2: one all-gather unit per decoder block plus the root (embedding, final norm, lm head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters are needed again right after forward (lm head backward): keep them gathered.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=False)


def apply_ddp(model: nn.Module, dp_mesh, tp: int) -> None:
    """DDP (composable `replicate`, which keeps parameter names); PyTorch's DDP does not compose with TP."""
    if tp > 1:
        raise ConfigError("DDP does not combine with tensor parallelism in PyTorch; use --dp-mode fsdp with --tp")
    from torch.distributed._composable.replicate import replicate

    replicate(model, device_mesh=dp_mesh)


@torch.no_grad()
def _check_same_weights(model: nn.Module, ctx: ParallelContext) -> None:
    """Ranks that start from different weights would train silently wrong: compare one checksum."""
    total = torch.zeros(1, dtype=torch.float64, device=ctx.device)
    for p in model.parameters():
        if p.device != ctx.device:
            raise DeviceError(f"model parameters are on {p.device} but this rank trains on {ctx.device}; "
                              f"move the model with .to(ctx.device) before parallelize()")
        total += p.detach().double().sum() + p.detach().double().abs().sum()
    gathered = [torch.zeros_like(total) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, total)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise ConfigError("ranks hold different initial weights; seed every rank identically "
                          "(torch.manual_seed) or load the same checkpoint before parallelize()")


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

