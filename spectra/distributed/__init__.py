"""Distributed training: process group and mesh (`mesh`), parallelism plans (`plans`), and checkpoints
that load on any mesh (`checkpoint`). Plans are applied to a model from outside; the model never sees the mesh."""

from ..linear import sharded_ternary_weight_ste  # the DTensor STE lives beside the plain one
from .checkpoint import (
    full_model_state,
    full_optimizer_state,
    gather_model,
    load_model_state,
    load_optimizer_state,
    load_training_checkpoint,
    save_training_checkpoint,
)
from .mesh import (
    ParallelContext,
    RankShardedLoader,
    barrier,
    broadcast_text,
    clip_grad_norm_,
    first_refusal,
    init_parallel,
    is_main_process,
    launched_by_torchrun,
    local_batch,
    mean_over_data_parallel,
    shutdown_parallel,
)
from .plans import (
    DP_MODES,
    apply_compile,
    apply_ddp,
    apply_fsdp,
    apply_tensor_parallel,
    check_tensor_parallel,
    config_for_tensor_parallel,
    parallelize,
    tensor_parallel_overrides,
)

__all__ = ["full_model_state", "full_optimizer_state", "gather_model", "load_model_state", "load_optimizer_state",
           "load_training_checkpoint", "save_training_checkpoint",
           "ParallelContext", "RankShardedLoader", "barrier", "broadcast_text", "clip_grad_norm_", "first_refusal",
           "init_parallel", "is_main_process", "launched_by_torchrun", "local_batch", "mean_over_data_parallel",
           "shutdown_parallel",
           "DP_MODES", "apply_compile", "apply_ddp", "apply_fsdp", "apply_tensor_parallel", "check_tensor_parallel",
           "config_for_tensor_parallel", "parallelize", "sharded_ternary_weight_ste", "tensor_parallel_overrides"]
