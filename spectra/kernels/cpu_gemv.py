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

import os

import torch
import torch.nn.functional as F

from ..formats import TQ1_POW3, get_format
from ..ternary import expand_scales
from .launch_support import FastPathSwitch
from .reference import scale_columns_reference

MAX_M = 8
# SPECTRA_CPU_GEMV=0 turns the path off (the reference everywhere, e.g. for bit-exact comparisons).
ENABLED = os.environ.get("SPECTRA_CPU_GEMV", "1") != "0"
FALLBACK = FastPathSwitch("the compiled CPU product of packed weights", "the reference (unpack, then a dense product)")
_compiled: dict[str, object] = {}


def _tq2_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """sum over planes i of x[:, i*q:(i+1)*q] . (code_i(packed) - 1), in fp32 ([m, n])."""
    q = packed.shape[1]
    b = packed.to(torch.int32)
    acc = None
    for i in range(4):
        trits = ((b >> (2 * i)) & 3).to(torch.float32) - 1.0
        part = (x[:, None, i * q:(i + 1) * q] * trits[None]).sum(-1)
        acc = part if acc is None else acc + part
    return acc


def _tq1_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """The same for TQ1: digit i = ((q * 3^i) mod 256) * 3 >> 8, no division (formats.unpack_tq1)."""
    q = packed.shape[1]
    b = packed.to(torch.int32)
    acc = None
    for i, pow3 in enumerate(TQ1_POW3):
        trits = ((((b * pow3) & 255) * 3) >> 8).to(torch.float32) - 1.0
        part = (x[:, None, i * q:(i + 1) * q] * trits[None]).sum(-1)
        acc = part if acc is None else acc + part
    return acc


_PRODUCTS = {"tq2": _tq2_product, "tq1": _tq1_product}


def usable(x: torch.Tensor) -> bool:
    """Whether a call with activations `x` may take this path (CPU, small m, no gradient, compiling works)."""
    if not ENABLED or FALLBACK.broken is not None or x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False
    return x.numel() // max(x.shape[-1], 1) <= MAX_M


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
    width = spec.trits_per_byte * packed.shape[1]  # the planes' columns, padding included
    xf = F.pad(x2.float(), (0, width - in_features))
    try:
        y = _product(spec.name)(xf, packed)
    except Exception as exc:  # noqa: BLE001 - no C++ compiler, or an inductor failure: the reference instead
        FALLBACK.disable(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return None
    if not column_scales:  # one scale, or one per shard of the output rows
        y = y * expand_scales(scales.float(), (n, 1), 0).flatten()
    return y.to(x.dtype).reshape(*lead, n)
