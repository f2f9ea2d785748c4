"""Calibration sequences for GPTQ: random windows of a token stream (as GPTQ samples C4 segments)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data import TokenDataset, tokenizer_fingerprint
from ..errors import DataError
from ..eval.perplexity import load_eval_tokens


def calibration_windows(tokens: torch.Tensor, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`samples` windows [samples, seq_len] starting at random offsets of the 1-D id stream `tokens`."""
    return _windows([torch.as_tensor(tokens, dtype=torch.long).reshape(-1)], samples, seq_len, seed)


def _windows(streams: list, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Random windows over several streams (shards), each stream picked in proportion to its windows."""
    if samples < 1 or seq_len < 1:
        raise DataError(f"samples ({samples}) and seq_len ({seq_len}) must be positive")
    starts_per_stream = np.array([max(0, len(s) - seq_len + 1) for s in streams], dtype=np.int64)
    if starts_per_stream.sum() == 0:
        longest = max((len(s) for s in streams), default=0)
        raise DataError(f"the calibration data holds no stretch of {seq_len} tokens (longest: {longest}), "
                        f"fewer than one sequence; give more text or a smaller --seq-len")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, int(starts_per_stream.sum()), (samples,), generator=generator).numpy()
    bounds = np.cumsum(starts_per_stream)
    rows = []
    for pick in picks:
        which = int(np.searchsorted(bounds, pick, side="right"))
        start = int(pick - (bounds[which] - starts_per_stream[which]))
        rows.append(torch.as_tensor(np.asarray(streams[which][start:start + seq_len], dtype=np.int64)))
    return torch.stack(rows)


def calibration_tokens(source: str | Path, tokenizer, samples: int = 128, seq_len: int = 2048, seed: int = 0,
                       split: str = "train") -> torch.Tensor:
    """Calibration windows [samples, seq_len] from `source`.

    Prepared data shards (spectra.data) are sampled in place from `split` (the training split by default, so
    evaluation text stays unseen); a .npy of ids, .jsonl, a text file or a folder of text is read by
    spectra.eval's loader and tokenized with `tokenizer`, documents joined by the end-of-text token.
    """
    source = Path(source)
    if source.is_dir() and (source / "index.json").is_file():
        return _windows(_shards(source, tokenizer, split), samples, seq_len, seed)

    return calibration_windows(load_eval_tokens(source, tokenizer), samples, seq_len, seed)


def _shards(path: Path, tokenizer, split: str) -> list[np.ndarray]:
    dataset = TokenDataset(path)
    expected = dataset.index.get("tokenizer_sha256")
    if tokenizer is not None and expected and tokenizer_fingerprint(tokenizer) != expected:
        raise DataError(f"{path} was tokenized with another tokenizer than the checkpoint's; prepare the "
                        f"calibration data with the checkpoint's tokenizer (or pass raw text)")
    shards = dataset.shards(split)
    if not shards:
        raise DataError(f"{path} has no {split!r} tokens; pick another split or prepare more data")
    return shards
