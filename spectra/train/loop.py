"""The pretraining loop, read top to bottom: build model, optimizer and loaders, then step, evaluate, save.

Each piece is its own function (`build_model`, `build_optimizer`, `build_loaders`, `train_step`,
`evaluate`) so that distributed training can wrap the model (`parallelize(model, mesh)`) and shard the
batches without touching the loop; logging and checkpointing go through `is_main_process()`.
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
import torch.nn as nn

from ..checkpoint import load_checkpoint, resolve_device, save_checkpoint
from ..config import TRAINABLE_KINDS, get_config
from ..data import TokenDataset, WindowLoader
from ..distributed import gather_model, load_training_checkpoint, save_training_checkpoint
from ..errors import CheckpointError, ConfigError, DataError, DeviceError, OutputError, TrainingError
from ..io import check_output, hold_lock, removing_new_empty_dirs, write_text_atomic
from ..model import SpectraLM
from ..parallel import (
    ParallelContext,
    RankShardedLoader,
    barrier,
    clip_grad_norm_,
    init_parallel,
    mean_over_data_parallel,
    parallelize,
    tensor_parallel_overrides,
)
from .config import TrainConfig
from .schedule import Schedule
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

METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".spectra-lock"  # in the run directory: held by the process writing the run (spectra.io)
EXPORT_OWNER = "train --export"
RUN_FILE = "run.json"
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_layers", "max_seq_len",
                "weight_kind", "model_parallel_size")
MAX_CONSECUTIVE_SKIPS = 10
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def is_main_process() -> bool:
    """Rank 0 (or a plain single process): the one that logs, shows progress and writes checkpoints."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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


# --- building blocks ------------------------------------------------------------------------------

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


def check_compatible(model: SpectraLM, dataset: TokenDataset, seq_len: int, adapters_only: bool = False) -> None:
    config = model.config
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
    return total / count


# --- run directory --------------------------------------------------------------------------------

class MetricsLog:
    """Append-only JSONL of training records, written by the main process only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int, keep_final: bool = False) -> None:
        """Drop records of steps after `step` (a resumed run writes them again) and the run's end record unless
        `keep_final` (a finished run resumed without more steps), atomically."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a killed process
            if record.get("step", 0) <= step and (record.get("split") != "final" or keep_final):
                kept.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def has_final(self, step: int) -> bool:
        """Whether the log already ends the run at `step` (a finished run being resumed)."""
        if not (self.enabled and self.path.is_file()):
            return False
        return any(r.get("split") == "final" and r.get("step") == step for r in _records(self.path))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _records(file: Path) -> list[dict]:
    out = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict):
                out.append(record)
    return out


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a run directory's metrics.jsonl (or of that file)."""
    path = Path(path)
    file = path / METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"no {METRICS_FILE} at {path}; pass a run directory written by `spectra train`")
    records = []
    for lineno, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{file}:{lineno} is not a JSON record; is it a metrics.jsonl written by "
                            f"`spectra train`?") from None
        if not isinstance(record, dict):
            raise DataError(f"{file}:{lineno} is not a JSON object; is it a metrics.jsonl written by "
                            f"`spectra train`?")
        records.append(record)
    return records


def _check_run_dir(run_dir: Path, resuming: bool, force: bool, data: str) -> None:
    """A new run goes to a missing or empty directory, or (with `force`) beside files that are not a run;
    never into its data directory."""
    check_output(run_dir / RUN_FILE, "train", force=True, kind="file", sources=[data])
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; the run directory must be a directory (or not exist yet)")
    if resuming or not run_dir.is_dir():
        return
    if list_checkpoints(run_dir):
        raise TrainingError(f"{run_dir} already holds a training run; continue it with --resume {run_dir} "
                            f"or choose another output directory")
    # A run killed before its first checkpoint (run.json, no checkpoints) starts over in place.
    own = (run_dir / RUN_FILE).is_file()
    if not own and any(p.name != LOCK_FILE for p in run_dir.iterdir()) and not force:
        raise OutputError(f"--out {run_dir} already exists, is not empty and is not a training run; choose "
                          f"another directory or pass --force to write the run beside its files")


def _absolute_paths(cfg: TrainConfig) -> dict[str, str]:
    """data, out_dir, export_dir and a checkpoint `model` as absolute paths, so a resume from another working
    directory finds the same files."""
    fields = {"data": cfg.data, "out_dir": cfg.out_dir, "export_dir": cfg.export_dir}
    if Path(cfg.model).is_dir():
        fields["model"] = cfg.model
    return {k: str(Path(v).absolute()) for k, v in fields.items() if v}


def _check_resume_shape(saved: dict, model: SpectraLM, source: Path) -> None:
    current = model.config.to_dict()
    for name in SHAPE_FIELDS:
        if saved.get(name) != current[name]:
            raise CheckpointError(f"{source} was saved from a model with {name}={saved.get(name)!r}, but this run "
                                  f"builds {name}={current[name]!r}; resume with the model it was saved with")


