"""Learning-rate and weight-decay schedules: warmup, cosine or linear decay, and mid-training phases.

The Spectra TriLM recipe (arXiv 2407.12327, optimization schedule) adds two interventions to a plain
warmup + decay schedule, and reports that each lowers the TriLM's loss:

* at about half of training the *peak* learning rate is lowered (the decay curve continues from the
  lower peak, so the LR drops by a constant factor from then on);
* at about two thirds of training weight decay is switched off (the ternarization itself regularizes).

Both are :class:`SchedulePhase` entries, so users can move, change or remove them, or add their own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import ConfigError

DECAYS = ("cosine", "linear", "constant")
# TriLM defaults (docs/training.md says why): peak LR cut to 0.625x at half of training, weight decay off at 2/3.
SPECTRA_LR_DROP_AT = 0.5
SPECTRA_LR_DROP_SCALE = 0.625
SPECTRA_WD_OFF_AT = 2 / 3


@dataclass(frozen=True)
class SchedulePhase:
    """From fraction `at` of the total steps on: peak LR times `lr_scale` and/or weight decay `weight_decay`.

    A field left None keeps the value of the phase before.
    """

    at: float
    lr_scale: float | None = None
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.at <= 1:
            raise ConfigError(f"schedule phase start {self.at} must be a fraction of training in [0, 1]")
        if self.lr_scale is not None and self.lr_scale < 0:
            raise ConfigError(f"schedule phase lr_scale must be >= 0, got {self.lr_scale}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError(f"schedule phase weight_decay must be >= 0, got {self.weight_decay}")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Schedule:
    """LR and weight decay as pure functions of the optimizer step (0-based: the step being taken)."""

    total_steps: int
    peak_lr: float
    warmup_steps: int = 0
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    phases: tuple[SchedulePhase, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ConfigError(f"total steps must be positive, got {self.total_steps}")
        if self.peak_lr <= 0:
            raise ConfigError(f"peak learning rate must be positive, got {self.peak_lr}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError(f"warmup steps {self.warmup_steps} must lie in [0, total steps {self.total_steps}]")
        if self.decay not in DECAYS:
            raise ConfigError(f"unknown LR decay {self.decay!r}; use one of {', '.join(DECAYS)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        object.__setattr__(self, "phases", tuple(sorted(self.phases, key=lambda p: p.at)))

    def phase_start(self, phase: SchedulePhase) -> int:
        """First step of a phase: the fraction of training rounded to a whole step."""
        return round(phase.at * self.total_steps)

    def _active(self, step: int) -> tuple[float, float]:
        lr_scale, wd = 1.0, self.weight_decay
        for phase in self.phases:
            if step >= self.phase_start(phase):
                lr_scale = lr_scale if phase.lr_scale is None else phase.lr_scale
                wd = wd if phase.weight_decay is None else phase.weight_decay
        return lr_scale, wd

    def shape(self, step: int) -> float:
        """The warmup + decay curve in [min_lr_ratio, 1] (before phases)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.decay == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            factor = 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * factor

    def lr(self, step: int) -> float:
        return self.peak_lr * self._active(step)[0] * self.shape(step)

    def weight_decay_at(self, step: int) -> float:
        return self._active(step)[1]

    def describe(self) -> str:
        parts = [f"peak LR {self.peak_lr:g}, {self.warmup_steps} warmup steps, {self.decay} decay to "
                 f"{self.min_lr_ratio:g}x, weight decay {self.weight_decay:g}"]
        for p in self.phases:
            what = []
            if p.lr_scale is not None:
                what.append(f"peak LR x{p.lr_scale:g}")
            if p.weight_decay is not None:
                what.append(f"weight decay {p.weight_decay:g}")
            parts.append(f"from step {self.phase_start(p)} ({p.at:.0%}): {', '.join(what) or 'no change'}")
        return "; ".join(parts)


def spectra_phases(lr_drop_at: float | None = SPECTRA_LR_DROP_AT, lr_drop_scale: float = SPECTRA_LR_DROP_SCALE,
                   wd_off_at: float | None = SPECTRA_WD_OFF_AT) -> tuple[SchedulePhase, ...]:
    """The TriLM interventions; pass None for either start to leave that intervention out."""
    phases = []
    if lr_drop_at is not None:
        phases.append(SchedulePhase(at=lr_drop_at, lr_scale=lr_drop_scale))
    if wd_off_at is not None:
        phases.append(SchedulePhase(at=wd_off_at, weight_decay=0.0))
    return tuple(phases)
