"""Fine-tuning runs: supervised fine-tuning, float -> ternary conversion and LoRA, all through the one
training loop (spectra.train.loop.train) with their own dataset, model and objective.

A run directory holds what `spectra train` writes (metrics.jsonl, run.json, checkpoints/step-*/) plus
``finetune.json`` (this run's :class:`FinetuneConfig`, so `--resume` rebuilds the same model and data) and
the product: ``model/`` (full fine-tuning and conversion; a TriLM frozen to exact trits, packed if asked) or
``adapter/`` (LoRA; the base is not copied).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..block import BLOCK_LINEARS
from ..checkpoint import (
    _infer_parts,
    load_checkpoint,
    read_config,
    resolve_device,
    save_checkpoint,
    weight_files,
)
from ..config import DENSE_KINDS, dataclass_from_dict
from ..convert import freeze_ternary, pack_model
from ..data import TokenDataset
from ..errors import ConfigError, DeviceError, TrainingError
from ..io import check_output, write_text_atomic
from ..kinds import PACKED_KINDS
from ..lora import LoRAConfig, apply_lora, save_adapter
from ..model import SpectraLM
from ..packed import ternary_values
from ..ternary import detect_ternary, latent_from_ternary
from ..tokenizer import EOS_TOKEN, load_tokenizer
from ..train import TrainConfig, TrainResult, train
from ..train.memory import training_memory_refusal
from ..train.state import CHECKPOINTS_DIR, read_training_meta, resolve_resume
from ..train.step import Objective, build_loaders, check_compatible, evaluate
from .convert import DistillationLoss, phase_at, phase_in, set_phase
from .data import ChatFormat, FinetuneDataset

TASK_FILE = "finetune.json"
METHODS = ("full", "lora", "convert")
BASE_FORMATS = ("tq2", "tq1", "int8")
# Peak LRs when none is given (short runs on small data): latent ternary weights must move about a scale to
# flip a trit, so they take a larger LR than float weights; adapters start from zero and take a large one.
DEFAULT_LR = {"full/float": 1e-4, "full/ternary": 5e-4, "lora": 1e-3, "convert": 2.4e-3}


@dataclass
class FinetuneConfig:
    """What a fine-tuning run adds to TrainConfig: its method, data format and the method's options."""

    checkpoint: str                          # the model to start from (a checkpoint directory)
    method: str = "full"                     # "full" (SFT of every weight), "lora", "convert" (float -> ternary)
    val_data: str | None = None              # held-out examples; default: every k-th example of the data
    val_fraction: float = 0.1                # k = 1 / val_fraction
    chat_template: bool = True               # use the tokenizer's chat template when it has one
    lora: dict[str, Any] = field(default_factory=lambda: dataclasses.asdict(LoRAConfig()))
    base_format: str = "tq2"                 # LoRA base of a TriLM: packed "tq2"/"tq1", or "int8" trits
    model_parallel_size: int | None = None   # convert: per-shard scales (default: the checkpoint's)
    ternary_warmup: int = 0                  # convert: steps over which λ goes from 0 to 1 (0: at once)
    teacher: bool = False                    # convert: distil from the original float model
    temperature: float = 2.0                 # convert: distillation temperature
    distill_weight: float = 0.5              # convert: α in (1 − α)·CE + α·T²·KL
    pack: str | None = None                  # full / convert: also pack the final TriLM (tq2 | tq1)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown fine-tuning method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.base_format not in BASE_FORMATS:
            raise ConfigError(f"unknown LoRA base format {self.base_format!r}; use one of {', '.join(BASE_FORMATS)}")
        if self.pack is not None and self.pack not in PACKED_KINDS:
            raise ConfigError(f"unknown pack format {self.pack!r}; use one of {', '.join(PACKED_KINDS)}")
        # `not 0 < t`: NaN fails too (it used to reach the first step as a NaN loss).
        if not 0 < self.temperature < math.inf or not 0 <= self.distill_weight <= 1 or self.ternary_warmup < 0:
            raise ConfigError(f"temperature must be a finite positive number, distill_weight in [0, 1] and "
                              f"ternary_warmup >= 0, got {self.temperature}, {self.distill_weight} and "
                              f"{self.ternary_warmup}")
        LoRAConfig(**self.lora)  # validates

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        return dataclass_from_dict(cls, data, "fine-tuning config")


