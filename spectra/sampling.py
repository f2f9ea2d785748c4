"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Two samplers draw from the same distribution. :func:`sample_next` takes its randomness from a
``torch.Generator`` (the plain decoding loop, and the reference). :func:`sample_keyed` takes it from a
counter-based hash of (seed, position, sequence, token id), so it needs no generator state and no host
round trip: it runs inside a captured CUDA graph, where the position is a device tensor, and a fixed seed
gives the same tokens on every run (and, up to float rounding of the logits, on every device). It samples
by the Gumbel-max trick: argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None,
                   top_p: float | None) -> torch.Tensor:
    """fp32 logits / temperature with the tokens outside top-k and top-p set to -inf."""
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop tokens once the mass before them already exceeds top_p (the first token always stays).
        drop = (probs.cumsum(-1) - probs) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next-token ids [B] from last-position logits [B, V]; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = _filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) of int64 values in [0, 2^32). The multipliers are odd
    and below 2^31, so every product stays below 2^63: no signed overflow on any device."""
    for mult in (0x2C1B3C6D, 0x297A2D39, 0x7FEB352D):
        x = x ^ (x >> 16)
        x = (x * mult) & _MASK32
    return x ^ (x >> 15)


def keyed_uniform(shape: tuple[int, int], seed: int | torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in (0, 1) of shape [B, V], a pure function of (seed, position, row, column).
    `position` is a 1-element integer tensor (it may live on the GPU and change between graph replays); so may
    `seed` (a 0-dim integer tensor: a captured graph reused with another seed), with the same results as the
    int."""
    rows, cols = shape
    device = position.device
    key = _mix32((_mix32(position.reshape(1).long() & _MASK32) + (seed & _MASK32)) & _MASK32)
    index = torch.arange(rows * cols, device=device, dtype=torch.long).view(rows, cols)
    bits = _mix32((_mix32(index & _MASK32) + key) & _MASK32)
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample_keyed(logits: torch.Tensor, position: torch.Tensor, seed: int | torch.Tensor = 0, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Next-token ids [B] from logits [B, V] for the token at `position` (a 1-element device tensor), with
    randomness keyed by (seed, position): the same distribution as :func:`sample_next`, no generator state,
    no host synchronisation (graph-capturable). Temperature 0 means greedy (argmax, as sample_next)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    filtered = _filter_logits(logits, temperature, top_k, top_p)
    gumbel = -torch.log(-torch.log(keyed_uniform(tuple(filtered.shape), seed, position)))
    return (filtered + gumbel).argmax(dim=-1)
