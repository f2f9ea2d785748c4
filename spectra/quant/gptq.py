"""GPTQ (Frantar et al. 2022, arXiv 2210.17323): quantize a weight matrix column by column, spreading each
column's rounding error over the columns not yet quantized so that ||WX - QX|| on calibration inputs X stays
small. The Hessian of that objective is H = 2 X X^T; its Cholesky-factored inverse gives every update.
"""

from __future__ import annotations

import math

import torch

from ..errors import DataError
from .grid import QuantConfig, effective_group_size, from_codes, grid_params, num_groups, to_codes
from .linear import QuantizedWeight


class HessianAccumulator:
    """Running H = 2/N sum_t x_t x_t^T over the N input rows a linear layer has seen (float32)."""

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[-1] != self.hessian.shape[0]:
            raise DataError(f"layer input has {x.shape[-1]} features, expected {self.hessian.shape[0]}")
        total = self.rows + x.shape[0]
        # Rescale the old mean and add the new rows so that H stays an average (no overflow on long runs).
        self.hessian.mul_(self.rows / total)
        x = x * math.sqrt(2.0 / total)
        self.hessian.addmm_(x.T, x)
        self.rows = total


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """||WX - QX||_F^2 / N from the (undamped) Hessian: tr((W-Q) H (W-Q)^T) / 2."""
    delta = weight.float() - approx.float()
    return float(0.5 * torch.einsum("oi,ij,oj->", delta, hessian, delta))


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1: row i holds the update for column i."""
    h = hessian.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise DataError(f"the layer's Hessian is not positive definite even with damping {damp}; "
                        f"use more calibration samples or a larger damping (--damp 0.1)")
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = -1,
                  sym: bool = False, act_order: bool = False, damp: float = 0.01,
                  block_size: int = 128) -> QuantizedWeight:
    """GPTQ codes for `weight` [out, in] given the input Hessian `hessian` [in, in] (same device).

    Column groups are taken in quantization order (after the act_order permutation), and each group's
    grid is fitted to its columns *after* the error updates of the earlier columns have reached them.
    """
    QuantConfig(bits=bits, group_size=group_size, sym=sym, act_order=act_order, damp=damp, block_size=block_size)
    w = weight.detach().float().clone().to(hessian.device)
    h = hessian.float().clone()
    out, n = w.shape
    # An input that was zero on every calibration token carries no information: give it a unit curvature so
    # the factorisation exists. Its weights are rounded to nearest (they receive no updates from others).
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp)

    maxq = 2**bits - 1
    size = effective_group_size(group_size, n)
    scales = torch.empty(out, num_groups(group_size, n), device=w.device)
    zeros = torch.empty_like(scales)
    codes = torch.empty(out, n, dtype=torch.int64, device=w.device)
    scale = zero = None
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % size == 0:
                # The group's columns as updated so far: the rest of this block and, where the group reaches
                # past it, the next columns plus the updates of this block they are still owed.
                beyond = min(size, n - col) - (end - col)
                group = block[:, i:i + size]
                if beyond > 0:
                    owed = errors[:, :i] @ hinv[start:col, end:end + beyond]
                    group = torch.cat([group, w[:, end:end + beyond] - owed], dim=1)
                scale, zero = grid_params(group, bits, sym)
                scales[:, col // size], zeros[:, col // size] = scale, zero
            column = block[:, i]
            c = to_codes(column, scale, zero, maxq)
            codes[:, col] = c
            err = (column - from_codes(c, scale, zero)) / hblock[i, i]
            # Exact update within the block; later blocks receive all of it at once below (lazy batching).
            block[:, i:] -= err[:, None] * hblock[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return QuantizedWeight(codes, scales, zeros, perm, bits, group_size)


@torch.no_grad()
def gptq_quantize_reference(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = -1,
                            sym: bool = False, act_order: bool = False, damp: float = 0.01) -> QuantizedWeight:
    """GPTQ written as the plain Optimal Brain Surgeon recursion, in float64, for tests.

    After quantizing column q: W[:, rest] -= err / Hinv[q, q] * Hinv[q, rest], then q is eliminated from
    the inverse Hessian, Hinv -= Hinv[:, q] Hinv[q, :] / Hinv[q, q]. No Cholesky factor, no lazy batches.
    """
    w = weight.detach().double().clone()
    h = hessian.double().clone()
    out, n = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(n)
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    size = effective_group_size(group_size, n)
    maxq = 2**bits - 1
    scales = torch.empty(out, num_groups(group_size, n), dtype=torch.float32)
    zeros = torch.empty_like(scales)
    codes = torch.empty(out, n, dtype=torch.int64)
    for q in range(n):
        if q % size == 0:
            scales[:, q // size], zeros[:, q // size] = grid_params(w[:, q:q + size], bits, sym)
        scale, zero = scales[:, q // size].double(), zeros[:, q // size].double()
        codes[:, q] = to_codes(w[:, q], scale, zero, maxq)
        err = (w[:, q] - from_codes(codes[:, q], scale, zero)) / hinv[q, q]
        w[:, q:] -= err[:, None] * hinv[q, q:][None, :]
        hinv -= torch.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    return QuantizedWeight(codes, scales, zeros, order if act_order else None, bits, group_size)
