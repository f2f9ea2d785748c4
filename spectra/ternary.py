"""Ternary math: the one definition of per-shard scales, ternarization and the values they give back.

The bottom of the import graph (it imports only :mod:`spectra.errors`): the weight kinds (:mod:`spectra.linear`,
:mod:`spectra.packed`), checkpoints, analysis, the GGUF writer and the GPU kernels' references all take their
ternary math from here, so every path agrees to the bit. Also the rotary embedding: the reference
(:func:`apply_rope`), which the fused decode-attention kernel matches, and the same values in fewer ops for the
model's other steps (:func:`apply_rope_signed`).
"""

from __future__ import annotations

from typing import Literal

import torch

from .errors import ConfigError, FormatError

ShardAxis = Literal[0, 1]
# Megatron-style tensor parallelism: column-parallel layers (q, k, v, gate, up) split output features
# (axis 0 of the [out, in] weight); row-parallel layers (o, down) split input features (axis 1).
COLUMN_PARALLEL: ShardAxis = 0
ROW_PARALLEL: ShardAxis = 1
SCALE_EPS = 1e-5


def shard_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of each of `parts` contiguous shards of `size` (torch.tensor_split sizes)."""
    if parts < 1 or parts > size:
        raise ConfigError(f"cannot split {size} features into {parts} model-parallel shards")
    base, extra = divmod(size, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def expand_scales(scales: torch.Tensor, shape: tuple[int, int], axis: int) -> torch.Tensor:
    """Broadcastable per-element scale tensor for per-shard `scales` (length P) of a [out, in] weight."""
    size, parts = shape[axis], scales.numel()
    shard_bounds(size, parts)  # validates the split
    if parts == 1:
        per_feature = scales.reshape(1).expand(size)
    else:
        per_feature = scales[shard_index(size, parts, scales.device)]
    return per_feature[:, None] if axis == 0 else per_feature[None, :]


def shard_index(size: int, parts: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The shard (0..parts-1) of each of `size` features for torch.tensor_split sizes (the first `extra` shards
    one longer), computed on `device`: no host-to-device copy, so no stall per layer and safe inside CUDA-graph
    capture."""
    base, extra = divmod(size, parts)
    head = extra * (base + 1)
    feature = torch.arange(size, device=device)
    return torch.where(feature < head, feature // (base + 1), extra + (feature - head) // max(base, 1))


def ternary_dense_weight(trits: torch.Tensor, scales: torch.Tensor, shard_axis: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """trits * per-shard scales as a dense [out, in] weight (computed in fp32, then cast)."""
    scale = expand_scales(scales.float(), tuple(trits.shape), shard_axis)
    return (trits.float() * scale).to(dtype)


def shard_scales(weight: torch.Tensor, parts: int = 1, axis: int = 0) -> torch.Tensor:
    """Per-shard scales mean|W| + eps (float32, length `parts`); shards split `axis` like torch.tensor_split.

    Every path that ternarizes (training forward, freezing, packing, analysis) uses this one function, so
    they agree to the bit. ``vector_norm(ord=1)`` reads each shard once without materialising |W|.
    """
    if parts == 1:  # the common case, without the split and stack
        return (torch.linalg.vector_norm(weight.detach(), 1, dtype=torch.float32) / weight.numel() + SCALE_EPS)[None]
    pieces = torch.tensor_split(weight.detach(), parts, dim=axis)
    return torch.stack([torch.linalg.vector_norm(p, 1, dtype=torch.float32) / p.numel() for p in pieces]) + SCALE_EPS


def ternarize(weight: torch.Tensor, parts: int = 1, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ternary values and per-shard scales: scale = mean|W| + eps, trit = round(clamp(W/scale, -1, 1)).

    Returns (trits as int8 with the weight's shape, scales as float32 of length `parts`).
    """
    w = weight.detach().float()
    scales = shard_scales(w, parts, axis)
    scale_full = expand_scales(scales, tuple(w.shape), axis)
    trits = torch.round(torch.clamp(w / scale_full, -1.0, 1.0)).to(torch.int8)
    return trits, scales


def latent_from_ternary(trits: torch.Tensor, scales: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Latent weights whose ternarization gives back `trits` and `scales` (to fp32 rounding of the mean).

    Copying trits * s into the latent weights would not do: their mean |W| is s times the shard's nonzero
    fraction, so training would resume with smaller scales. Each shard is stretched by 1 / (nonzero
    fraction) and the eps that :func:`shard_scales` adds is taken off.
    """
    parts = scales.numel()
    out = torch.empty(trits.shape, dtype=torch.float32, device=trits.device)
    for t, o, s in zip(torch.tensor_split(trits, parts, dim=axis), torch.tensor_split(out, parts, dim=axis),
                       scales.float().tolist()):
        nonzero = float(t.count_nonzero()) / max(t.numel(), 1)
        o.copy_(t.float() * (max(s - SCALE_EPS, 0.0) / nonzero if nonzero else 0.0))
    return out


def check_ternary(trits: torch.Tensor) -> None:
    """FormatError unless `trits` is int8 with values in {-1, 0, 1}."""
    if trits.dtype != torch.int8:
        raise FormatError(f"trits must be int8, got {trits.dtype}")
    if trits.numel() and (trits.min() < -1 or trits.max() > 1):
        raise FormatError("trits must lie in {-1, 0, 1}; got values outside that range "
                          "(ternarize the weights first with spectra.ternarize)")


def detect_ternary(weight: torch.Tensor, parts: int, axis: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 trits, per-shard scales) if every shard of `weight` holds only {-s, 0, +s}; else None."""
    trits = torch.sign(weight).to(torch.int8)
    scales = []
    for start, end in shard_bounds(weight.shape[axis], parts):
        shard = weight.narrow(axis, start, end - start).abs()
        top = shard.max()
        if not bool(((shard == 0) | (shard == top)).all()):
            return None
        scales.append(top)
    return trits, torch.stack(scales).to(weight.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in LLaMA's half-split ("rotate_half") layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def signed_sines(sin: torch.Tensor) -> torch.Tensor:
    """The rotary sines [..., D] with their first half negated, for :func:`apply_rope_signed`."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rope_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` bit for bit, given ``signed_sines(sin)`` (computed once per forward): rotate_half(x) * sin
    is x rolled by half a row times the signed sines, since negating a product is exact. One roll replaces two
    slices, a negation and a concatenation: fewer kernels in every layer of a prefill or training step."""
    return (x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed).to(x.dtype)
