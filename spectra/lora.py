"""LoRA adapters on any linear layer of the model, above all on a frozen, packed ternary base.

``y = base(x) + (α / r) · B(A(x))``: the base layer (TQ2/TQ1 packed, int8 trits, or float) is frozen and
keeps its own storage, so the base costs its packed bytes; only the rank-r matrices A [r, in] and B [out, r]
train. The base's backward is a custom autograd function that rebuilds the dense weight only for the
product with the incoming gradient (the packed GPU kernels have no backward, and the base needs no
weight gradient). B starts at zero, so a fresh adapter leaves the model's outputs exactly as they were.

Adapters are saved apart from the base as peft does it — ``adapter_config.json`` and
``adapter_model.safetensors`` with names ``base_model.model.<layer>.lora_A.weight`` — because our layer
names are those of transformers' LLaMA, a peft LoRA of rank r on the same modules has the same names and
shapes. peft itself does not fit: it wraps nn.Linear (and a list of known quantized layers), not our packed
layers, and it would route the backward through kernels that have none.

Beside them, ``spectra_base.json`` records the base the adapter was trained on: its checkpoint, config
essentials and weight fingerprint (spectra.fingerprint). Loading on a base with other weights is refused
unless forced. It is a file of its own because older peft versions refuse unknown keys in adapter_config.json.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .block import LINEAR_NAMES
from .errors import CheckpointError, ConfigError, SpectraWarning
from .fingerprint import FINGERPRINT_VERSION, base_summary, held_dtype, weight_fingerprint
from .io import atomic_dir, check_output
from .linear import replace_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_OWNER = "lora-adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BASE = "spectra_base.json"  # the base it was trained on: checkpoint, config essentials, fingerprint
PEFT_PREFIX = "base_model.model."
ALL_TARGETS = LINEAR_NAMES  # every linear layer of a block (spectra.block)


@dataclass
class LoRAConfig:
    """Rank, α (the update is scaled by α / rank) and the names of the layers that get adapters."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be at least 1, got {self.rank}")
        if not -math.inf < self.alpha < math.inf:  # NaN used to reach the first step as a NaN loss
            raise ConfigError(f"LoRA alpha must be a finite number, got {self.alpha}")
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"unknown LoRA target layers {unknown or '(none given)'}; choose among "
                              f"{', '.join(ALL_TARGETS)}")

    def peft_dict(self) -> dict:
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
                "target_modules": list(self.targets), "lora_dropout": 0.0, "bias": "none",
                "fan_in_fan_out": False, "inference_mode": True}

    @classmethod
    def from_peft_dict(cls, data: dict, where: Path) -> LoRAConfig:
        if data.get("peft_type", "LORA") != "LORA" or "r" not in data:
            raise CheckpointError(f"{where} is not a LoRA adapter config (peft_type LORA with 'r')")
        targets = data.get("target_modules") or ALL_TARGETS
        return cls(rank=int(data["r"]), alpha=float(data.get("lora_alpha", data["r"])),
                   targets=tuple(targets) if isinstance(targets, list) else (targets,))


class _FrozenBaseProduct(torch.autograd.Function):
    """y = base(x) with the base frozen: the backward gives x its gradient from the dense weight, rebuilt on the
    fly, and the base none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base = base
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.base.dense_weight().to(grad.dtype)
        return grad @ weight, None


class LoRALinear(nn.Module):
    """A frozen base linear layer plus a trainable low-rank update (α / r)·B·A."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.shard_axis, self.parts = base.shard_axis, base.parts
        device = next(iter(base.buffers()), next(iter(base.parameters()), None)).device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's initialisation
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenBaseProduct.apply(x, self.base) if torch.is_grad_enabled() else self.base(x)
        return y + self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))).to(y.dtype) * self.scaling

    def dense_weight(self) -> torch.Tensor:
        """The merged weight base + (α / r)·B·A (float)."""
        update = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return self.base.dense_weight().float() + update.float()


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and put a fresh adapter on each target layer; returns their names."""
    if getattr(model, "projections_fused", False):  # q/k/v and gate/up would silently get no adapter
        raise ConfigError("this model's q/k/v and gate/up projections are fused for inference (fuse_projections; "
                          "spectra.generate does it on a GPU); call model.unfuse_projections() first (the same "
                          "weights, separate layers)")
    model.requires_grad_(False)
    names = []
    for name, module in list(model.linear_layers().items()):
        if name.rsplit(".", 1)[-1] in config.targets and not isinstance(module, LoRALinear):
            replace_layers(model, {name: LoRALinear(module, config.rank, config.alpha)})
            names.append(name)
    if not names:
        raise ConfigError(f"the model has no layers named {', '.join(config.targets)} to adapt")
    return names


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of `model` under peft's names."""
    return {f"{PEFT_PREFIX}{name}.{part}.weight": getattr(module, part).weight.detach().cpu().contiguous()
            for name, module in model.named_modules() if isinstance(module, LoRALinear)
            for part in ("lora_A", "lora_B")}


def lora_config_of(model: nn.Module) -> LoRAConfig:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ConfigError("the model has no LoRA adapters to save; apply them first (apply_lora)")
    rank = layers[0][1].lora_A.out_features
    targets = tuple(t for t in ALL_TARGETS if any(name.endswith(t) for name, _ in layers))
    return LoRAConfig(rank=rank, alpha=layers[0][1].scaling * rank, targets=targets)


def save_adapter(model: nn.Module, path: str | Path, base: str | None = None, force: bool = False) -> Path:
    """Write the adapters of `model` to directory `path` (adapter_config.json + adapter_model.safetensors, and
    spectra_base.json with the fingerprint of the base `model` holds, checkpoint `base`), atomically; an
    existing `path` that is not an earlier adapter is refused unless `force`."""
    path = Path(path)
    config = lora_config_of(model).peft_dict() | {"base_model_name_or_path": base}
    record = {"version": FINGERPRINT_VERSION, "checkpoint": base, "config": base_summary(model),
              "fingerprint": weight_fingerprint(model)}
    check_output(path, ADAPTER_OWNER, force=force)
    with atomic_dir(path, ADAPTER_OWNER) as staging:
        save_file(adapter_tensors(model), str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (staging / ADAPTER_BASE).write_text(json.dumps(record, indent=2) + "\n")
    return path


def _read_base_record(path: Path) -> dict | None:
    file = path / ADAPTER_BASE
    if not file.exists():
        return None
    try:
        record = json.loads(file.read_text())
        fingerprint = record["fingerprint"]
        if not isinstance(fingerprint, dict) or not all(isinstance(v, str) for v in fingerprint.values()):
            raise TypeError("fingerprint is not an object of digests")
    except (json.JSONDecodeError, OSError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot read {file} ({err}); it is corrupt: save the adapter again, or delete the "
                              f"file to load it unchecked") from None
    return record


def check_adapter_base(model: nn.Module, path: str | Path, force: bool = False, base: str | None = None) -> None:
    """Refuse (CheckpointError) the adapter in `path` for `model` (loaded from checkpoint `base`, for the
    message) unless `model` holds the base weights it was trained on; with `force`, warn instead. An adapter
    saved before fingerprints were recorded loads with a warning that its base cannot be checked."""
    path = Path(path)
    record = _read_base_record(path)
    here = base or "the model given"
    if record is None:
        warnings.warn(f"adapter {path} has no {ADAPTER_BASE} (saved by an older spectra), so it cannot be "
                      f"checked that {here} is the base it was trained on; loading it anyway", SpectraWarning,
                      stacklevel=3)
        return
    if record.get("version") != FINGERPRINT_VERSION:
        message = (f"{path / ADAPTER_BASE} has fingerprint version {record.get('version')!r}, which this spectra "
                   f"(version {FINGERPRINT_VERSION}) cannot check")
        if not force:
            raise CheckpointError(f"{message}; update spectra, or pass --force-base (force=True) to load it unchecked")
        warnings.warn(f"{message}; loading it unchecked as forced", SpectraWarning, stacklevel=3)
        return
    dtype = held_dtype(model)
    expected = record["fingerprint"].get(dtype)
    if expected is not None and weight_fingerprint(model, (dtype,))[dtype] == expected:
        return
    trained_on = record.get("checkpoint") or "a base whose path was not recorded"
    theirs, ours = record.get("config", {}), base_summary(model)
    differ = [f"{key} {theirs.get(key)} there, {ours[key]} here" for key in ours if theirs.get(key) != ours[key]]
    why = f"({'; '.join(differ[:2])})" if differ else "(same shape, other weights)"
    if force:
        warnings.warn(f"adapter {path} was trained on {trained_on}, not on {here} {why}; loading it anyway as "
                      f"forced: its outputs may be garbage", SpectraWarning, stacklevel=3)
        return
    raise CheckpointError(f"adapter {path} was trained on {trained_on}, and {here} is another base {why}; load "
                          f"it on the base it was trained on, or pass --force-base (force=True) to load it anyway")


def load_adapter(model: nn.Module, path: str | Path, force: bool = False, base: str | None = None) -> nn.Module:
    """Put the adapters saved in `path` on `model` (in place); every tensor must match a layer exactly.

    `model` must hold the base weights the adapter was trained on (its recorded fingerprint), else
    CheckpointError before anything changes; `force` loads it anyway with a warning. `base` names the
    checkpoint `model` was loaded from, for the messages."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{path} is not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, "
                              f"as `spectra finetune --method lora` writes)")
    try:
        config = LoRAConfig.from_peft_dict(json.loads((path / ADAPTER_CONFIG).read_text()), path / ADAPTER_CONFIG)
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except (json.JSONDecodeError, SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read the adapter in {path} ({err}); it is corrupt") from None
    check_adapter_base(model, path, force, base)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    adapted = {name for name, module in model.linear_layers().items() if isinstance(module, LoRALinear)}
    try:
        apply_lora(model, config)
        _copy_adapter(model, tensors, path)
    except (CheckpointError, ConfigError):
        # an adapter that does not fit leaves the model as it was, not half-adapted
        replace_layers(model, {name: module.base for name, module in model.linear_layers().items()
                               if isinstance(module, LoRALinear) and name not in adapted})
        for name, p in model.named_parameters():
            p.requires_grad_(trainable.get(name, p.requires_grad))
        raise
    return model


def _copy_adapter(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy the adapter's tensors into the LoRA layers of `model`: every tensor must match a layer exactly."""
    expected = adapter_tensors(model)
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"{path} does not fit this model: missing {missing[:2]}, unknown {unknown[:2]}; "
                              f"load it on the base it was trained on")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                for part in ("lora_A", "lora_B"):
                    src = tensors[f"{PEFT_PREFIX}{name}.{part}.weight"]
                    dst = getattr(module, part).weight
                    if src.shape != dst.shape:
                        raise CheckpointError(f"{path}: {name}.{part} has shape {tuple(src.shape)}, the model "
                                              f"needs {tuple(dst.shape)}; load it on the base it was trained on")
                    dst.copy_(src.to(dst.dtype))
