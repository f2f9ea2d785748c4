"""What one training step needs, each its own function: the model, its optimizer, the loaders, the loss of a batch
(and fine-tuning's `Objective`), the step itself and evaluation on fixed batches.

Distributed training wraps the model (`spectra.distributed.plans`) and shards the batches around these
functions without changing them; the trainer (spectra.train.loop) calls them in order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import load_checkpoint
from ..config import TRAINABLE_KINDS, get_config
from ..data import TokenDataset, WindowLoader, tokenizer_fingerprint
from ..distributed import ParallelContext, clip_grad_norm_, mean_over_data_parallel
from ..errors import ConfigError, DataError
from ..model import SpectraLM
from ..tokenizer import TOKENIZER_FILE, load_tokenizer
from .config import TrainConfig
from .schedule import Schedule


def build_model(cfg: TrainConfig, device: torch.device) -> SpectraLM:
    """A fresh model of preset `cfg.model` (seeded), or one initialised from the checkpoint directory `cfg.model`."""
    torch.manual_seed(cfg.seed)
    if Path(cfg.model).is_dir():
        model = load_checkpoint(cfg.model, device=device, dtype=torch.float32, kind=cfg.kind)
        if cfg.model_overrides:
            raise ConfigError("model overrides apply to presets only; a checkpoint keeps its own shape")
    else:
        model = SpectraLM(get_config(cfg.model, weight_kind=cfg.kind, **cfg.model_overrides))
    return model.to(device).train()


def check_compatible(model: SpectraLM, dataset: TokenDataset, seq_len: int, adapters_only: bool = False,
                     checkpoint: str | Path | None = None) -> None:
    config = model.config
    if checkpoint is not None and isinstance(dataset, TokenDataset) and (Path(checkpoint) / TOKENIZER_FILE).is_file():
        # Ids of another tokenizer mean other text to this model: it would train on noise, silently.
        expected = dataset.index.get("tokenizer_sha256")
        if expected and tokenizer_fingerprint(load_tokenizer(checkpoint)) != expected:
            raise DataError(f"{dataset.path} was tokenized with another tokenizer than the checkpoint {checkpoint}; "
                            f"prepare the data with `spectra data prepare --tokenizer {checkpoint}`")
    if config.weight_kind not in TRAINABLE_KINDS and not adapters_only:
        raise ConfigError(f"cannot train weight kind {config.weight_kind!r}; train 'ternary' or 'float' "
                          f"(load checkpoints with kind='ternary' to continue a TriLM)")
    if dataset.vocab_size > config.vocab_size:
        raise ConfigError(f"the tokenizer of {dataset.path} has {dataset.vocab_size} tokens but the model's "
                          f"vocab_size is {config.vocab_size}; give the model a larger vocabulary "
                          f"(--vocab-size {dataset.vocab_size}) or prepare the data with a smaller tokenizer")
    if seq_len > config.max_seq_len:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}; "
                          f"use --seq-len {config.max_seq_len} or less")


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear, embedding, lm head) only; norm gains are never decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    schedule = cfg.make_schedule()
    # foreach: torch's choice (multi-tensor kernels on GPU, ~10% of a 1.1B step on an H200 against the
    # per-parameter loop, docs/performance.md; the loop on CPU), except under tensor parallelism, where plain
    # (embedding, norms) and DTensor parameters cannot share one multi-tensor kernel. Both are deterministic,
    # so a resumed run repeats the bits either way.
    mixed = len({hasattr(p, "device_mesh") for p in decay + no_decay}) > 1
    return torch.optim.AdamW(groups, lr=schedule.lr(0), betas=cfg.betas, eps=cfg.eps,
                             foreach=False if mixed else None)


def build_loaders(cfg: TrainConfig, dataset: TokenDataset, seq_len: int) -> tuple[WindowLoader, list, list]:
    """The shuffled training loader and the fixed evaluation batches of the validation and training splits."""
    train = WindowLoader(dataset, "train", seq_len, cfg.batch_size, seed=cfg.seed)
    train_fixed = WindowLoader(dataset, "train", seq_len, cfg.batch_size, shuffle=False).fixed_batches(
        cfg.eval_batches)
    val_batches: list = []
    if dataset.num_tokens("val") > seq_len:
        val_batches = WindowLoader(dataset, "val", seq_len, cfg.batch_size, shuffle=False).fixed_batches(
            cfg.eval_batches)
    return train, val_batches, train_fixed


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU (fp32 master weights and optimizer), plain fp32 on CPU unless asked otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    """Mean cross-entropy of a batch: (inputs, targets) windows, or (inputs, targets, document_ids) of packed
    fine-tuning examples (targets -100 where no loss is taken)."""
    inputs, targets, *document_ids = batch
    if document_ids:
        return model(inputs, targets, document_ids=document_ids[0])[1]
    return model(inputs, targets)[1]


@dataclass
class Objective:
    """What fine-tuning and conversion change in the loop (spectra.finetune): the training loss of a batch,
    a hook run before every step (the ternarization phase-in), and whether only adapters train (LoRA on a
    frozen base of any weight kind). Evaluation always reports `batch_loss`."""

    loss: Callable[[nn.Module, tuple], torch.Tensor] = batch_loss
    before_step: Callable[[int], None] | None = None
    adapters_only: bool = False


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loader: WindowLoader, cfg: TrainConfig,
               schedule: Schedule, step: int, device: torch.device,
               ctx: ParallelContext | None = None, objective: Objective | None = None) -> tuple[float, float]:
    """One optimizer step over `cfg.grad_accum` micro-batches; returns (mean loss, gradient norm).

    A non-finite loss or gradient norm leaves the weights untouched (the caller decides to stop or skip).
    Under a parallel `ctx` the norm is the global one over all shards and the loss the global-batch mean,
    so every rank takes the same decision.
    """
    for group in optimizer.param_groups:
        group["lr"] = schedule.lr(step)
        group["weight_decay"] = schedule.weight_decay_at(step) if group.get("name") == "decay" else 0.0
    loss_of = objective.loss if objective is not None else batch_loss
    if objective is not None and objective.before_step is not None:
        objective.before_step(step)
    total = torch.zeros((), device=device)
    for _ in range(cfg.grad_accum):
        batch = tuple(t.to(device, non_blocking=True) for t in loader.next_batch())
        with autocast_context(device, cfg.precision):
            loss = loss_of(model, batch)
        (loss / cfg.grad_accum).backward()
        total += loss.detach().float()
    if ctx is not None and ctx.distributed:
        norm = clip_grad_norm_(model, cfg.grad_clip if cfg.grad_clip is not None else math.inf, ctx)
        total = mean_over_data_parallel(total, ctx)
    else:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip is not None else math.inf)
    loss_value, norm_value = float(total) / cfg.grad_accum, float(norm)
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, device: torch.device, precision: str) -> float | None:
    """Mean loss per token over fixed batches (None when there are none); tokens without a target (-100,
    fine-tuning prompts) do not count."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with autocast_context(device, precision):
            loss = batch_loss(model, tuple(t.to(device) for t in batch))
        tokens = int((batch[1] != -100).sum())
        total += float(loss) * tokens
        count += tokens
    model.train(was_training)
    return total / count if count else None  # held-out rows whose targets were all cut off: nothing to score
