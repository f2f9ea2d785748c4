"""Lossless ternary weight formats TQ2 (2 bits/trit) and TQ1 (1.6 bits/trit): the one owner of the layout.

Both formats pack a [out_features, in_features] trit matrix row by row, *planar* within a row so a GPU
kernel can decode a whole byte tile with shifts (TQ2) or multiplies (TQ1) and pair each decoded plane
with a contiguous slice of the activations. For a row with padded length Kp = G * Q (G trits per byte):

    byte j of the row holds the trits of columns j, j + Q, j + 2Q, ..., j + (G-1)Q.

In memory (the kernel layout) Q is rounded up to a multiple of 16 bytes so every row starts 16-byte aligned
(vector loads). On disk (the storage layout) Q = ceil(k / G) with no alignment, so TQ1 stays at 1.6 bits per
weight on shapes such as k = 3072 where 16-byte rows would cost 1.625; the two differ only in Q and convert
losslessly (`to_storage`, `from_storage`). Padding columns hold trit 0. See docs/formats.md for the bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import FormatError

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
ROW_ALIGN_BYTES = 16     # kernel layout (in memory)
STORAGE_ALIGN_BYTES = 1  # storage layout (packed checkpoints)
TQ1_POW3 = (1, 3, 9, 27, 81)


def _check_trits(trits: torch.Tensor) -> None:
    if trits.dim() != 2:
        raise FormatError(f"expected a 2-D [out_features, in_features] trit matrix, got shape {tuple(trits.shape)}")
    if trits.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise FormatError(f"trits must be an integer tensor, got {trits.dtype}; ternarize the weights first")
    if trits.numel() and (int(trits.min()) < -1 or int(trits.max()) > 1):
        raise FormatError("weights are not ternary: values outside {-1, 0, 1}; ternarize them first")


def row_bytes(in_features: int, trits_per_byte: int, align: int = ROW_ALIGN_BYTES) -> int:
    """Bytes per packed row: ceil(k / G) rounded up to the row alignment."""
    q = -(-in_features // trits_per_byte)
    return -(-q // align) * align


def _planes(trits: torch.Tensor, trits_per_byte: int, align: int) -> torch.Tensor:
    """Digits t+1 in {0,1,2} as uint8 of shape [n, G, Q] (plane i = columns i*Q .. i*Q+Q-1)."""
    _check_trits(trits)
    n, k = trits.shape
    q = row_bytes(k, trits_per_byte, align)
    digits = torch.ones(n, trits_per_byte * q, dtype=torch.uint8, device=trits.device)
    digits[:, :k] = (trits + 1).to(torch.uint8)
    return digits.view(n, trits_per_byte, q)


def _check_packed(packed: torch.Tensor, in_features: int, trits_per_byte: int, name: str,
                  align: int = ROW_ALIGN_BYTES) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise FormatError(f"{name} data must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != row_bytes(in_features, trits_per_byte, align):
        raise FormatError(f"{name} rows hold {packed.shape[1]} bytes but in_features={in_features} needs "
                          f"{row_bytes(in_features, trits_per_byte, align)}; the file is corrupt or mislabeled")


@functools.cache
def _table(name: str, device: torch.device) -> torch.Tensor:
    return _TABLES[name].to(device)


def _planes_to_trits(planes: torch.Tensor, in_features: int) -> torch.Tensor:
    """[n, G, Q] digits d = t + 1 (plane i holds columns i*Q .. i*Q + Q - 1) -> [n, in_features] int8 trits."""
    n, g, q = planes.shape
    trits = (planes.view(torch.int8) if planes.dtype == torch.uint8 else planes.to(torch.int8)).sub_(1)
    trits = trits.view(n, g * q)
    return trits if g * q == in_features else trits[:, :in_features].contiguous()


def _tq2_code(b: torch.Tensor, i: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The 2-bit code of plane i (bits 2i..2i+1) of TQ2 bytes."""
    return torch.bitwise_and(b >> (2 * i), 3, out=out)


def tq2_codes(b: torch.Tensor) -> list[torch.Tensor]:
    """The four 2-bit codes (plane 0 in the low bits) of TQ2 bytes."""
    b = b.to(torch.int32)
    return [_tq2_code(b, i) for i in range(4)]


