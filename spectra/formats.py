"""Lossless ternary weight formats TQ2 (2 bits/trit) and TQ1 (1.6 bits/trit): the one owner of the layout.

Both formats pack a [out_features, in_features] trit matrix row by row, *planar* within a row so a GPU
kernel can decode a whole byte tile with shifts (TQ2) or multiplies (TQ1) and pair each decoded plane
with a contiguous slice of the activations. For a row with padded length Kp = G * Q (G trits per byte):

    byte j of the row holds the trits of columns j, j + Q, j + 2Q, ..., j + (G-1)Q.

Q is rounded up to a multiple of 16 bytes so every row starts 16-byte aligned (vector loads).
Padding columns hold trit 0. See docs/formats.md for the byte-by-byte description.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import FormatError

FORMAT_VERSION = 1
ROW_ALIGN_BYTES = 16
TQ1_POW3 = (1, 3, 9, 27, 81)


def _check_trits(trits: torch.Tensor) -> None:
    if trits.dim() != 2:
        raise FormatError(f"expected a 2-D [out_features, in_features] trit matrix, got shape {tuple(trits.shape)}")
    if trits.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise FormatError(f"trits must be an integer tensor, got {trits.dtype}; ternarize the weights first")
    if trits.numel() and (int(trits.min()) < -1 or int(trits.max()) > 1):
        raise FormatError("weights are not ternary: values outside {-1, 0, 1}; ternarize them first")


def row_bytes(in_features: int, trits_per_byte: int) -> int:
    """Bytes per packed row: ceil(k / G) rounded up to the row alignment."""
    q = -(-in_features // trits_per_byte)
    return -(-q // ROW_ALIGN_BYTES) * ROW_ALIGN_BYTES


def _planes(trits: torch.Tensor, trits_per_byte: int) -> torch.Tensor:
    """Digits t+1 in {0,1,2} as int32 of shape [n, G, Q] (plane i = columns i*Q .. i*Q+Q-1)."""
    _check_trits(trits)
    n, k = trits.shape
    q = row_bytes(k, trits_per_byte)
    digits = torch.ones(n, trits_per_byte * q, dtype=torch.int32, device=trits.device)
    digits[:, :k] = trits.to(torch.int32) + 1
    return digits.view(n, trits_per_byte, q)


def _check_packed(packed: torch.Tensor, in_features: int, trits_per_byte: int, name: str) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise FormatError(f"{name} data must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != row_bytes(in_features, trits_per_byte):
        raise FormatError(f"{name} rows hold {packed.shape[1]} bytes but in_features={in_features} needs "
                          f"{row_bytes(in_features, trits_per_byte)}; the file is corrupt or mislabeled")


def pack_tq2(trits: torch.Tensor) -> torch.Tensor:
    """[n, k] trits -> [n, row_bytes(k, 4)] uint8; trit of plane i in bits 2i..2i+1, stored as t + 1."""
    d = _planes(trits, 4)
    return (d[:, 0] | (d[:, 1] << 2) | (d[:, 2] << 4) | (d[:, 3] << 6)).to(torch.uint8)


def unpack_tq2(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    _check_packed(packed, in_features, 4, "TQ2")
    b = packed.to(torch.int32)
    planes = torch.stack([(b >> (2 * i)) & 3 for i in range(4)], dim=1)
    if planes.numel() and int(planes.max()) > 2:
        raise FormatError("TQ2 data holds the invalid 2-bit code 3; the file is corrupt")
    return (planes.reshape(packed.shape[0], -1)[:, :in_features] - 1).to(torch.int8)


def pack_tq1(trits: torch.Tensor) -> torch.Tensor:
    """[n, k] trits -> [n, row_bytes(k, 5)] uint8.

    Five digits d0..d4 (d = t + 1, d0 most significant) form v = sum d_i 3^(4-i) in 0..242, stored as
    q = ceil(v * 256 / 243) so that decoding needs no division (arXiv 2506.23025, Sec. 3.2):
    d_i = ((q * 3^i) mod 256) * 3 >> 8.
    """
    d = _planes(trits, 5)
    v = d[:, 0] * 81 + d[:, 1] * 27 + d[:, 2] * 9 + d[:, 3] * 3 + d[:, 4]
    return ((v * 256 + 242) // 243).to(torch.uint8)


def tq1_digits(q: torch.Tensor) -> list[torch.Tensor]:
    """The five base-3 digits (most significant first) of TQ1 bytes, by multiply-and-shift only."""
    q = q.to(torch.int32)
    return [(((q * p) & 255) * 3) >> 8 for p in TQ1_POW3]


def unpack_tq1(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    _check_packed(packed, in_features, 5, "TQ1")
    planes = torch.stack(tq1_digits(packed), dim=1)
    return (planes.reshape(packed.shape[0], -1)[:, :in_features] - 1).to(torch.int8)


@dataclass(frozen=True)
class TernaryFormat:
    name: str
    trits_per_byte: int
    pack: Callable[[torch.Tensor], torch.Tensor]
    unpack: Callable[[torch.Tensor, int], torch.Tensor]

    def row_bytes(self, in_features: int) -> int:
        return row_bytes(in_features, self.trits_per_byte)

    def bits_per_weight(self, out_features: int, in_features: int, num_scales: int = 1,
                        scale_bits: int = 16) -> float:
        total = 8 * out_features * self.row_bytes(in_features) + scale_bits * num_scales
        return total / (out_features * in_features)


FORMATS: dict[str, TernaryFormat] = {
    "tq2": TernaryFormat("tq2", 4, pack_tq2, unpack_tq2),
    "tq1": TernaryFormat("tq1", 5, pack_tq1, unpack_tq1),
}


def get_format(name: str) -> TernaryFormat:
    try:
        return FORMATS[name.lower()]
    except KeyError:
        raise FormatError(f"unknown ternary format {name!r}; known formats: {', '.join(FORMATS)}") from None