@dataclass
class FinetuneResult:
    train: TrainResult
    val_loss_before: float | None      # held-out loss (response tokens) of the starting model
    product: Path                      # the final model directory, or the adapter directory
    data_summary: str


# --- models ---------------------------------------------------------------------------------------

def _training_kind(task: FinetuneConfig) -> str:
    if task.method == "convert":
        return "ternary"
    if task.method == "lora":
        return "float"  # only the adapters train, and they are float
    config = read_config(task.checkpoint)
    if config.weight_kind in (*PACKED_KINDS, "ternary", "ternary_frozen"):
        return "ternary"
    return "ternary" if _stores_trits(task.checkpoint) else "float"


def _stores_trits(checkpoint: str) -> bool:
    """Whether a dense checkpoint's first matrix is ternary (trits times per-shard scales). A float-declared
    checkpoint may still hold a TriLM (transformers' config of a SpectraSuite *_Unpacked model); loading looks
    at all of them, this at the first only (one tensor read)."""
    first = f"model.layers.0.{BLOCK_LINEARS[0].path}.weight"
    for file in weight_files(Path(checkpoint)):
        with safe_open(str(file), framework="pt") as f:
            if first in f.keys():
                weight = f.get_tensor(first).float()
                parts = _infer_parts({first: weight})
                return bool(parts) and detect_ternary(weight, parts, 0) is not None
    return False


def build_model(task: FinetuneConfig, kind: str, device: torch.device) -> SpectraLM:
    """The model the run trains: latent weights for full fine-tuning, phased ternarization for conversion,
    a frozen (packed) base with adapters for LoRA."""
    torch.manual_seed(0)
    if task.method == "lora":
        model = load_checkpoint(task.checkpoint, dtype=torch.float32)
        if model.config.weight_kind == "ternary_frozen" and task.base_format in PACKED_KINDS:
            model = pack_model(model, task.base_format)
        apply_lora(model, LoRAConfig(**task.lora))
        return model.to(device).train()
    if task.method == "convert":
        source = load_checkpoint(task.checkpoint, dtype=torch.float32, kind="float")
        parts = task.model_parallel_size or source.config.model_parallel_size
        model = SpectraLM(source.config.replace(weight_kind="ternary", model_parallel_size=parts))
        model.load_state_dict(source.state_dict())  # same parameter names: the float weights become latent ones
        phase_in(model)
        return model.to(device).train()
    if read_config(task.checkpoint).weight_kind in PACKED_KINDS:
        return latent_model(load_checkpoint(task.checkpoint, dtype=torch.float32)).to(device).train()
    return load_checkpoint(task.checkpoint, dtype=torch.float32, kind=kind).to(device).train()


def planned_model(task: FinetuneConfig, kind: str) -> SpectraLM:
    """The model :func:`build_model` would build, on the meta device: its parameters, buffers and trainable
    flags without reading a weight, for the memory check made before the base is loaded."""
    config = read_config(task.checkpoint)
    if task.method == "lora":
        if config.weight_kind in DENSE_KINDS:  # load_checkpoint freezes a dense TriLM, keeps other weights float
            config = config.replace(weight_kind="ternary_frozen" if _stores_trits(task.checkpoint) else "float")
        if config.weight_kind == "ternary_frozen" and task.base_format in PACKED_KINDS:
            config = config.replace(weight_kind=task.base_format)
    elif task.method == "convert":
        config = config.replace(weight_kind="ternary", weight_options={},
                                model_parallel_size=task.model_parallel_size or config.model_parallel_size)
    elif kind == "ternary" or config.weight_kind in PACKED_KINDS:  # latent weights (latent_model, or a load)
        config = config.replace(weight_kind="ternary", weight_options={})
    else:
        config = config.replace(weight_kind="float", weight_options={})
    with torch.device("meta"):
        model = SpectraLM(config)
        if task.method == "lora":
            apply_lora(model, LoRAConfig(**task.lora))
    return model