def pack_tq2(trits: torch.Tensor, align: int = ROW_ALIGN_BYTES) -> torch.Tensor:
    """[n, k] trits -> [n, row_bytes(k, 4)] uint8; trit of plane i in bits 2i..2i+1, stored as t + 1."""
    d = _planes(trits, 4, align)
    return d[:, 0] | (d[:, 1] << 2) | (d[:, 2] << 4) | (d[:, 3] << 6)


def unpack_tq2(packed: torch.Tensor, in_features: int, align: int = ROW_ALIGN_BYTES) -> torch.Tensor:
    _check_packed(packed, in_features, 4, "TQ2", align)
    if bool((packed & (packed >> 1) & 0x55).any()):  # some 2-bit field with both bits set: code 3
        raise FormatError("TQ2 data holds the invalid 2-bit code 3; the file is corrupt")
    # Plane i = (byte >> 2i) & 3, written straight into its column block: 6-9x faster on the CPU than a
    # 256-entry table gather plus plane transpose (a 1536x512 layer: 1.66 -> 0.26 ms on the 2-core dev machine).
    n, q = packed.shape
    planes = torch.empty(n, 4, q, dtype=torch.uint8, device=packed.device)
    for i in range(4):
        _tq2_code(packed, i, out=planes[:, i])
    return _planes_to_trits(planes, in_features)


def pack_tq1(trits: torch.Tensor, align: int = ROW_ALIGN_BYTES) -> torch.Tensor:
    """[n, k] trits -> [n, row_bytes(k, 5)] uint8.

    Five digits d0..d4 (d = t + 1, d0 most significant) form v = sum d_i 3^(4-i) in 0..242, stored as
    q = ceil(v * 256 / 243) so that decoding needs no division (arXiv 2506.23025, Sec. 3.2):
    d_i = ((q * 3^i) mod 256) * 3 >> 8.
    """
    d = _planes(trits, 5, align)
    v = d[:, 0] * 81 + d[:, 1] * 27 + d[:, 2] * 9 + d[:, 3] * 3 + d[:, 4]  # <= 242: fits in uint8
    return _table("tq1_encode", v.device)[v.to(torch.int32)]


