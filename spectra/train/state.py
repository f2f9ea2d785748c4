"""Resumable training checkpoints: a core checkpoint directory plus the training state beside it.

Layout of `<run>/checkpoints/step-0000100/`:

    config.json, model.safetensors, tokenizer.json   the core checkpoint (spectra.save_checkpoint): dense
                                                      effective weights, loadable by spectra and transformers
    train_state.safetensors                           model::<param>   latent weights (exact, incl. ternary)
                                                      optim::<param>::<slot>  AdamW moments and step counts
                                                      rng::<name>      RNG states as uint8 tensors
    train_state.json                                  {"meta": step, data position, configs, ...,
                                                       "optimizer": param groups, "saved_with": mesh}

Tensors are keyed by parameter name (not optimizer index), the same layout spectra.distributed writes, so
a state saved on one process resumes on a mesh and back. Nothing is pickled. The directory is assembled in
a temporary sibling and renamed into place, so a crash at any moment leaves only complete checkpoints.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import write_checkpoint_files
from ..errors import CheckpointError
from ..io import atomic_dir, check_output, output_owner, read_json, recover

STATE_TENSORS = "train_state.safetensors"
STATE_META = "train_state.json"
CHECKPOINTS_DIR = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_PREFIX, OPTIM_PREFIX, RNG_PREFIX = "model::", "optim::", "rng::"
META_KEYS = ("step", "tokens", "loader", "config", "model_config", "dataset")
TRAIN_OWNER = "train"  # the marker of checkpoints written by a training run (spectra.io)


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete training checkpoints of a run, oldest first (temporary and partial directories skipped)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / STATE_META).is_file() and (path / STATE_TENSORS).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / STATE_META).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1][1]
    raise CheckpointError(f"{path} holds no training checkpoint (no {STATE_META}, no {CHECKPOINTS_DIR}/step-*); "
                          f"pass a run directory written by `spectra train` or one of its checkpoints")


def remove_stale_staging(run_dir: str | Path) -> None:
    """Repair what a killed process left among the checkpoints: half-written staging directories are
    deleted, an old checkpoint moved aside mid-replace is put back (spectra.io.recover)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_dir():
        for name in {p.name.split(".spectra-")[0].lstrip(".") for p in root.glob(".step-*.spectra-*")}:
            recover(root / name)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        if output_owner(path) in (TRAIN_OWNER, None):  # never a directory another command wrote
            shutil.rmtree(path, ignore_errors=True)


# --- optimizer state keyed by parameter name -------------------------------------------------------