@torch.no_grad()
def latent_model(model: SpectraLM) -> SpectraLM:
    """A trainable TriLM (latent weights) that ternarizes to exactly the trits and scales of `model`'s
    ternary layers (packed or frozen), as loading a dense TriLM checkpoint with kind="ternary" gives."""
    linear = model.linear_layers()
    config = model.config.replace(weight_kind="ternary", weight_options={})
    latent = SpectraLM(config)
    latent.load_state_dict({k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in linear},
                           strict=False)
    for name, module in latent.linear_layers().items():
        trits, scales = ternary_values(name, linear[name])
        module.weight.copy_(latent_from_ternary(trits, scales, module.shard_axis))
    return latent


def build_dataset(task: FinetuneConfig, data: str, seq_len: int):
    """A prepared token directory (plain continued training) or a file of examples (packed)."""
    if Path(data).is_dir():
        return TokenDataset(data)
    tokenizer = load_tokenizer(task.checkpoint)
    eos = EOS_TOKEN if tokenizer.token_to_id(EOS_TOKEN) is not None else ""
    chat = ChatFormat.for_checkpoint(task.checkpoint, eos) if task.chat_template else ChatFormat(None, eos)
    return FinetuneDataset(data, tokenizer, seq_len, chat, task.val_fraction, task.val_data)


def build_objective(task: FinetuneConfig, device: torch.device) -> Objective:
    if task.method == "lora":
        return Objective(adapters_only=True)
    if task.method != "convert":
        return Objective()
    loss = Objective().loss
    if task.teacher:
        teacher = load_checkpoint(task.checkpoint, dtype=torch.float32, kind="float").to(device)
        loss = DistillationLoss(teacher, task.temperature, task.distill_weight)
    return Objective(loss=loss)


# --- the run --------------------------------------------------------------------------------------

