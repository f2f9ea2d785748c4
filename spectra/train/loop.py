"""The pretraining loop: `train()` checks everything, then a `Trainer` sets up, steps, evaluates, saves and finishes.

The pieces of a step (model, optimizer, loaders, loss, step, evaluation) are in spectra.train.step, the run
directory (metrics, run.json, checks) in spectra.train.rundir, resumable checkpoints in spectra.train.state.
Distributed training wraps the model and shards the batches (spectra.distributed) without touching the loop;
logging and checkpointing go through `is_main_process()`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import resolve_device, save_checkpoint
from ..data import TokenDataset
from ..distributed import (
    ParallelContext,
    RankShardedLoader,
    barrier,
    broadcast_text,
    first_refusal,
    gather_model,
    init_parallel,
    is_main_process,
    load_training_checkpoint,
    parallelize,
    save_training_checkpoint,
    tensor_parallel_overrides,
)
from ..errors import ConfigError, DeviceError, OutputError, SpectraError, TrainingError
from ..io import hold_lock, removing_new_empty_dirs, write_text_atomic
from ..model import SpectraLM
from ..progress import progress_bar
from .config import TrainConfig
from .memory import training_memory_refusal
from .rundir import (
    EXPORT_OWNER,
    LOCK_FILE,
    METRICS_FILE,
    RUN_FILE,
    MetricsLog,
    absolute_paths,
    check_export,
    check_resume,
    check_run_dir,
)
from .state import (
    CHECKPOINTS_DIR,
    RNG_PREFIX,
    list_checkpoints,
    load_training_state,
    prune_checkpoints,
    read_training_meta,
    remove_stale_staging,
    resolve_resume,
    rng_tensors,
    save_training_state,
    step_dir,
)
from .step import Objective, build_loaders, build_model, build_optimizer, check_compatible, evaluate, train_step

MAX_CONSECUTIVE_SKIPS = 10
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None          # the last training checkpoint (resumable)
    export_dir: Path | None          # the plain final checkpoint, when asked for
    step: int
    train_loss: float                # on fixed training batches after the last step
    val_loss: float | None           # on the fixed validation batches after the last step
    tokens: int                      # training tokens consumed (all steps, resumed ones included)
    tokens_per_s: float              # training throughput of this process (steps only, no eval or saving)
    train_seconds: float
    cpu_seconds: float               # CPU time of this process over the whole loop (all threads; evaluation included)
    model: SpectraLM = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items() if k != "model"}


def train(config: TrainConfig | None = None, *, resume: str | Path | None = None,
          initial_model: SpectraLM | None = None, dataset: Any = None, objective: Objective | None = None,
          callback: Callable[[dict], None] | None = None, force: bool = False, **options: Any) -> TrainResult:
    """Pretrain a TriLM or FloatLM on a prepared dataset; see TrainConfig for every option.

    `spectra.train(data="data/", out_dir="runs/x", model="mini", steps=2000)` builds the config from keyword
    arguments. `resume` (a run directory or one of its checkpoints) continues a run: with no config the saved
    one is used, with `options` overriding fields. `initial_model` replaces the built model (its shape must suit the
    data). `callback(record)` receives every metrics record as it is written. Fine-tuning passes its own
    `dataset` (packed examples, see spectra.finetune.data) and `objective` (loss and per-step hook).
    """
    checkpoint = resolve_resume(resume) if resume is not None else None
    saved = read_training_meta(checkpoint)["meta"] if checkpoint is not None else None
    cfg = _run_config(config, saved, checkpoint, options)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # Everything that can be wrong is checked before anything is written.
    dataset = TokenDataset(cfg.data) if dataset is None else dataset
    device = resolve_device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = init_parallel(cfg.dp, cfg.tp, device=str(device))  # under torchrun: join the group, take LOCAL_RANK's GPU
    # Each rank checks its own device before the model or a batch is allocated; one refusal stops every rank.
    too_big = first_refusal(ctx, training_memory_refusal(cfg, ctx.device, initial_model, dataset=dataset))
    if too_big is not None:
        raise DeviceError(too_big)
    model = build_model(cfg, ctx.device) if initial_model is None else initial_model.to(ctx.device).train()
    seq_len = cfg.seq_len or model.config.max_seq_len
    check_compatible(model, dataset, seq_len, objective is not None and objective.adapters_only,
                     checkpoint=cfg.model if Path(cfg.model).is_dir() else None)
    run_dir = Path(cfg.out_dir)
    check_run_dir(run_dir, saved is not None, force, cfg.data, cfg.model)  # on every rank: all stop, none waits
    barrier(ctx)  # no rank writes before every rank has checked the same, untouched directory
    setup = (cfg, model, dataset, ctx, seq_len, saved, checkpoint, objective, callback, force)
    with contextlib.ExitStack() as held:
        refusal = None
        if is_main_process():
            # The lock is held for the whole run: a second writer of this run directory is refused. A run that
            # fails before writing anything leaves no new directory.
            held.enter_context(removing_new_empty_dirs(run_dir))
            try:
                check_export(cfg, run_dir, force)
                held.enter_context(hold_lock(run_dir / LOCK_FILE, f"training run {run_dir}"))
            except (SpectraError, OSError) as exc:
                refusal = exc
        # every rank learns rank 0's verdict: a refused run stops every rank with the same one-line reason
        message = broadcast_text(ctx, None if refusal is None else str(refusal))
        if refusal is not None:
            raise refusal
        if message is not None:
            raise OutputError(message)
        return Trainer(*setup).run()


def _run_config(config: TrainConfig | None, saved: dict | None, checkpoint: Path | None,
                options: dict[str, Any]) -> TrainConfig:
    """The run's config: given, or the resumed run's own, with `options` on top; paths made absolute."""
    if config is None:
        if saved is not None:
            # Keep writing next to the checkpoint, wherever the run directory has moved since.
            here = {"out_dir": str(checkpoint.parent.parent)} if checkpoint.parent.name == CHECKPOINTS_DIR else {}
            # the memory check is about this machine, not the run: a resumed run checks again unless told not to
            config = TrainConfig.from_dict({**saved["config"], **here, "skip_memory_check": False, **options})
        else:
            config = TrainConfig(**options)
    elif options:
        config = config.replace(**options)
    if config.tp > 1 and not Path(config.model).is_dir():
        config = config.replace(model_overrides=tensor_parallel_overrides(config.model, config.kind,
                                                                          config.model_overrides, config.tp))
    return config.replace(**absolute_paths(config))


class Trainer:
    """One checked run: `__init__` sets up (resume checks, parallelism, loaders, optimizer, restored state, run
    directory); `run()` steps to cfg.steps, logging, evaluating and saving on their schedules, then finishes."""

    def __init__(self, cfg: TrainConfig, model: SpectraLM, dataset: Any, ctx: ParallelContext, seq_len: int,
                 saved: dict | None = None, checkpoint: Path | None = None, objective: Objective | None = None,
                 callback: Callable[[dict], None] | None = None, force: bool = False) -> None:
        if saved is not None:
            check_resume(saved, checkpoint, model, dataset)
        self.cfg, self.dataset, self.ctx, self.device, self.seq_len = cfg, dataset, ctx, ctx.device, seq_len
        self.objective, self.callback, self.force = objective, callback, force
        self.run_dir = Path(cfg.out_dir)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.model = parallelize(model, ctx, cfg.dp_mode, param_dtype=torch.bfloat16 if bf16 else None,
                                 compile=cfg.compile and ctx.distributed)
        if isinstance(dataset, TokenDataset):
            loader, self.val_batches, self.train_fixed = build_loaders(cfg, dataset, seq_len)
        else:  # fine-tuning's packed examples (spectra.finetune.data) build their own
            loader, self.val_batches, self.train_fixed = dataset.loaders(cfg, seq_len)
        self.loader = RankShardedLoader(loader, ctx) if ctx.dp > 1 else loader
        self.schedule = cfg.make_schedule()
        self.optimizer = build_optimizer(self.model, cfg)
        self.tokenizer = dataset.tokenizer()
        self.start_step, self.tokens_seen = self._restore(checkpoint) if checkpoint is not None else (0, 0)
        if self.start_step > cfg.steps:  # would rewrite run.json with a schedule the weights are already past
            raise ConfigError(f"{checkpoint} is at step {self.start_step}, past --steps {cfg.steps}; give --steps "
                              f"above {self.start_step} to train on (or leave it out)")
        self.main = is_main_process()
        self.log = MetricsLog(self.run_dir / METRICS_FILE, self.main)
        # A finished run resumed without more steps evaluates again but does not log its end twice.
        self.finished = checkpoint is not None and self.start_step >= cfg.steps and self.log.has_final(self.start_step)
        if self.main:
            self._start_run_dir()
        self.step_model = torch.compile(self.model) if cfg.compile and not ctx.distributed else self.model
        self.writes = self.main or ctx.distributed  # saving a parallel model gathers its shards: every rank takes part
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len
        self.step, self.last_saved = self.start_step, checkpoint
        self.train_seconds, self.window_losses, self.window_seconds, self.skips_in_row = 0.0, [], 0.0, 0

    def run(self) -> TrainResult:
        cfg = self.cfg
        bar = progress_bar(total=cfg.steps, initial=self.start_step, desc=f"train {cfg.kind}", unit="step",
                           dynamic_ncols=True, disable=not (cfg.progress and self.main))
        cpu_started = time.process_time()
        try:
            while self.step < cfg.steps:
                norm = self.train_one_step()
                if self.main:
                    bar.update(1)
                if self.window_losses and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    self.log_window(norm, bar)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps and self.val_batches:
                    self.emit({"split": "val", "step": self.step, "loss": self.loss_on(self.val_batches),
                               "tokens": self.tokens_seen})
                if cfg.save_every and self.step % cfg.save_every == 0 and self.writes:
                    self.last_saved = self.save()
        finally:
            bar.close()
        return self.finish(cpu_started)

    # --- setup ------------------------------------------------------------------------------------

    def _restore(self, checkpoint: Path) -> tuple[int, int]:
        """Load weights, optimizer and data position; the (step, tokens) the run continues from."""
        if self.ctx.distributed:
            meta = load_training_checkpoint(checkpoint, self.model, self.optimizer, self.ctx)
        else:
            meta = load_training_state(checkpoint, self.model, self.optimizer)
        self.loader.load_state_dict(meta["loader"])
        return int(meta["step"]), int(meta["tokens"])

    def _start_run_dir(self) -> None:
        """run.json written, metrics after the resumed step dropped, staging left by a killed save removed."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        run = {"config": self.cfg.to_dict(), "model_config": self.model.config.to_dict(),
               "schedule": self.schedule.describe()}
        write_text_atomic(self.run_dir / RUN_FILE, json.dumps(run, indent=2) + "\n")
        self.log.truncate_after(self.start_step, keep_final=self.finished)
        remove_stale_staging(self.run_dir)

    # --- one step, its record, evaluation, saving -------------------------------------------------

    def train_one_step(self) -> float:
        """One timed optimizer step, counted; a non-finite one is skipped or stops the run. Returns the norm."""
        cfg, started = self.cfg, time.perf_counter()
        try:
            loss, norm = train_step(self.step_model, self.optimizer, self.loader, cfg, self.schedule, self.step,
                                    self.device, self.ctx, self.objective)
        except _OOM:
            raise DeviceError(f"GPU out of memory at step {self.step + 1} with micro-batches of {cfg.batch_size} x "
                              f"{self.seq_len} tokens; lower --batch-size (raise --grad-accum to keep the same "
                              f"global batch) or use a shorter --seq-len") from None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.train_seconds += elapsed
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self._skip_or_stop(loss, norm)
        else:
            self.skips_in_row = 0
            self.window_losses.append(loss)
            self.window_seconds += elapsed
        return norm

    def _skip_or_stop(self, loss: float, norm: float) -> None:
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm} (loss {loss:.4f})"
        saved = list_checkpoints(self.run_dir)
        last = f"the last good checkpoint is {saved[-1][1]}" if saved else "no checkpoint was written before it"
        if self.cfg.on_nan != "skip":
            raise TrainingError(f"non-finite {what} at step {self.step}; the weights were not updated and {last}. "
                                f"Lower the learning rate (--lr) or tighten --grad-clip and resume from it, or pass "
                                f"--on-nan skip")
        self.emit({"split": "train", "step": self.step, "skipped": True, "loss": None, "reason": what})
        self.skips_in_row += 1
        if self.skips_in_row >= MAX_CONSECUTIVE_SKIPS:
            raise TrainingError(f"{MAX_CONSECUTIVE_SKIPS} steps in a row (up to step {self.step}) had a non-finite "
                                f"{what}; {last}. Lower the learning rate and resume from it")

    def log_window(self, norm: float, bar: Any) -> None:
        """The mean loss and throughput of the steps since the last record."""
        losses, step = self.window_losses, self.step
        record = {"split": "train", "step": step, "loss": sum(losses) / len(losses),
                  "lr": self.schedule.lr(step - 1), "weight_decay": self.schedule.weight_decay_at(step - 1),
                  "grad_norm": norm, "tokens": self.tokens_seen,
                  "tokens_per_s": len(losses) * self.tokens_per_step / max(self.window_seconds, 1e-9)}
        self.emit(record)
        if self.main:
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
        self.window_losses, self.window_seconds = [], 0.0

    def loss_on(self, batches: list) -> float | None:
        return evaluate(self.step_model, batches, self.device, self.cfg.precision)

    def emit(self, record: dict) -> None:
        self.log.write(record)
        if self.callback is not None:
            self.callback(record)

    def save(self) -> Path:
        """A resumable checkpoint of the current step (every rank takes part under parallelism)."""
        step, schedule = self.step, self.schedule
        meta = {"step": step, "tokens": self.tokens_seen, "loader": self.loader.state_dict(),
                "config": self.cfg.to_dict(), "model_config": self.model.config.to_dict(),
                "dataset": self.dataset.fingerprint(), "lr": schedule.lr(max(0, step - 1)),
                "weight_decay": schedule.weight_decay_at(max(0, step - 1))}
        directory = step_dir(self.run_dir, step)
        if self.ctx.distributed:
            rng = {RNG_PREFIX + k: v for k, v in rng_tensors().items()}
            path = save_training_checkpoint(directory, self.model, self.optimizer, self.ctx, meta,
                                            tokenizer=self.tokenizer, extra_tensors=rng)
        else:
            path = save_training_state(directory, self.model, self.optimizer, meta, tokenizer=self.tokenizer)
        if self.main:
            prune_checkpoints(self.run_dir, self.cfg.keep_last)
        return path

    # --- the end ----------------------------------------------------------------------------------

    def finish(self, cpu_started: float) -> TrainResult:
        """Final evaluation and records, the last checkpoint, the export; the run's result."""
        val_loss, train_loss = self.loss_on(self.val_batches), self.loss_on(self.train_fixed)
        step, tokens = self.step, self.tokens_seen
        if not self.finished:
            if val_loss is not None:
                self.emit({"split": "val", "step": step, "loss": val_loss, "tokens": tokens})
            self.emit({"split": "final", "step": step, "train_loss": train_loss, "val_loss": val_loss,
                       "tokens": tokens})
        if self.writes and self.last_saved != step_dir(self.run_dir, step):
            self.last_saved = self.save()
        export = None
        if self.cfg.export_dir:
            plain = gather_model(self.model, self.ctx) if self.ctx.distributed else self.model
            if self.main:
                export = save_checkpoint(plain, self.cfg.export_dir, tokenizer=self.tokenizer, owner=EXPORT_OWNER,
                                         force=self.force)
        steps_run = step - self.start_step
        return TrainResult(run_dir=self.run_dir, checkpoint=self.last_saved, export_dir=export, step=step,
                           train_loss=train_loss, val_loss=val_loss, tokens=tokens,
                           tokens_per_s=steps_run * self.tokens_per_step / max(self.train_seconds, 1e-9),
                           train_seconds=self.train_seconds, cpu_seconds=time.process_time() - cpu_started,
                           model=self.model)

