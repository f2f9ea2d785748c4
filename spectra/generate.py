"""Autoregressive generation with a preallocated KV cache: temperature, top-k, top-p, streaming."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import ConfigError
from .model import SpectraLM


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next-token ids [B] from last-position logits [B, V]; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop tokens once the mass before them already exceeds top_p (the first token always stays).
        drop = (cumulative - sorted_logits.softmax(-1)) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


DecodeStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling options that would crash mid-generation or mean nothing (NaN temperature, top_p 2)."""
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be at least 1 (or unset), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must lie in (0, 1] (or be unset), got {top_p}")


@torch.no_grad()
def generate(model: SpectraLM, prompt: torch.Tensor | list[int], max_new_tokens: int = 64,
             temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_id: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None,
             decode_step: DecodeStep | None = None) -> torch.Tensor:
    """Continue `prompt` ([B, T] ids or a list of ids) by up to `max_new_tokens` tokens.

    Returns [B, T + generated]. `on_token` receives each new [B] token tensor as it is produced
    (for streaming). `decode_step(tokens [B,1], pos [1]) -> logits` replaces the plain forward for
    one-token steps (e.g. a CUDA-graph replay); the prompt is always prefilled with the plain forward.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    device = model.model.embed_tokens.weight.device
    tokens = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if tokens.dim() == 1:
        tokens = tokens[None]
    batch, prompt_len = tokens.shape
    if prompt_len == 0:
        raise ValueError("the prompt must hold at least one token")
    total = min(prompt_len + max_new_tokens, model.config.max_seq_len)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    own_cache = decode_step is None
    if own_cache:
        model.setup_cache(batch, total)
        decode_step = lambda tok, pos: model(tok, input_pos=pos)  # noqa: E731
    out = [tokens]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    try:
        logits = model(tokens, input_pos=torch.arange(prompt_len, device=device))
        for pos in range(prompt_len, total):
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                finished |= nxt == eos_id
            out.append(nxt[:, None])
            if on_token is not None:
                on_token(nxt)
            if (eos_id is not None and bool(finished.all())) or pos == total - 1:
                break
            logits = decode_step(nxt[:, None], torch.tensor([pos], device=device))
    finally:
        if own_cache:
            model.clear_cache()
    return torch.cat(out, dim=1)


@torch.no_grad()
def generate_uncached(model: SpectraLM, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full recomputation at every step: the reference the KV cache is tested against."""
    tokens = prompt if prompt.dim() == 2 else prompt[None]
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -model.config.max_seq_len:])
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens
