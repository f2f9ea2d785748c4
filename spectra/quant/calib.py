"""Calibration sequences for GPTQ: random windows of a token stream (as GPTQ samples C4 segments)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError


def calibration_windows(tokens: torch.Tensor, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`samples` windows [samples, seq_len] starting at random offsets of the 1-D id stream `tokens`."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if samples < 1 or seq_len < 1:
        raise DataError(f"samples ({samples}) and seq_len ({seq_len}) must be positive")
    if tokens.numel() < seq_len:
        raise DataError(f"the calibration data holds {tokens.numel()} tokens, fewer than one sequence of "
                        f"{seq_len}; give more text or a smaller --seq-len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (samples,), generator=generator)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def calibration_tokens(source: str | Path, tokenizer, samples: int = 128, seq_len: int = 2048,
                       seed: int = 0) -> torch.Tensor:
    """Calibration windows from prepared data shards, a .npy of ids, .jsonl, a text file or a folder of text
    (tokenized with `tokenizer`, documents joined by the end-of-text token), read by spectra.eval's loader."""
    from ..eval.perplexity import load_eval_tokens

    return calibration_windows(load_eval_tokens(source, tokenizer), samples, seq_len, seed)
