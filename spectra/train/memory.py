"""How much memory one training step takes, and the check that refuses a run that cannot fit before it starts.

A batch the device cannot hold used to be found out by the kernel's out-of-memory killer (the process gone, a
lock and run.json left behind) or by a CUDA OOM mid-run. `train()` and `finetune()` now compare
:func:`estimate_step_memory` with :func:`available_memory` before they allocate or write anything.

The estimate is a sum of terms, per rank, in bytes (a = 2 under bf16 autocast, 4 in fp32; P parameters,
T of them trained, L layers, h hidden, i intermediate, V vocabulary, B*t tokens of a micro-batch):

    weights        4 P                 fp32 master weights (a TriLM's latent weights too)
    gradients      4 T                 fp32, one per trained parameter (+4 T of DDP's gradient buckets)
    optimizer      8 T                 AdamW's exp_avg and exp_avg_sq, fp32
    weight copies  a * (linear + V h)  the ternarized weight of every TriLM layer, or autocast's bf16 copy,
                                       kept from the forward to the backward
    activations    B t (L ((16 + 16 a) h + 4 a i) + (16 + a) h)   tensors saved for the backward: per block the
                                       two RMSNorms (fp32 inside), q/k/v before and after the rotary embedding,
                                       attention's output, the o_proj input, gate/up/silu/product of the MLP
    masks          B t (8 a h L) + 8 B t^2   packed fine-tuning rows only (document ids): what attention under a
                                       mask saves beyond causal attention (measured on CPU: up to 60 KB a token
                                       of the mini preset), and the [B, 1, t, t] mask and its temporaries
    logits         16 B t V            the lm head's output, its fp32 copy, log-softmax and their gradients
    batch          B (t + 1) 16 + B 112  the token windows (int64), once as rows and once stacked, on the host
    eval batches   8 (t + 1) per row   the fixed evaluation windows (train and validation, --eval-batches of
                                       each, fewer on a small split), held on the host for the whole run
    runtime        256 MiB             what the first step loads besides tensors (libraries, workspaces)

Fully sharded data parallelism divides the first three by dp, tensor parallelism the weights by tp;
activations are counted whole (conservative). The optimizer's foreach temporaries (4 T, on GPU) run after the
activations are freed, so the step's peak takes the larger of the two.

Measured against the peak resident memory of CPU steps (benchmarks/train_memory.py, table in docs/training.md),
the estimate is 1.2-1.5x above it, for pretraining windows and packed fine-tuning rows alike, never below.
A refusal names the override, ``skip_memory_check`` (``--skip-memory-check``), for users who know better.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import read_config
from ..config import ModelConfig, get_config
from ..data import TokenDataset
from ..size import count_parameters
from .config import TrainConfig

ROW_OBJECT_BYTES = 112     # a NumPy array object per loaded window, before np.stack (spectra.data.WindowLoader)
# What the first step loads besides tensors: on CPU ~210 MB of libraries, thread pools and allocator caches
# (the tiny preset's step, benchmarks/train_memory.py); on a GPU cuBLAS workspaces and the allocator's rounding.
RUNTIME_BYTES = 256 * 2**20


def _gb(n: float) -> str:
    if n >= 1e12:
        return f"{n / 1e12:,.1f} TB"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@dataclass(frozen=True)
class StepMemory:
    """Bytes one training step holds at its peak, by term (see the module docstring for each formula)."""

    weights: int
    gradients: int
    optimizer: int
    weight_copies: int
    activations: int
    logits: int
    batch: int
    eval_batches: int = 0
    masks: int = 0
    optimizer_temporaries: int = 0
    runtime: int = RUNTIME_BYTES

    @property
    def model_state(self) -> int:
        """What does not grow with the batch: runtime, weights, gradients, optimizer state, weight copies."""
        return self.runtime + self.weights + self.gradients + self.optimizer + self.weight_copies

    @property
    def total(self) -> int:
        step = max(self.activations + self.masks + self.logits + self.batch, self.optimizer_temporaries)
        return self.model_state + self.eval_batches + step

    def describe(self) -> str:
        """"3.10 GB (activations 2.00 GB, logits 1.00 GB, ...)": the total and its largest terms."""
        terms = sorted(((getattr(self, f.name), f.name.replace("_", " ")) for f in fields(self)), reverse=True)
        return f"{_gb(self.total)} ({', '.join(f'{name} {_gb(n)}' for n, name in terms[:3] if n)})"


def estimate_step_memory(config: ModelConfig, batch_size: int, seq_len: int, *, bf16: bool = False,
                         parameters: int | None = None, weight_bytes: int | None = None,
                         trainable: int | None = None, linear: int | None = None, ternary: bool = True,
                         dp: int = 1, tp: int = 1, fsdp: bool = True, cuda: bool = False,
                         eval_rows: int = 0, document_masks: bool = False) -> StepMemory:
    """Peak bytes of one training step of `batch_size` sequences of `seq_len` tokens on one rank.

    `parameters`, `trainable` and `linear` (the blocks' linear weights) default to a fresh model of `config`;
    pass a built model's counts (LoRA trains only its adapters) and `weight_bytes` (its parameters and buffers,
    a packed base included). `batch_size` is the global micro-batch, split over `dp` ranks; `cuda` counts the
    optimizer's foreach temporaries and leaves the host's copies of the batch and of the `eval_rows` fixed
    evaluation windows out. `document_masks`: rows packed from several documents (fine-tuning's examples)."""
    counts = count_parameters(config)  # a fresh model of `config`, as the block table gives it
    parameters = counts.total if parameters is None else parameters
    trainable = parameters if trainable is None else trainable
    linear = counts.linear if linear is None else linear
    a = 2 if bf16 else 4
    h, i, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    shard = tp * (dp if fsdp else 1)
    tokens = -(-batch_size // dp) * seq_len
    per_token = config.num_layers * ((16 + 16 * a) * h + 4 * a * i) + (16 + a) * h
    rows = -(-batch_size // dp)
    return StepMemory(
        weights=(4 * parameters if weight_bytes is None else weight_bytes) // shard,
        gradients=4 * trainable // shard + (4 * trainable // tp if dp > 1 and not fsdp else 0),
        optimizer=8 * trainable // shard,
        weight_copies=a * (linear + vocab * h) // tp if ternary or bf16 else 0,
        activations=tokens * per_token,
        logits=16 * tokens * vocab,
        batch=rows * (seq_len + 1) * 16 + (0 if cuda else rows * ROW_OBJECT_BYTES),
        eval_batches=0 if cuda else eval_rows * (seq_len + 1) * 8,
        masks=tokens * config.num_layers * 8 * a * h + 8 * rows * seq_len**2 if document_masks else 0,
        optimizer_temporaries=4 * trainable // shard if cuda else 0)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """What a cgroup v2 memory limit leaves this process's group (containers see the host's MemAvailable)."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process on `device`: a GPU's free memory, or the host's available memory (the
    smaller of /proc/meminfo's MemAvailable and a cgroup limit's headroom, shared by the ranks of this host).
    None where it cannot be read (then nothing is refused)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    known = [n for n in (_meminfo_available(), _cgroup_available()) if n is not None]
    if not known:
        return None
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return min(known) // ranks_here


def memory_refusal(estimate: StepMemory, available: int | None, device: torch.device, batch_size: int,
                   seq_len: int, grad_accum: int, dp: int = 1, ranks: int = 1) -> str | None:
    """The one-line reason a step of `estimate` cannot run in `available` bytes, or None when it fits."""
    if available is None or estimate.total <= available:
        return None
    where = "free on the GPU" if device.type == "cuda" else "of memory available"
    where += " per rank" if ranks > 1 and device.type == "cpu" else ""
    # What grows with the batch is linear in each rank's rows; the rest (the evaluation windows at most as many
    # as now) stays. The batch suggested is a multiple of dp: each rank takes a share.
    fixed = estimate.model_state + estimate.eval_batches
    per_row = (estimate.total - fixed) / -(-batch_size // dp)
    fits = max(0, int((available - fixed) // per_row)) * dp
    if fits >= 1:
        accum = grad_accum * -(-batch_size // fits)
        fix = (f"lower --batch-size or --seq-len (--batch-size {fits} --grad-accum {accum} keeps about the same "
               f"batch per step) or use a device with more memory")
    elif estimate.model_state < available:
        fix = "even one sequence per rank does not fit: use a shorter --seq-len or a device with more memory"
    else:
        fix = ("the model's weights, gradients and optimizer state alone do not fit: use a smaller model, shard it "
               "over GPUs (torchrun --dp with FSDP) or a device with more memory")
    each = f" on each of {ranks} ranks" if ranks > 1 else ""
    return (f"one training step of micro-batches of {batch_size} x {seq_len} tokens needs about "
            f"{estimate.describe()}{each}, but {device} has {_gb(available)} {where}; {fix}; --skip-memory-check runs "
            f"anyway")


def planned_model_config(cfg: TrainConfig) -> ModelConfig:
    """The config of the model `build_model(cfg)` would build, read without building it."""
    if Path(cfg.model).is_dir():
        return read_config(cfg.model)
    return get_config(cfg.model, weight_kind=cfg.kind, **cfg.model_overrides)


def fixed_eval_rows(cfg: TrainConfig, dataset: TokenDataset, seq_len: int) -> int:
    """Windows of the fixed evaluation batches `build_loaders` keeps for the run (train and validation)."""
    rows = 0
    for split in ("train", "val"):
        windows = max(0, dataset.num_tokens(split) - 1) // seq_len
        if split == "train" or dataset.num_tokens(split) > seq_len:
            rows += min(cfg.eval_batches * cfg.batch_size, windows)
    return rows


def training_memory_refusal(cfg: TrainConfig, device: torch.device, model: nn.Module | None = None,
                            seq_len: int | None = None, dataset: object = None) -> str | None:
    """Why one step of `cfg` cannot fit on `device` (this rank's), or None: the check `train()` and
    `finetune()` make before allocating or writing anything. `model`: an already built one (fine-tuning's,
    whose trained parameters and packed buffers are counted as they are, its weights not at all when they are
    on `device` already); otherwise the one `cfg` would build. A `TokenDataset` adds its fixed evaluation
    batches; any other dataset is taken as packed examples with document masks.
    `cfg.skip_memory_check` turns it off."""
    if cfg.skip_memory_check:
        return None
    config = model.config if model is not None else planned_model_config(cfg)
    seq_len = seq_len or cfg.seq_len or config.max_seq_len
    counts = {}
    if model is not None:
        params = list(model.parameters())
        counts = {"parameters": sum(p.numel() for p in params),
                  "trainable": sum(p.numel() for p in params if p.requires_grad),
                  # a model already on this device is already counted in what the device has left
                  "weight_bytes": 0 if params and params[0].device.type == device.type else
                  sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])}
    if isinstance(dataset, TokenDataset):
        counts["eval_rows"] = fixed_eval_rows(cfg, dataset, seq_len)
    elif dataset is not None:  # fine-tuning's packed examples (spectra.finetune.data), with document ids
        counts["document_masks"] = True
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    estimate = estimate_step_memory(config, cfg.batch_size, seq_len, bf16=bf16, ternary=config.weight_kind != "float",
                                    dp=cfg.dp, tp=cfg.tp, fsdp=cfg.dp_mode == "fsdp", cuda=device.type == "cuda",
                                    **counts)
    return memory_refusal(estimate, available_memory(device), device, cfg.batch_size, seq_len, cfg.grad_accum,
                          cfg.dp, cfg.dp * cfg.tp)
