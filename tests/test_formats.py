"""TQ2 / TQ1 formats: lossless round trips, the byte layout against a plain reference, the division-free TQ1
decode, validation of corrupt data, and the bits per weight achieved on the 3.9B shapes."""

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectra.block import block_linear_shapes
from spectra.config import get_config
from spectra.errors import FormatError
from spectra.formats import (
    FORMATS,
    ROW_ALIGN_BYTES,
    STORAGE_ALIGN_BYTES,
    check_format_version,
    from_storage,
    get_format,
    pack_tq1,
    relayout,
    row_bytes,
    to_storage,
    tq1_digits,
    unpack_tq1,
    validate_packed,
)

ALIGNS = (ROW_ALIGN_BYTES, STORAGE_ALIGN_BYTES)


def random_trits(rows: int, cols: int, seed: int, fill: str = "random") -> torch.Tensor:
    if fill != "random":
        return torch.full((rows, cols), {"zero": 0, "plus": 1, "minus": -1}[fill], dtype=torch.int8)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (rows, cols), generator=g, dtype=torch.int8)


# --- round trips --------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(sorted(FORMATS)), rows=st.integers(1, 37), cols=st.integers(1, 700),
       fill=st.sampled_from(["random", "random", "random", "zero", "plus", "minus"]),
       align=st.sampled_from(ALIGNS), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_identity_any_shape(fmt, rows, cols, fill, align, seed):
    f = get_format(fmt)
    trits = random_trits(rows, cols, seed, fill)
    packed = f.pack(trits, align)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, f.row_bytes(cols, align))
    assert torch.equal(f.unpack(packed, cols, align), trits)
    validate_packed(packed, fmt, cols, align)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("cols", [1, 2, 3, 6, 7, 127, 129, 255, 257, 383, 641, 1001])
def test_sizes_not_divisible_by_4_5_128_256(fmt, cols):
    f = get_format(fmt)
    trits = random_trits(5, cols, cols)
    for align in ALIGNS:
        assert torch.equal(f.unpack(f.pack(trits, align), cols, align), trits)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_million_random_trits(fmt):
    f = get_format(fmt)
    trits = random_trits(1009, 1013, 7)  # 1,022,117 trits; neither dimension divisible by 4 or 5
    packed = f.pack(trits)
    assert torch.equal(f.unpack(packed, 1013), trits)
    stored = to_storage(packed, fmt, 1013)
    assert stored.shape == (1009, f.row_bytes(1013, STORAGE_ALIGN_BYTES))
    assert torch.equal(f.unpack(stored, 1013, STORAGE_ALIGN_BYTES), trits)
    assert torch.equal(from_storage(stored, fmt, 1013), packed)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("fill", ["zero", "plus", "minus"])
def test_constant_matrices(fmt, fill):
    f = get_format(fmt)
    trits = random_trits(9, 333, 0, fill)
    assert torch.equal(f.unpack(f.pack(trits), 333), trits)


def test_relayout_is_identity_when_rows_already_aligned():
    trits = random_trits(4, 256, 1)  # TQ2: 64-byte rows either way
    packed = get_format("tq2").pack(trits)
    assert relayout(packed, "tq2", 256, ROW_ALIGN_BYTES, STORAGE_ALIGN_BYTES) is packed


# --- byte layout against a plain reference -------------------------------------------------------