# --- the loop -------------------------------------------------------------------------------------

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
    if config is None:
        if saved is not None:
            # Keep writing next to the checkpoint, wherever the run directory has moved since.
            here = {"out_dir": str(checkpoint.parent.parent)} if checkpoint.parent.name == CHECKPOINTS_DIR else {}
            config = TrainConfig.from_dict({**saved["config"], **here, **options})
        else:
            config = TrainConfig(**options)
    elif options:
        config = config.replace(**options)
    if config.tp > 1 and not Path(config.model).is_dir():
        config = config.replace(model_overrides=tensor_parallel_overrides(config.model, config.kind,
                                                                          config.model_overrides, config.tp))
    cfg = config.replace(**_absolute_paths(config))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # Everything that can be wrong is checked before anything is written.
    dataset = TokenDataset(cfg.data) if dataset is None else dataset
    device = resolve_device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = init_parallel(cfg.dp, cfg.tp, device=str(device))  # under torchrun: join the group, take LOCAL_RANK's GPU
    device = ctx.device
    model = build_model(cfg, device) if initial_model is None else initial_model.to(device).train()
    seq_len = cfg.seq_len or model.config.max_seq_len
    check_compatible(model, dataset, seq_len, objective is not None and objective.adapters_only)
    run_dir = Path(cfg.out_dir)
    main = is_main_process()
    _check_run_dir(run_dir, saved is not None, force, cfg.data)  # on every rank: all stop, none waits
    barrier(ctx)  # no rank writes before every rank has checked the same, untouched directory
    if main:
        if cfg.export_dir:
            sources = [cfg.data] + ([cfg.model] if Path(cfg.model).is_dir() else [])
            check_output(cfg.export_dir, EXPORT_OWNER, force=force, sources=sources, flag="--export")
            if run_dir.absolute() == Path(cfg.export_dir) or Path(cfg.export_dir) in run_dir.absolute().parents:
                raise OutputError(f"--export {cfg.export_dir} would replace the run directory {run_dir}; export "
                                  f"to another path")
        # The lock is held for the whole run: a second writer of this run directory is refused. A run that fails
        # before writing anything leaves no new directory.
        with removing_new_empty_dirs(run_dir), hold_lock(run_dir / LOCK_FILE, f"training run {run_dir}"):
            return _train(cfg, saved, checkpoint, dataset, device, ctx, model, seq_len, run_dir, objective,
                          callback, force)
    return _train(cfg, saved, checkpoint, dataset, device, ctx, model, seq_len, run_dir, objective, callback, force)