def _tq1_digit(q: torch.Tensor, pow3: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The base-3 digit ((q * 3^i) mod 256) * 3 >> 8 of TQ1 bytes q (held in 16 bits or wider), pow3 = 3^i."""
    return torch.mul(q, pow3, out=out).bitwise_and_(255).mul_(3).bitwise_right_shift_(8)


def tq1_digits(q: torch.Tensor) -> list[torch.Tensor]:
    """The five base-3 digits (most significant first) of TQ1 bytes, by multiply-and-shift only."""
    q = q.to(torch.int32)
    return [_tq1_digit(q, p) for p in TQ1_POW3]


def unpack_tq1(packed: torch.Tensor, in_features: int, align: int = ROW_ALIGN_BYTES) -> torch.Tensor:
    _check_packed(packed, in_features, 5, "TQ1", align)
    # the digits in 16 bits, each plane written into its column block (1.3-1.6x faster on the CPU than a
    # table gather plus plane transpose)
    n, q = packed.shape
    wide = packed.to(torch.int16)
    planes = torch.empty(n, 5, q, dtype=torch.int16, device=packed.device)
    for i, p in enumerate(TQ1_POW3):
        _tq1_digit(wide, p, out=planes[:, i])
    return _planes_to_trits(planes, in_features)


_TABLES: dict[str, torch.Tensor] = {
    # Index v in 0..242 -> ceil(v * 256 / 243); entries past 242 are never used.
    "tq1_encode": torch.tensor([min(255, (v * 256 + 242) // 243) for v in range(256)], dtype=torch.uint8),
}


@dataclass(frozen=True)
class TernaryFormat:
    name: str
    trits_per_byte: int
    pack: Callable[..., torch.Tensor]    # (trits, align=ROW_ALIGN_BYTES)
    unpack: Callable[..., torch.Tensor]  # (packed, in_features, align=ROW_ALIGN_BYTES)

    def row_bytes(self, in_features: int, align: int = ROW_ALIGN_BYTES) -> int:
        return row_bytes(in_features, self.trits_per_byte, align)

    def bits_per_weight(self, out_features: int, in_features: int, num_scales: int = 1,
                        scale_bits: int = 16, align: int = ROW_ALIGN_BYTES) -> float:
        total = 8 * out_features * self.row_bytes(in_features, align) + scale_bits * num_scales
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


def check_format_version(version: object) -> int:
    """The packed-format version as an int, or a FormatError naming the versions this spectra reads."""
    if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise FormatError(f"packed format version {version!r} is unknown to this spectra (it reads versions "
                          f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); upgrade spectra or re-pack the "
                          f"checkpoint from its unpacked source with `spectra pack`")
    return version


# Row chunks keep the int32 temporaries of unpack/pack near 64 MB for any matrix size.
_CHUNK_TRITS = 1 << 24


def _row_chunks(rows: int, trits_per_row: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_TRITS // max(1, trits_per_row))
    return [(s, min(rows, s + step)) for s in range(0, rows, step)]


def relayout(packed: torch.Tensor, fmt: str, in_features: int, src_align: int, dst_align: int) -> torch.Tensor:
    """The same trits re-packed with another row alignment (identical bytes when Q does not change)."""
    f = get_format(fmt)
    _check_packed(packed, in_features, f.trits_per_byte, f.name.upper(), src_align)
    if f.row_bytes(in_features, src_align) == f.row_bytes(in_features, dst_align):
        return packed
    out = torch.empty(packed.shape[0], f.row_bytes(in_features, dst_align), dtype=torch.uint8,
                      device=packed.device)
    for start, end in _row_chunks(packed.shape[0], in_features):
        out[start:end] = f.pack(f.unpack(packed[start:end], in_features, src_align), dst_align)
    return out


def to_storage(packed: torch.Tensor, fmt: str, in_features: int) -> torch.Tensor:
    """Kernel layout (16-byte rows) -> storage layout (ceil(k/G)-byte rows) for packed checkpoints."""
    return relayout(packed, fmt, in_features, ROW_ALIGN_BYTES, STORAGE_ALIGN_BYTES)


def from_storage(stored: torch.Tensor, fmt: str, in_features: int) -> torch.Tensor:
    """Storage layout -> kernel layout, after checking that the bytes are a valid encoding."""
    validate_packed(stored, fmt, in_features, STORAGE_ALIGN_BYTES)
    return relayout(stored, fmt, in_features, STORAGE_ALIGN_BYTES, ROW_ALIGN_BYTES)


# The 243 bytes a TQ1 encoder can emit (q = ceil(v * 256 / 243) is injective on 0..242); the other 13 byte
# values decode to some digits but only appear in corrupt data.
_TABLES["tq1_canonical"] = torch.zeros(256, dtype=torch.bool)
_TABLES["tq1_canonical"][[(v * 256 + 242) // 243 for v in range(243)]] = True


def validate_packed(packed: torch.Tensor, fmt: str, in_features: int, align: int = ROW_ALIGN_BYTES) -> None:
    """FormatError unless `packed` is exactly what packing some trit matrix would give: right shape, only valid
    codes (no TQ2 code 3, only canonical TQ1 bytes) and zero trits in the padding columns."""
    f = get_format(fmt)
    name = f.name.upper()
    _check_packed(packed, in_features, f.trits_per_byte, name, align)
    q = packed.shape[1]
    if fmt.lower() == "tq1" and packed.numel():
        if not bool(_table("tq1_canonical", packed.device)[packed.to(torch.int32)].all()):
            raise FormatError("TQ1 data holds byte values no TQ1 encoder produces; the file is corrupt")
    if fmt.lower() == "tq2" and bool((packed & (packed >> 1) & 0x55).any()):
        raise FormatError("TQ2 data holds the invalid 2-bit code 3; the file is corrupt")
    # Padding columns c >= in_features sit in plane c // Q at byte c % Q: decode only those digits.
    planes = tq2_codes if f.trits_per_byte == 4 else tq1_digits
    for plane in range(in_features // q if q else 0, f.trits_per_byte):
        first = max(0, in_features - plane * q)
        if first < q and bool(planes(packed[:, first:])[plane].ne(1).any()):
            raise FormatError(f"{name} padding columns (past in_features={in_features}) hold nonzero trits; "
                              f"the data is corrupt or was packed for a different in_features")