def reference_pack(trits: torch.Tensor, trits_per_byte: int, align: int) -> list[list[int]]:
    """Byte j of a row holds columns j, j+Q, ..., j+(G-1)Q (padding trit 0), built one byte at a time."""
    rows, cols = trits.shape
    q = row_bytes(cols, trits_per_byte, align)
    out = []
    for r in range(rows):
        row = []
        for j in range(q):
            digits = [int(trits[r, i * q + j]) + 1 if i * q + j < cols else 1 for i in range(trits_per_byte)]
            if trits_per_byte == 4:  # TQ2: plane i in bits 2i..2i+1
                row.append(sum(d << (2 * i) for i, d in enumerate(digits)))
            else:  # TQ1: digits most significant first, byte = ceil(v * 256 / 243)
                v = sum(d * 3 ** (4 - i) for i, d in enumerate(digits))
                row.append(-(-v * 256 // 243))
        out.append(row)
    return out


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("cols", [1, 13, 97, 170])
def test_bytes_match_the_reference_layout(fmt, align, cols):
    f = get_format(fmt)
    trits = random_trits(3, cols, cols + align)
    assert f.pack(trits, align).tolist() == reference_pack(trits, f.trits_per_byte, align)


def test_rows_are_16_byte_aligned_in_kernel_layout():
    for fmt, cols in itertools.product(FORMATS, [1, 100, 3072, 9216, 1001]):
        assert get_format(fmt).row_bytes(cols) % 16 == 0


# --- TQ1: the division-free decode recovers all 243 values --------------------------------------------

def test_tq1_decode_is_exact_for_all_243_values():
    """Exhaustive proof: every base-3 value v of five digits is stored as q = ceil(256 v / 243) <= 255, the
    243 bytes are distinct, and ((q * 3^i) mod 256) * 3 >> 8 gives digit i (most significant first)."""
    seen = set()
    for digits in itertools.product(range(3), repeat=5):
        v = sum(d * 3 ** (4 - i) for i, d in enumerate(digits))
        q = -(-v * 256 // 243)
        assert 0 <= q <= 255
        seen.add(q)
        assert [((q * 3 ** i) % 256) * 3 >> 8 for i in range(5)] == list(digits)
        assert [int(d) for d in tq1_digits(torch.tensor([q], dtype=torch.uint8))] == list(digits)
    assert len(seen) == 243


def test_tq1_pack_all_243_digit_patterns_one_byte_each():
    combos = torch.tensor(list(itertools.product((-1, 0, 1), repeat=5)), dtype=torch.int8)  # [243, 5]
    packed = pack_tq1(combos, align=STORAGE_ALIGN_BYTES)  # Q = 1: the five trits share byte 0
    assert packed.shape == (243, 1) and len(set(packed.flatten().tolist())) == 243
    assert torch.equal(unpack_tq1(packed, 5, align=STORAGE_ALIGN_BYTES), combos)


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_non_ternary_input_is_rejected(fmt):
    bad = torch.tensor([[0, 2, -1]], dtype=torch.int8)
    with pytest.raises(FormatError, match="not ternary"):
        get_format(fmt).pack(bad)
    with pytest.raises(FormatError, match="integer"):
        get_format(fmt).pack(torch.zeros(2, 3))


def test_corrupt_data_is_rejected():
    packed = get_format("tq2").pack(random_trits(3, 40, 0))
    packed[1, 2] = 0b11_01_01_01  # code 3 in plane 3
    with pytest.raises(FormatError, match="invalid 2-bit code"):
        validate_packed(packed, "tq2", 40)
    tq1 = get_format("tq1").pack(random_trits(3, 40, 0), STORAGE_ALIGN_BYTES)
    canonical = {-(-v * 256 // 243) for v in range(243)}
    noncanonical = next(b for b in range(256) if b not in canonical)
    tq1[0, 0] = noncanonical
    with pytest.raises(FormatError, match="no TQ1 encoder produces"):
        from_storage(tq1, "tq1", 40)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_nonzero_padding_and_wrong_row_length_are_rejected(fmt):
    f = get_format(fmt)
    full = f.trits_per_byte * f.row_bytes(30)
    trits = random_trits(2, full, 3)
    trits[:, 30:] = 1
    with pytest.raises(FormatError, match="padding"):
        validate_packed(f.pack(trits), fmt, 30)
    with pytest.raises(FormatError, match="rows hold"):
        f.unpack(f.pack(random_trits(2, 30, 0)), 300)


def test_unknown_format_and_version():
    with pytest.raises(FormatError, match="unknown ternary format"):
        get_format("tq3")
    assert check_format_version(1) == 1
    for bad in (0, 2, "1", True, None):
        with pytest.raises(FormatError, match="version"):
            check_format_version(bad)


# --- bits per weight achieved -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,limit", [("tq2", 2.01), ("tq1", 1.61)])
def test_bits_per_weight_on_the_3_9b_shapes(fmt, limit):
    """Stored (checkpoint) rows plus one fp32 scale per model-parallel shard, over all linear matrices."""
    config = get_config("3.9B")
    f = get_format(fmt)
    bits = weights = 0
    for _, out_features, in_features in block_linear_shapes(config):
        bits += 8 * out_features * f.row_bytes(in_features, STORAGE_ALIGN_BYTES) + 32 * config.model_parallel_size
        weights += out_features * in_features
    achieved = bits / weights
    assert achieved <= limit
    assert achieved >= 8 / f.trits_per_byte  # never below the format's nominal rate
