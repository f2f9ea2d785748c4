"""Parallelism plans, applied to a model from outside: data parallel (FSDP2 or DDP) and tensor parallel.

Everything here is PyTorch's own engine (torchtitan's ``parallelize.py``): DTensor tensor-parallel plans
(``parallelize_module`` with ColwiseParallel for q/k/v/gate/up and RowwiseParallel for o/down), FSDP2
``fully_shard`` or DDP on the "dp" dimension, and the compile wrap, each an ``apply_*`` function that
:func:`parallelize` calls in order. The mesh and process group come from :mod:`spectra.distributed.mesh`; the
model code never learns about the mesh.

Ternary semantics under sharding (arXiv 2407.12327, Sec. 2): with tensor-parallel size P each rank ternarizes
its own shard with its own mean|W| and no all-reduce of the scale, which is exactly what a single-process
``TernaryLinear`` with ``model_parallel_size=P`` computes (``torch.tensor_split`` boundaries along
``shard_axis``). FSDP2 all-gathers the weights before forward, so the scale sees the full matrix (or its P
logical shards), never a partial FSDP shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..block import is_block_linear
from ..config import TRAINABLE_KINDS, ModelConfig, get_config
from ..errors import ConfigError, DeviceError
from ..linear import FloatLinear, TernaryLinear
from ..ternary import COLUMN_PARALLEL
from .mesh import ParallelContext

DP_MODES = ("fsdp", "ddp")


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