def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """(tensors "name::slot", JSON meta) of an optimizer whose parameters have the given names (by id)."""
    state = optimizer.state_dict()
    index_to_name = {}
    groups = []
    for group, live in zip(state["param_groups"], optimizer.param_groups):
        for index, param in zip(group["params"], live["params"]):
            index_to_name[index] = names[id(param)]
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
                      | {"params": [index_to_name[i] for i in group["params"]]})
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            key = f"{index_to_name[index]}::{slot}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict,
                           meta: dict, source: Path) -> None:
    current = optimizer.state_dict()
    name_to_index = {}
    for group, live in zip(current["param_groups"], optimizer.param_groups):
        for index, param in zip(group["params"], live["params"]):
            name_to_index[names[id(param)]] = index
    saved_groups = meta["param_groups"]
    if [g["params"] for g in saved_groups] != [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]:
        raise CheckpointError(f"{source}: the optimizer was saved for other parameters; resume with the model "
                              f"configuration it was saved with")
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        name, slot = key.rsplit("::", 1)
        state.setdefault(name_to_index[name], {})[slot] = value
    groups = []
    for group, saved in zip(current["param_groups"], saved_groups):
        restored = {k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"}
        groups.append(restored | {"params": group["params"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- RNG states ------------------------------------------------------------------------------------

def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "torch_cpu" in tensors:
        torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --- save and load ---------------------------------------------------------------------------------

def save_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict,
                        tokenizer=None) -> Path:
    """Write checkpoint directory `path` (core checkpoint + training state) atomically; returns it."""
    path = Path(path)
    names = {id(p): n for n, p in model.named_parameters()}
    check_output(path, TRAIN_OWNER, recognize=lambda p: (p / STATE_META).is_file())  # also unmarked older ones
    with atomic_dir(path, TRAIN_OWNER) as target:
        write_checkpoint_files(model, target, tokenizer=tokenizer)
        optim_tensors, optim_meta = optimizer_tensors(optimizer, names)
        tensors = {MODEL_PREFIX + n: p.detach().cpu().contiguous() for n, p in model.state_dict().items()}
        tensors.update({OPTIM_PREFIX + k: v for k, v in optim_tensors.items()})
        tensors.update({RNG_PREFIX + k: v for k, v in rng_tensors().items()})
        save_file(tensors, str(target / STATE_TENSORS), metadata={"format": "pt"})
        record = {"meta": meta, "optimizer": optim_meta, "saved_with": {"dp": 1, "tp": 1}}
        (target / STATE_META).write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_training_meta(path: str | Path) -> dict:
    """The JSON record of a training checkpoint (meta, optimizer groups); reads no tensors."""
    file = Path(path) / STATE_META
    if not file.is_file():
        raise CheckpointError(f"{path} has no {STATE_META}: it is not a training checkpoint")
    record = read_json(file, CheckpointError, "resume from an earlier checkpoint")
    meta = record.get("meta") if isinstance(record, dict) else None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if not isinstance(record.get("optimizer") if isinstance(record, dict) else None, (dict, type(None))):
        missing.append("optimizer")
    if missing:
        raise CheckpointError(f"{file} lacks {', '.join(missing)}: it is incomplete or from another tool; "
                              f"resume from an earlier checkpoint")
    return record


def check_state_complete(tensors: dict[str, torch.Tensor], record: dict, path: Path) -> None:
    """Refuse a training state whose optimizer moments or RNG states are missing: resuming it would not
    continue the run bit-identically, silently."""
    optimizer = record.get("optimizer") or {}
    names = [n for group in optimizer.get("param_groups", []) for n in group.get("params", [])]
    keys = {k[len(OPTIM_PREFIX):] for k in tensors if k.startswith(OPTIM_PREFIX)} | set(optimizer.get("scalars", {}))
    slots = sorted({k.rsplit("::", 1)[-1] for k in keys})
    missing = [f"{OPTIM_PREFIX}{n}::{s}" for n in names for s in slots if f"{n}::{s}" not in keys]
    if not slots and int(record["meta"].get("step", 0)) > 0:
        missing.append(f"{OPTIM_PREFIX}* (every optimizer moment)")
    if f"{RNG_PREFIX}torch_cpu" not in tensors:
        missing.append(f"{RNG_PREFIX}torch_cpu")
    if missing:
        raise CheckpointError(f"{path / STATE_TENSORS} lacks {len(missing)} training-state tensors (first: "
                              f"{missing[0]}); the run could not continue exactly — resume from an earlier "
                              f"checkpoint")


def load_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore latent weights, optimizer state and RNG states from checkpoint `path`; returns its meta."""
    path = Path(path)
    record = read_training_meta(path)
    try:
        tensors = load_file(str(path / STATE_TENSORS))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {path / STATE_TENSORS} ({err}); the file is truncated or corrupt — "
                              f"resume from an earlier checkpoint") from None
    if optimizer is not None:
        check_state_complete(tensors, record, path)
    state = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise CheckpointError(f"{path} lacks {name}; it was saved from a different model")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(state[name].shape)} but this model has "
                                  f"{tuple(tensor.shape)}; resume with the model configuration it was saved with")
    model.load_state_dict(state)
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        optim = {k[len(OPTIM_PREFIX):]: v for k, v in tensors.items() if k.startswith(OPTIM_PREFIX)}
        load_optimizer_tensors(optimizer, names, optim, record["optimizer"], path)
    restore_rng({k[len(RNG_PREFIX):]: v for k, v in tensors.items() if k.startswith(RNG_PREFIX)})
    return record["meta"]
