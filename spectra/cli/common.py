"""Helpers shared by CLI commands."""

from __future__ import annotations

import argparse

import torch

from ..checkpoint import parse_dtype  # noqa: F401 - the commands' --dtype parser
from ..errors import ConfigError
from ..train.config import MAX_THREADS


def parse_int_list(text: str, flag: str, what: str = "integers", minimum: int | None = None) -> tuple[int, ...]:
    """Comma-separated integers of a command-line option, or a ConfigError that names the option."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated {what}, got {text!r}") from None
    if minimum is not None and min(values) < minimum:
        raise ConfigError(f"{flag} takes {what} >= {minimum}, got {text!r}")
    return values


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace an existing output that is not an earlier output of this command")


def add_allow_nonfinite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load checkpoints with NaN or infinite weights (refused by default)")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.2f} TB"


def seed_int(text: str) -> int:
    """The type of every `--seed`: torch, numpy and Python's random all take an integer in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"takes an integer seed in [0, 2**63), got {text!r}")
    return value


def _thread_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"takes 1 to {MAX_THREADS} threads, got {text!r}")
    return value


def add_kv_cache_option(parser: argparse.ArgumentParser) -> None:
    """`--kv-cache` of `spectra generate` and `spectra bench decode` (read with :func:`kv_cache_dtype`)."""
    from ..generate import KV_CACHE_DTYPES

    parser.add_argument("--kv-cache", choices=tuple(KV_CACHE_DTYPES), default="model",
                        help="the KV cache's dtype: the model's (default), or int8 (8-bit keys and values with a "
                             "scale per row: half the memory, slightly less exact, faster at long context)")


def kv_cache_dtype(args: argparse.Namespace) -> torch.dtype | None:
    from ..generate import KV_CACHE_DTYPES

    return KV_CACHE_DTYPES[args.kv_cache]


def add_threads_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default=None) -> None:
    """`--threads N` of every long CPU command (train, eval, quantize, pack, export, generate, analyze)."""
    parser.add_argument("--threads", type=_thread_count, default=default,
                        help="torch CPU threads (default: one per core); on a loaded machine fewer can be much faster")


def add_loop_flags(group: argparse._ArgumentGroup) -> None:
    """The training-loop flags `spectra train`, `finetune` and `convert` share. Unset flags stay absent
    (argparse.SUPPRESS), so a resumed run keeps its saved values."""
    unset = argparse.SUPPRESS
    group.add_argument("--eval-every", type=int, default=unset, help="steps between held-out losses (default 100)")
    group.add_argument("--eval-batches", type=int, default=unset, help="held-out batches per evaluation (default 20)")
    group.add_argument("--save-every", type=int, default=unset, help="steps between checkpoints (default 500)")
    group.add_argument("--log-every", type=int, default=unset, help="steps between metrics records (default 10)")
    group.add_argument("--seed", type=seed_int, default=unset)
    group.add_argument("--device", default=unset, help="cpu or cuda (default: cuda when available)")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=unset,
                       help="auto (default): bf16 autocast on GPU, fp32 on CPU")
    add_threads_option(group, default=unset)
    group.add_argument("--no-progress", dest="progress", action="store_false", default=unset, help="no progress bar")
    group.add_argument("--skip-memory-check", action="store_true", default=unset,
                       help="start even when one step's memory estimate exceeds what the device has free "
                            "(docs/training.md, Memory)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU thread count from `--threads`, when given."""
    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)
