"""Checkpoints of parallel training that load on any mesh and on one process.

Sharded weights and optimizer state are gathered to full tensors keyed by parameter name
(``torch.distributed.checkpoint.state_dict`` with ``full_state_dict``) on rank 0, written as safetensors next
to a core checkpoint (:func:`spectra.save_checkpoint`), and broadcast and resharded onto the new mesh on
resume. Full tensors make the files independent of the mesh that wrote them; for the sizes spectra trains
(up to a few billion parameters) they fit in one host's memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import write_checkpoint_files
from ..errors import CheckpointError
from ..io import atomic_dir, check_output
from ..model import SpectraLM
from .mesh import ParallelContext, barrier

# --- mesh-independent state: full (unsharded) tensors keyed by parameter name -----------------------

def _state_options(ctx: ParallelContext, broadcast: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Gathered to rank 0's CPU: the result is the single-process state, whatever the mesh.
    return StateDictOptions(full_state_dict=ctx.distributed, cpu_offload=ctx.distributed,
                            broadcast_from_rank0=broadcast and ctx.distributed)


def full_model_state(model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """The unsharded latent weights on rank 0's CPU (empty on other ranks); collective on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_state_options(ctx))
    return {k: v.detach().cpu() for k, v in state.items()} if ctx.is_main else {}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: ParallelContext) -> dict:
    """The optimizer state keyed by parameter name, unsharded on rank 0's CPU (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_state_options(ctx))
    return state if ctx.is_main else {}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], ctx: ParallelContext) -> None:
    """Load a full state (needed on rank 0 only; broadcast and resharded onto this mesh)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if not ctx.distributed:
        model.load_state_dict(state)
        return
    set_model_state_dict(model, state if ctx.is_main else {}, options=_state_options(ctx, broadcast=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                         ctx: ParallelContext) -> None:
    """Load a name-keyed full optimizer state (needed on rank 0 only) onto this mesh's shards."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state if ctx.is_main or not ctx.distributed else {},
                             options=_state_options(ctx, broadcast=True))


def gather_model(model: nn.Module, ctx: ParallelContext) -> nn.Module | None:
    """A plain single-process copy of a parallelized model on rank 0's CPU (None on other ranks).

    Save it with :func:`spectra.save_checkpoint` (the core format, loadable anywhere) or evaluate it.
    """
    state = full_model_state(model, ctx)
    if not ctx.is_main:
        return None
    plain = SpectraLM(model.config)
    plain.load_state_dict(state)
    return plain.eval()


def optimizer_state_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a name-keyed optimizer state into safetensors-ready tensors and JSON-ready hyperparameters."""
    tensors, scalars = {}, {}
    for name, slots in state.get("state", {}).items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}::{slot}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}::{slot}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state.get("param_groups", [])]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`optimizer_state_to_tensors`."""
    state: dict[str, dict] = {}
    for key, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        name, slot = key.rsplit("::", 1)
        state.setdefault(name, {})[slot] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# --- training checkpoints that load on any mesh ---------------------------------------------------

TRAIN_STATE_FILE = "train_state.safetensors"
TRAIN_META_FILE = "train_state.json"
TRAIN_OWNER = "train"  # spectra.train.state.TRAIN_OWNER: the marker of a run's checkpoints
_MODEL_PREFIX, _OPTIM_PREFIX = "model::", "optim::"


def save_training_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                             ctx: ParallelContext, meta: dict | None = None, tokenizer=None,
                             extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a core checkpoint (config.json + model.safetensors) plus the unsharded training state.

    Collective: every rank calls it; rank 0 writes. The core part loads with :func:`spectra.load_checkpoint`
    on one process; the training state (latent weights, optimizer, `meta`) resumes on any mesh through
    :func:`load_training_checkpoint`, and on one process through ``spectra.train`` (same layout:
    ``model::<name>``, ``optim::<name>::<slot>``, plus rank 0's `extra_tensors`, e.g. ``rng::`` states).
    The directory appears in one rename, so a crash leaves no half-write.
    """
    path = Path(path)
    model_state = full_model_state(model, ctx)
    optim_state = full_optimizer_state(model, optimizer, ctx) if optimizer is not None else {}
    if ctx.is_main:
        plain = SpectraLM(model.config)
        plain.load_state_dict(model_state)
        check_output(path, TRAIN_OWNER, recognize=lambda p: (p / TRAIN_META_FILE).is_file())
        with atomic_dir(path, TRAIN_OWNER) as target:
            write_checkpoint_files(plain, target, tokenizer=tokenizer)
            optim_tensors, optim_meta = optimizer_state_to_tensors(optim_state)
            tensors = {_MODEL_PREFIX + k: v.contiguous() for k, v in model_state.items()}
            tensors.update({_OPTIM_PREFIX + k: v for k, v in optim_tensors.items()})
            tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()})
            save_file(tensors, str(target / TRAIN_STATE_FILE), metadata={"format": "pt"})
            record = {"meta": meta or {}, "optimizer": optim_meta if optimizer is not None else None,
                      "saved_with": {"dp": ctx.dp, "tp": ctx.tp}}
            (target / TRAIN_META_FILE).write_text(json.dumps(record, indent=2) + "\n")
    barrier(ctx)
    return path


def load_training_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                             ctx: ParallelContext) -> dict:
    """Restore latent weights and optimizer state written on any mesh onto this one; returns the `meta`.

    Collective. Call it after :func:`parallelize` and after building the optimizer. Only rank 0 reads the
    files; the tensors are broadcast and resharded.
    """
    path = Path(path)
    record = _read_meta(path)
    if record["optimizer"] is None and optimizer is not None:
        raise CheckpointError(f"{path} holds no optimizer state; resume without an optimizer or from a "
                              f"checkpoint saved with one")
    model_state, optim_state = {}, {}
    if ctx.is_main:
        tensors = _read_train_tensors(path)
        model_state = {k[len(_MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(_MODEL_PREFIX)}
        _check_state_matches(model, model_state, path)
        if optimizer is not None:
            optim_tensors = {k[len(_OPTIM_PREFIX):]: v for k, v in tensors.items() if k.startswith(_OPTIM_PREFIX)}
            optim_state = optimizer_state_from_tensors(optim_tensors, record["optimizer"])
    load_model_state(model, model_state, ctx)
    if optimizer is not None:
        load_optimizer_state(model, optimizer, optim_state, ctx)
    return record["meta"]


def _read_meta(path: Path) -> dict:
    file = path / TRAIN_META_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} has no {TRAIN_META_FILE}: it is not a training checkpoint "
                              f"(resume from a directory written during training)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); the checkpoint is corrupt") from None


def _read_train_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / TRAIN_STATE_FILE))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {path / TRAIN_STATE_FILE} ({err}); the file is missing, "
                              f"truncated or corrupt — resume from an earlier checkpoint") from None


def _check_state_matches(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(f"{path} lacks {name}; it was saved from a different model")
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(state[name].shape)} but this model has "
                                  f"{shape}; resume with the model configuration it was saved with")