def _train(cfg: TrainConfig, saved: dict | None, checkpoint: Path | None, dataset: Any, device: torch.device,
           ctx: ParallelContext, model: SpectraLM, seq_len: int, run_dir: Path, objective: Objective | None,
           callback: Callable[[dict], None] | None, force: bool) -> TrainResult:
    if saved is not None:
        _check_resume_shape(saved["model_config"], model, checkpoint)
        if saved["dataset"] != dataset.fingerprint():
            raise DataError(f"{checkpoint} was trained on other data (tokenizer or token counts differ from "
                            f"{dataset.path}); resume with the dataset it was trained on")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    model = parallelize(model, ctx, cfg.dp_mode, param_dtype=torch.bfloat16 if bf16 else None,
                        compile=cfg.compile and ctx.distributed)
    loader, val_batches, train_fixed = (build_loaders(cfg, dataset, seq_len) if isinstance(dataset, TokenDataset)
                                        else dataset.loaders(cfg, seq_len))
    loader = RankShardedLoader(loader, ctx) if ctx.dp > 1 else loader
    schedule = cfg.make_schedule()
    optimizer = build_optimizer(model, cfg)
    tokenizer = dataset.tokenizer()

    start_step, tokens_seen = 0, 0
    if checkpoint is not None:
        if ctx.distributed:
            meta = load_training_checkpoint(checkpoint, model, optimizer, ctx)
        else:
            meta = load_training_state(checkpoint, model, optimizer)
        loader.load_state_dict(meta["loader"])
        start_step, tokens_seen = int(meta["step"]), int(meta["tokens"])
    main = is_main_process()
    log = MetricsLog(run_dir / METRICS_FILE, main)
    finished = checkpoint is not None and start_step >= cfg.steps and log.has_final(start_step)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / RUN_FILE, json.dumps({"config": cfg.to_dict(), "model_config":
                                                      model.config.to_dict(), "schedule": schedule.describe()},
                                                     indent=2) + "\n")
        log.truncate_after(start_step, keep_final=finished)
        remove_stale_staging(run_dir)
    step_model = torch.compile(model) if cfg.compile and not ctx.distributed else model
    writes = main or ctx.distributed  # saving a parallel model gathers its shards: every rank takes part

    def emit(record: dict) -> None:
        log.write(record)
        if callback is not None:
            callback(record)

    def save(step: int) -> Path:
        meta = {"step": step, "tokens": tokens_seen, "loader": loader.state_dict(), "config": cfg.to_dict(),
                "model_config": model.config.to_dict(), "dataset": dataset.fingerprint(),
                "lr": schedule.lr(max(0, step - 1)), "weight_decay": schedule.weight_decay_at(max(0, step - 1))}
        if ctx.distributed:
            rng = {RNG_PREFIX + k: v for k, v in rng_tensors().items()}
            path = save_training_checkpoint(step_dir(run_dir, step), model, optimizer, ctx, meta,
                                            tokenizer=tokenizer, extra_tensors=rng)
        else:
            path = save_training_state(step_dir(run_dir, step), model, optimizer, meta, tokenizer=tokenizer)
        if main:
            prune_checkpoints(run_dir, cfg.keep_last)
        return path

    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len
    bar = _progress_bar(cfg, start_step, main)
    train_seconds, window_losses, window_seconds, skips_in_row = 0.0, [], 0.0, 0
    last_saved: Path | None = checkpoint
    step = start_step
    cpu_started = time.process_time()
    try:
        while step < cfg.steps:
            started = time.perf_counter()
            try:
                loss, norm = train_step(step_model, optimizer, loader, cfg, schedule, step, device, ctx, objective)
            except _OOM:
                raise DeviceError(f"GPU out of memory at step {step + 1} with micro-batches of {cfg.batch_size} x "
                                  f"{seq_len} tokens; lower --batch-size (raise --grad-accum to keep the same "
                                  f"global batch) or use a shorter --seq-len") from None
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            step += 1
            tokens_seen += tokens_per_step
            train_seconds += elapsed
            if not (math.isfinite(loss) and math.isfinite(norm)):
                skips_in_row = _handle_non_finite(cfg, step, loss, norm, skips_in_row, run_dir, emit)
            else:
                skips_in_row = 0
                window_losses.append(loss)
                window_seconds += elapsed
            if main:
                bar.update(1)
            if window_losses and (step % cfg.log_every == 0 or step == cfg.steps):
                record = {"split": "train", "step": step, "loss": sum(window_losses) / len(window_losses),
                          "lr": schedule.lr(step - 1), "weight_decay": schedule.weight_decay_at(step - 1),
                          "grad_norm": norm, "tokens": tokens_seen,
                          "tokens_per_s": len(window_losses) * tokens_per_step / max(window_seconds, 1e-9)}
                emit(record)
                if main:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                window_losses, window_seconds = [], 0.0
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and val_batches:
                emit({"split": "val", "step": step, "loss": evaluate(step_model, val_batches, device, cfg.precision),
                      "tokens": tokens_seen})
            if cfg.save_every and step % cfg.save_every == 0 and writes:
                last_saved = save(step)
    finally:
        bar.close()

    val_loss = evaluate(step_model, val_batches, device, cfg.precision)
    train_loss = evaluate(step_model, train_fixed, device, cfg.precision)
    if not finished:  # resuming a finished run evaluates again but does not log its end twice
        if val_loss is not None:
            emit({"split": "val", "step": step, "loss": val_loss, "tokens": tokens_seen})
        emit({"split": "final", "step": step, "train_loss": train_loss, "val_loss": val_loss, "tokens": tokens_seen})
    if writes and last_saved != step_dir(run_dir, step):
        last_saved = save(step)
    export = None
    if cfg.export_dir:
        plain = gather_model(model, ctx) if ctx.distributed else model
        if main:
            export = save_checkpoint(plain, cfg.export_dir, tokenizer=tokenizer, owner=EXPORT_OWNER, force=force)
    steps_run = step - start_step
    return TrainResult(run_dir=run_dir, checkpoint=last_saved, export_dir=export, step=step, train_loss=train_loss,
                       val_loss=val_loss, tokens=tokens_seen,
                       tokens_per_s=steps_run * tokens_per_step / max(train_seconds, 1e-9),
                       train_seconds=train_seconds, cpu_seconds=time.process_time() - cpu_started, model=model)


def _handle_non_finite(cfg: TrainConfig, step: int, loss: float, norm: float, skips_in_row: int, run_dir: Path,
                       emit: Callable[[dict], None]) -> int:
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm} (loss {loss:.4f})"
    saved = list_checkpoints(run_dir)
    last = f"the last good checkpoint is {saved[-1][1]}" if saved else "no checkpoint was written before it"
    if cfg.on_nan == "skip":
        emit({"split": "train", "step": step, "skipped": True, "loss": None, "reason": what})
        if skips_in_row + 1 >= MAX_CONSECUTIVE_SKIPS:
            raise TrainingError(f"{MAX_CONSECUTIVE_SKIPS} steps in a row (up to step {step}) had a non-finite "
                                f"{what}; {last}. Lower the learning rate and resume from it")
        return skips_in_row + 1
    raise TrainingError(f"non-finite {what} at step {step}; the weights were not updated and {last}. Lower the "
                        f"learning rate (--lr) or tighten --grad-clip and resume from it, or pass --on-nan skip")


def _progress_bar(cfg: TrainConfig, start: int, main: bool):
    from ..progress import progress_bar
    return progress_bar(total=cfg.steps, initial=start, desc=f"train {cfg.kind}", unit="step", dynamic_ncols=True,
                disable=not (cfg.progress and main))
