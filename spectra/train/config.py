"""The training run configuration: one dataclass, saved as JSON with every checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import dataclass_from_dict
from ..errors import ConfigError
from .schedule import (
    SPECTRA_LR_DROP_AT,
    SPECTRA_LR_DROP_SCALE,
    SPECTRA_WD_OFF_AT,
    Schedule,
    SchedulePhase,
    spectra_phases,
)

# Peak learning rates when none is given. TriLM: the paper's small-model TriLM peak (docs/training.md);
# ternary weights need a larger LR than float ones, since a latent weight must move by about a scale
# before its trit flips. FloatLM: a common value for LLaMA-style models of this size.
DEFAULT_LR = {"ternary": 2.4e-3, "float": 1e-3}
SCHEDULES = ("auto", "spectra", "plain")
PRECISIONS = ("auto", "fp32", "bf16")
ON_NAN = ("stop", "skip")


# torch CPU threads a run may ask for: 100,000 crashed torch (segmentation fault), and no CPU has that many cores.
MAX_THREADS = 1024

@dataclass
class TrainConfig:
    """Everything a run needs; `spectra train` flags map one to one onto these fields."""

    data: str                                   # a prepared dataset directory (spectra data prepare)
    out_dir: str                                # run directory: metrics.jsonl, checkpoints/step-*/
    model: str = "tiny"                         # preset name (tiny, mini, 99M, ... 3.9B) or a checkpoint to start from
    kind: str = "ternary"                       # "ternary" (TriLM) or "float" (FloatLM)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields, e.g. {"vocab_size": 2048}
    steps: int = 1000                           # optimizer steps
    batch_size: int = 8                         # sequences per micro-batch
    grad_accum: int = 1                         # micro-batches per optimizer step
    seq_len: int | None = None                  # default: the model's max_seq_len
    lr: float | None = None                     # peak LR; default DEFAULT_LR[kind]
    min_lr_ratio: float = 0.1                   # final LR as a fraction of the peak
    warmup_steps: int | None = None             # default: 1% of the steps (at least 1)
    decay: str | None = None                    # "cosine" | "linear" | "constant"; default linear (TriLM), cosine
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0               # max global gradient norm; None turns clipping off
    schedule: str = "auto"                      # "spectra" (TriLM phases), "plain", or "auto" (spectra iff ternary)
    lr_drop_at: float | None = SPECTRA_LR_DROP_AT    # fraction of training; None: no peak-LR drop
    lr_drop_scale: float = SPECTRA_LR_DROP_SCALE
    wd_off_at: float | None = SPECTRA_WD_OFF_AT      # fraction of training; None: weight decay stays on
    phases: list[dict[str, float]] | None = None     # explicit SchedulePhase dicts; replace the three fields above
    eval_every: int = 100                       # steps between validation losses (0: only at the end)
    eval_batches: int = 20                      # fixed validation batches per evaluation
    save_every: int = 500                       # steps between checkpoints (0: only at the end)
    keep_last: int = 3                          # checkpoints kept on disk
    log_every: int = 10                         # steps between metrics records
    seed: int = 0
    device: str | None = None                   # default: cuda when available
    precision: str = "auto"                     # "auto": bf16 autocast on GPU, fp32 on CPU
    compile: bool = False                       # torch.compile the model for training
    on_nan: str = "stop"                        # non-finite loss: "stop" with an error, or "skip" the step
    export_dir: str | None = None               # also save the final model here (plain checkpoint + tokenizer)
    progress: bool = True                       # tqdm progress bar
    threads: int | None = None                  # torch CPU threads (None: torch's default)
    dp: int = 1                                 # data-parallel ranks under torchrun (spectra.distributed)
    tp: int = 1                                 # tensor-parallel ranks; a TriLM gets one scale per shard
    dp_mode: str = "fsdp"                       # data parallelism: "fsdp" (FSDP2) or "ddp"
    skip_memory_check: bool = False             # start even when a step's memory estimate exceeds the device's

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        if self.kind not in DEFAULT_LR:
            raise ConfigError(f"unknown training kind {self.kind!r}; train 'ternary' (TriLM) or 'float' (FloatLM)")
        for name in ("steps", "batch_size", "grad_accum", "keep_last", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: only at the end), got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"seq_len must be positive, got {self.seq_len}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.on_nan not in ON_NAN:
            raise ConfigError(f"on_nan must be one of {', '.join(ON_NAN)}, got {self.on_nan!r}")
        if self.dp < 1 or self.tp < 1 or self.dp_mode not in ("fsdp", "ddp"):
            raise ConfigError(f"dp and tp must be >= 1 and dp_mode fsdp or ddp, got dp={self.dp} tp={self.tp} "
                              f"dp_mode={self.dp_mode!r}")
        if self.batch_size % self.dp:
            raise ConfigError(f"batch_size {self.batch_size} (the global micro-batch) must be divisible by "
                              f"dp={self.dp}: each data-parallel rank takes batch_size / dp of its sequences")
        for name in ("lr", "min_lr_ratio", "weight_decay", "eps", "grad_clip", "lr_drop_at", "lr_drop_scale",
                     "wd_off_at"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
                raise ConfigError(f"{name} must be a finite non-negative number, got {value!r}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.threads is not None and (not isinstance(self.threads, int) or not 1 <= self.threads <= MAX_THREADS):
            raise ConfigError(f"threads must be an integer from 1 to {MAX_THREADS}, got {self.threads!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be positive (or None to disable), got {self.grad_clip}")
        self.make_schedule()  # validates LR, decay and phases

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * (self.seq_len or 0)

    def schedule_phases(self) -> tuple[SchedulePhase, ...]:
        if self.phases is not None:
            try:
                return tuple(SchedulePhase(**p) for p in self.phases)
            except TypeError as err:
                raise ConfigError(f"bad schedule phase in {self.phases}: {err}; use keys at, lr_scale, "
                                  f"weight_decay") from None
        use_spectra = self.schedule == "spectra" or (self.schedule == "auto" and self.kind == "ternary")
        return spectra_phases(self.lr_drop_at, self.lr_drop_scale, self.wd_off_at) if use_spectra else ()

    def make_schedule(self) -> Schedule:
        warmup = self.warmup_steps if self.warmup_steps is not None else max(1, round(0.01 * self.steps))
        decay = self.decay or ("linear" if self.kind == "ternary" else "cosine")
        return Schedule(total_steps=self.steps, peak_lr=self.lr or DEFAULT_LR[self.kind],
                        warmup_steps=min(warmup, self.steps), decay=decay, min_lr_ratio=self.min_lr_ratio,
                        weight_decay=self.weight_decay, phases=self.schedule_phases())

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, data, "training config")