def finetune(task: FinetuneConfig | None = None, *, resume: str | Path | None = None, echo=print,
             **train_options: Any) -> FinetuneResult:
    """Fine-tune (or convert, or LoRA-adapt) `task.checkpoint` on `train_options["data"]` into
    `train_options["out_dir"]`; `resume` (a run directory or checkpoint) continues a run where it stopped.

    `train_options` are TrainConfig fields (steps, batch_size, lr, seq_len, ...); defaults suited to
    fine-tuning (a plain schedule with cosine decay, a method-specific peak LR) fill what is not given.
    """
    if resume is not None:
        checkpoint = resolve_resume(resume)
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else Path(resume)
        if not (run_dir / TASK_FILE).is_file():
            raise TrainingError(f"{run_dir} has no {TASK_FILE}: it is not a fine-tuning run (resume pretraining "
                                f"runs with `spectra train --resume`)")
        task = FinetuneConfig.from_dict(json.loads((run_dir / TASK_FILE).read_text()))
        saved = read_training_meta(checkpoint)["meta"]["config"]
        config = TrainConfig.from_dict({**saved, "out_dir": str(run_dir), **train_options})
    else:
        if task is None:
            raise ConfigError("pass a FinetuneConfig (the checkpoint and method) or resume=RUN_DIR")
        read_config(task.checkpoint)  # fails early on a bad checkpoint
        config = _train_config(task, train_options)
        run_dir = Path(config.out_dir)
        if (run_dir / TASK_FILE).exists() or (run_dir / CHECKPOINTS_DIR).exists():
            raise TrainingError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose "
                                f"another --out")
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise TrainingError(f"{run_dir} exists and is not an empty directory; choose another --out")
        # Never inside the checkpoint or the data (finetune.json used to be written there before the refusal).
        check_output(run_dir, "finetune", sources=[s for s in (task.checkpoint, config.data, task.val_data) if s])
    device = resolve_device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    planned = planned_model(task, config.kind)
    seq_len = config.seq_len or planned.config.max_seq_len
    config = config.replace(seq_len=seq_len)
    dataset = build_dataset(task, config.data, seq_len)
    # before the base is read: a run that cannot fit is refused in seconds, not after loading gigabytes
    too_big = training_memory_refusal(config, device, planned, dataset=dataset)
    if too_big is not None:
        raise DeviceError(too_big)
    model = build_model(task, config.kind, device)
    summary = dataset.describe() if isinstance(dataset, FinetuneDataset) else f"prepared tokens at {config.data}"
    echo(f"data: {summary}")
    objective = build_objective(task, device)
    if task.method == "convert":
        if task.ternary_warmup >= config.steps:
            raise ConfigError(f"the ternarization warm-up ({task.ternary_warmup} steps) must end before the last "
                              f"step ({config.steps}); lower --ternary-warmup or raise --steps")
        objective.before_step = lambda step: set_phase(model, phase_at(step, task.ternary_warmup))
    check_compatible(model, dataset, seq_len, objective.adapters_only, task.checkpoint)  # before anything is written
    # again with the built model (exact sizes, the weights now on the device); train() checks once more, but
    # finetune.json and the held-out loss come before it
    too_big = training_memory_refusal(config, device, model, dataset=dataset)
    if too_big is not None:
        raise DeviceError(too_big)
    before = None
    if resume is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / TASK_FILE, json.dumps(task.to_dict(), indent=2) + "\n")
        before = _held_out_loss(model, dataset, config, device)
        if before is not None:
            echo(f"held-out loss before: {before:.4f}")
    # force: the directory was checked above (new or empty) and now holds this run's own finetune.json.
    result = train(config, resume=resume, initial_model=model, dataset=dataset, objective=objective, force=True)
    product = _save_product(task, result.model, run_dir, dataset.tokenizer())
    return FinetuneResult(train=result, val_loss_before=before, product=product, data_summary=summary)


def _train_config(task: FinetuneConfig, options: dict[str, Any]) -> TrainConfig:
    kind = _training_kind(task)
    lr_key = task.method if task.method != "full" else f"full/{kind}"
    defaults = {"model": task.checkpoint, "kind": kind, "lr": DEFAULT_LR[lr_key], "schedule": "plain",
                "decay": "cosine", "weight_decay": 0.0 if task.method == "lora" else 0.1,
                "warmup_steps": max(1, round(0.05 * options.get("steps", 1000)))}
    return TrainConfig(**{**defaults, **{k: v for k, v in options.items() if v is not None}})


def _held_out_loss(model: SpectraLM, dataset, config: TrainConfig, device: torch.device) -> float | None:
    """The starting model's held-out loss on the batches the loop evaluates (conversion: the float model)."""
    if isinstance(dataset, TokenDataset):
        batches = build_loaders(config, dataset, config.seq_len)[1]
    else:
        batches = dataset.loaders(config, config.seq_len)[1]
    set_phase(model, 0.0)
    loss = evaluate(model, batches, device, config.precision)
    set_phase(model, 1.0)
    return loss


def _save_product(task: FinetuneConfig, model: SpectraLM, run_dir: Path, tokenizer) -> Path:
    if task.method == "lora":
        return save_adapter(model, run_dir / "adapter", base=str(Path(task.checkpoint).resolve()))
    set_phase(model, 1.0)
    if model.config.weight_kind == "ternary":
        freeze_ternary(model)
        if task.pack:
            pack_model(model, task.pack)
    return save_checkpoint(model.eval(), run_dir / "model", tokenizer=tokenizer)

