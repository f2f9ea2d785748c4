"""Bit packing of quantization codes: the one owner of the QuantLM byte layout.

Layout (format "quant-v1"): codes are unsigned integers in [0, 2**bits), packed along the last axis, row by
row, least-significant bits first. A row of `n` codes is cut into chunks of `codes_per_chunk` codes, which
fill exactly `bytes_per_chunk` bytes (the smallest whole number of bytes that holds a whole number of codes):

    bits  codes/chunk  bytes/chunk
      2        4            1        (4 codes per byte)
      3        8            3        (8 codes in 24 bits)
      4        2            1        (nibbles: low nibble first)
      6        4            3        (4 codes in 24 bits)
      8        1            1        (one code per byte)

Code j of a chunk occupies bits [j*bits, (j+1)*bits) of the chunk read as a little-endian integer. A row whose
length is not a multiple of codes_per_chunk is padded with zero codes, so the true bits per weight of a
matrix is 8 * bytes / codes, which the size reports use.
"""

from __future__ import annotations

import math

import torch

from ..errors import FormatError

SUPPORTED_BITS = (2, 3, 4, 6, 8)


def chunk_shape(bits: int) -> tuple[int, int]:
    """(codes per chunk, bytes per chunk) of `bits`-bit codes."""
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"unsupported code width {bits} bits; choose one of {SUPPORTED_BITS}")
    chunk_bits = math.lcm(bits, 8)
    return chunk_bits // bits, chunk_bits // 8


def packed_length(n: int, bits: int) -> int:
    """Bytes that a row of `n` codes of `bits` bits packs into."""
    codes, nbytes = chunk_shape(bits)
    return -(-n // codes) * nbytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes [..., packed_length(n, bits)] holding integer `codes` [..., n] in [0, 2**bits)."""
    per_chunk, nbytes = chunk_shape(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise FormatError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise FormatError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing; "
                          f"got [{int(codes.min())}, {int(codes.max())}]")
    n = codes.shape[-1]
    pad = -n % per_chunk
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad))
    c = c.reshape(*codes.shape[:-1], -1, per_chunk)
    # Every chunk is at most 24 bits, so the chunk as one int64 is exact.
    shifts = torch.arange(per_chunk, device=codes.device, dtype=torch.int64) * bits
    value = (c << shifts).sum(-1, keepdim=True)
    byte_shifts = torch.arange(nbytes, device=codes.device, dtype=torch.int64) * 8
    packed = (value >> byte_shifts) & 0xFF
    return packed.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 codes [..., n] from bytes written by :func:`pack_codes`."""
    per_chunk, nbytes = chunk_shape(bits)
    if packed.dtype != torch.uint8:
        raise FormatError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_length(n, bits):
        raise FormatError(f"{packed.shape[-1]} bytes per row cannot hold exactly {n} codes of {bits} bits "
                          f"(expected {packed_length(n, bits)}); the tensor does not match its layer shape")
    b = packed.to(torch.int64).reshape(*packed.shape[:-1], -1, nbytes)
    byte_shifts = torch.arange(nbytes, device=packed.device, dtype=torch.int64) * 8
    value = (b << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(per_chunk, device=packed.device, dtype=torch.int64) * bits
    codes = (value >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)


def pack_codes_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-by-bit packing of a 2-D code matrix, written for obviousness; tests compare :func:`pack_codes` to it."""
    rows, n = codes.shape
    out = torch.zeros(rows, packed_length(n, bits), dtype=torch.uint8)
    for r in range(rows):
        for j in range(n):
            value = int(codes[r, j])
            for bit in range(bits):
                position = j * bits + bit
                if (value >> bit) & 1:
                    out[r, position // 8] |= 1 << (position % 8)
    return out
