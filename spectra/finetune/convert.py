"""Float -> ternary conversion: ternarization phased in during continued training, optionally distilled.

Every TernaryLinear becomes a :class:`PhasedTernaryLinear` whose effective weight is W + λ(Q(W) − W), Q the
TriLM ternarization (per-shard mean|W| scales) with the straight-through estimator, so the gradient reaching
the latent W is the identity for every λ. λ rises linearly from 0 (the float model, exactly) to 1 (the TriLM,
exactly) over a warm-up of steps; a warm-up of 0 ternarizes at once. The teacher, when given, is the original
float model in no-grad inference; the student then learns (1 − α)·CE + α·T²·KL(teacher_T ‖ student_T).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..linear import TernaryLinear, compute_dtype, ternary_weight_ste
from ..model import SpectraLM
from .data import IGNORE


class PhasedTernaryLinear(TernaryLinear):
    """TernaryLinear whose ternarization is phased in: W + λ(Q(W) − W); λ = 1 is TernaryLinear exactly."""

    phase: float = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.phase >= 1.0:
            return super().forward(x)
        w = self.weight.to(compute_dtype(x))
        if self.phase > 0.0:
            w = w + self.phase * (ternary_weight_ste(self.weight, self.parts, self.shard_axis, w.dtype) - w)
        return F.linear(x, w)


def phase_in(model: nn.Module) -> list[PhasedTernaryLinear]:
    """Turn the model's TernaryLinear layers into PhasedTernaryLinear in place (same parameters); returns them."""
    layers = []
    for module in model.modules():
        if type(module) is TernaryLinear:
            module.__class__ = PhasedTernaryLinear
            layers.append(module)
        elif isinstance(module, PhasedTernaryLinear):
            layers.append(module)
    return layers


def set_phase(model: nn.Module, phase: float) -> None:
    """λ of every phased layer of `model` (0: float weights, 1: ternary weights)."""
    for module in model.modules():
        if isinstance(module, PhasedTernaryLinear):
            module.phase = float(phase)


def phase_at(step: int, warmup_steps: int) -> float:
    """λ for optimizer step `step` (0-based): linear from 0 at step 0 to 1 at `warmup_steps` and after."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² · mean over (unmasked) tokens of KL(softmax(teacher / T) ‖ softmax(student / T)), in fp32.

    The T² keeps gradient sizes comparable across temperatures (Hinton et al., 2015).
    """
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1)
    if mask is not None:
        kl = kl[mask]
    return kl.mean() * t * t


class DistillationLoss:
    """The training loss of a conversion with a teacher: (1 − α)·CE + α·T²·KL, teacher in no-grad inference."""

    def __init__(self, teacher: SpectraLM, temperature: float = 2.0, weight: float = 0.5) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.weight = temperature, weight

    def __call__(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        inputs, targets, *documents = batch
        extra = {"document_ids": documents[0]} if documents else {}
        logits = model(inputs, **extra)
        with torch.no_grad():
            teacher_logits = self.teacher(inputs, **extra)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=IGNORE)
        kd = distillation_loss(logits, teacher_logits, self.temperature, targets != IGNORE)
        return (1.0 - self.weight) * ce + self.weight * kd
