"""CPU products of packed ternary weights at decode-sized m: decode and multiply-accumulate in one loop.

The reference (:func:`~spectra.kernels.reference.ternary_matmul_reference`) unpacks the whole matrix into int8
trits, builds a dense weight and multiplies: at m = 1 (a decode step) that costs 30-60x the product itself. Here
the product is written as a sum over K of x times each plane's decoded trits, and ``torch.compile`` (inductor's
C++ backend) turns it into one vectorised loop that reads each packed byte once and never materialises a trit
or a weight. Shapes are dynamic, so one compiled loop per format and dtype serves every layer.

Inference only (no gradient to x); m <= :data:`MAX_M` (larger m is compute-bound: the reference's dense
product is faster). It needs a C++ compiler at run time, as every CPU ``torch.compile`` does; where compiling
fails the dispatcher runs the reference, after one warning line (:func:`usable`). Results equal the reference
up to fp32 summation order (the reference multiplies in x's dtype, this accumulates in fp32).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ..formats import TQ1_POW3, get_format
from ..ternary import shard_index
from .launch_support import FastPathSwitch
from .reference import scale_columns_reference

MAX_M = 8
# SPECTRA_CPU_GEMV=0 turns the path off (the reference everywhere, e.g. for bit-exact comparisons).
ENABLED = os.environ.get("SPECTRA_CPU_GEMV", "1") != "0"
FALLBACK = FastPathSwitch("the compiled CPU product of packed weights", "the reference (unpack, then a dense product)")
_compiled: dict[str, object] = {}


def _tq2_product(xf: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """sum over planes i of xf[:, i*q:(i+1)*q] . (code_i(packed) - 1) in fp32, times each output row's scale
    scales[rows] ([m, n]); xf is fp32, zero-padded to the planes' width. (Padding inside the compiled loop made inductor
    test every index against k: 2-3x slower, measured on the 2-core CI-like machine.)"""
    q = packed.shape[1]
    b = packed.to(torch.int32)
    acc = None
    for i in range(4):
        trits = ((b >> (2 * i)) & 3).to(torch.float32) - 1.0
        part = (xf[:, None, i * q:(i + 1) * q] * trits[None]).sum(-1)
        acc = part if acc is None else acc + part
    return acc * scales.float()[rows]


def _tq1_product(xf: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The same for TQ1: digit i = ((q * 3^i) mod 256) * 3 >> 8, no division (formats.unpack_tq1)."""
    q = packed.shape[1]
    b = packed.to(torch.int32)
    acc = None
    for i, pow3 in enumerate(TQ1_POW3):
        trits = ((((b * pow3) & 255) * 3) >> 8).to(torch.float32) - 1.0
        part = (xf[:, None, i * q:(i + 1) * q] * trits[None]).sum(-1)
        acc = part if acc is None else acc + part
    return acc * scales.float()[rows]


_PRODUCTS = {"tq2": _tq2_product, "tq1": _tq1_product}


def usable(x: torch.Tensor) -> bool:
    """Whether a call with activations `x` may take this path (CPU, small m, no gradient, compiling works)."""
    if not ENABLED or FALLBACK.broken is not None or x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False
    return x.numel() // max(x.shape[-1], 1) <= MAX_M


_ONE = torch.ones(1)


@functools.cache
def _row_shards(n: int, parts: int) -> torch.Tensor:
    """The scale index of each of the n output rows (ternary.shard_index), memoised per (n, parts): it depends
    on the shape only, so it can never go stale. Expanding the scales on every call cost more than the product
    of a small layer; the compiled loop now gathers each row's scale itself."""
    return shard_index(n, parts)


def _product(fmt: str):
    fn = _compiled.get(fmt)
    if fn is None:
        fn = _compiled[fmt] = torch.compile(_PRODUCTS[fmt], dynamic=True, fullgraph=True)
    return fn


def ternary_matmul_cpu(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
                       shard_axis: int) -> torch.Tensor | None:
    """y = x @ (trits * scales)^T for x [..., in_features] on the CPU, or None if compiling failed (the caller
    then runs the reference). Same arguments as :func:`~spectra.kernels.ternary_matmul`."""
    spec = get_format(fmt)
    n = packed.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    column_scales = scales.numel() > 1 and shard_axis == 1
    if column_scales:  # on x first, as the reference's weight has them
        x2 = scale_columns_reference(x2, scales, in_features)
    pad = spec.trits_per_byte * packed.shape[1] - in_features  # the planes' padding columns
    xf = F.pad(x2.float(), (0, pad)) if pad else x2.float()
    try:
        if column_scales:  # already on x; one scale, or one per shard of the output rows, on the fp32 sums
            y = _product(spec.name)(xf, packed, _ONE, _row_shards(n, 1))
        else:
            y = _product(spec.name)(xf, packed, scales, _row_shards(n, scales.numel()))
    except Exception as exc:  # noqa: BLE001 - no C++ compiler, or an inductor failure: the reference instead
        FALLBACK.disable(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return None
    return y.to(x.dtype).reshape(*lead, n)
