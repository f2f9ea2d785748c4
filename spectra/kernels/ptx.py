"""Inline PTX that decodes packed trits straight into half2/bfloat162 registers for the tensor cores.

Each snippet is an ``inline_asm_elementwise`` body with ``pack=2``: the input register holds two packed
bytes (tile columns j, j+1 of one row) and output register i holds plane i of both bytes as a 16-bit pair,
which is exactly one A-operand register of a tensor-core fragment. Values are exact: -1, 0 or +1.

Why these tricks (the decode, not the memory, is what limits a naive kernel): an int->float conversion
instruction runs at 1/8 of the FMA rate, so digits are turned into floats by OR-ing them into the mantissa
of a "magic" float whose unit in the last place is 1, and the offset is removed with one packed FMA.

TQ2, plane i (bits 2i..2i+1 of each byte, digit d = t + 1):
    v = 1024 + d * 4^i          (fp16: 0x6400 | (byte & (3 << 2i)); bf16: 128 + ..., magic 0x4300)
    t = v * 4^-i - (1024 * 4^-i + 1) = d - 1        (one fma.rn.{f16,bf16}x2, exact)

TQ1, digit i: d = floor(3 * m / 256) with m = (q * 3^i) mod 256 (formats.py). Two bytes sit in the two
16-bit lanes, so one 32-bit multiply by 4 * 3^i gives 4m in each lane (carries out of the low lane only
touch bit 16, below the bits we keep). OR-ing into fp16 256 (ulp 0.25) with the 0.25 bit set gives
a = 256 + m + 1/4; then fma(a, 3/256, 1021.5) = 1024.5 + 3/1024 + 3m/256 rounds (ulp 1) to 1025 + d:
the 3/1024 keeps ties away and stays below the 1/256 gap between neighbouring values of 3m/256.
A final add of -1026 gives d - 1. For bf16 (8-bit significand) the fp16 1025 + d is re-decoded: its low
two bits are d + 1.
"""

from __future__ import annotations

# fp16 / bf16 bit patterns, both halves of a 32-bit register
_TQ2 = {
    # dtype: (magic, [scale_i], [bias_i]) with scale 4^-i and bias -(magic_value * 4^-i + 1)
    "fp16": (0x6400, [0x3C00, 0x3400, 0x2C00, 0x2400], [0xE401, 0xDC04, 0xD410, 0xCC40]),
    "bf16": (0x4300, [0x3F80, 0x3E80, 0x3D80, 0x3C80], [0xC301, 0xC204, 0xC110, 0xC040]),
}
_FMA = {"fp16": "fma.rn.f16x2", "bf16": "fma.rn.bf16x2"}


def _pair(h: int) -> str:
    return f"0x{h:04X}{h:04X}"


def tq2_decode_asm(dtype: str) -> str:
    """PTX: $4 = two TQ2 bytes (low 16 bits) -> $0..$3 = planes 0..3 as 16-bit pairs of -1/0/+1."""
    magic, scale, bias = _TQ2[dtype]
    lines = ["{", ".reg .b32 lo, s0, s1, s2, s3, c0, c1, c2, c3;",
             # spread byte 0 -> lane 0 (bits 0-7), byte 1 -> lane 1 (bits 16-23), zeros elsewhere
             "prmt.b32 lo, $4, 0, 0x4140;"]
    for i in range(4):
        lines += [f"mov.b32 s{i}, {_pair(scale[i])};", f"mov.b32 c{i}, {_pair(bias[i])};"]
    for i in range(4):
        mask = 0x00030003 << (2 * i)
        lines += [f"lop3.b32 ${i}, lo, 0x{mask:08X}, {_pair(magic)}, 0xEA;",  # (lo & mask) | magic
                  f"{_FMA[dtype]} ${i}, ${i}, s{i}, c{i};"]
    lines.append("}")
    return "\n".join(lines)


def tq1_decode_asm(dtype: str) -> str:
    """PTX: $5 = two TQ1 bytes (low 16 bits) -> $0..$4 = base-3 digits 0..4 (most significant first) - 1."""
    lines = ["{", ".reg .b32 lo, t, k3, kb, kn, b1, bm;",
             "prmt.b32 lo, $5, 0, 0x4140;",
             "mov.b32 k3, 0x22002200;",    # 3/256
             "mov.b32 kb, 0x63FB63FB;",    # 1021.5
             "mov.b32 kn, 0xE402E402;",    # -1026
             "mov.b32 b1, 0x3F803F80;",    # bf16 1.0
             "mov.b32 bm, 0xC302C302;"]    # bf16 -130
    for i in range(5):
        if i == 0:
            lines.append("shl.b32 t, lo, 2;")
        else:
            lines.append(f"mul.lo.u32 t, lo, {4 * 3 ** i};")
        lines += ["lop3.b32 t, t, 0x03FC03FC, 0x5C015C01, 0xEA;",  # fp16 256 + m + 1/4
                  "fma.rn.f16x2 t, t, k3, kb;"]                     # fp16 1025 + d
        if dtype == "fp16":
            lines.append(f"add.rn.f16x2 ${i}, t, kn;")
        else:
            lines += [f"lop3.b32 t, t, 0x00030003, {_pair(0x4300)}, 0xEA;",  # bf16 128 + (d + 1)
                      f"fma.rn.bf16x2 ${i}, t, b1, bm;"]
    lines.append("}")
    return "\n".join(lines)


def tq2_word_decode_asm(dtype: str) -> str:
    """PTX for ``pack=4`` over a broadcast 32-bit word: $8 = four TQ2 bytes b0..b3 ($9..$11 are the same
    word) -> $2i = plane i of (b0, b1), $2i+1 = plane i of (b2, b3), 16-bit pairs of -1/0/+1. One word per
    call, so the bytes arrive packed as loaded (no per-byte repacking)."""
    magic, scale, bias = _TQ2[dtype]
    lines = ["{", ".reg .b32 lo, hi, s, c;",
             "prmt.b32 lo, $8, 0, 0x4140;",   # b0 -> bits 0-7, b1 -> bits 16-23
             "prmt.b32 hi, $8, 0, 0x4342;"]   # b2, b3 likewise
    for i in range(4):
        mask = 0x00030003 << (2 * i)
        lines += [f"mov.b32 s, {_pair(scale[i])};", f"mov.b32 c, {_pair(bias[i])};"]
        for r, src in ((2 * i, "lo"), (2 * i + 1, "hi")):
            lines += [f"lop3.b32 ${r}, {src}, 0x{mask:08X}, {_pair(magic)}, 0xEA;",
                      f"{_FMA[dtype]} ${r}, ${r}, s, c;"]
    lines.append("}")
    return "\n".join(lines)


def tq1_word_decode_asm(dtype: str) -> str:
    """As :func:`tq2_word_decode_asm` for TQ1: $10 = four TQ1 bytes -> $2i, $2i+1 = digit i - 1 of (b0, b1),
    (b2, b3) (the same arithmetic as :func:`tq1_decode_asm`, per half word)."""
    lines = ["{", ".reg .b32 lo, hi, t, k3, kb, kn, b1, bm;",
             "prmt.b32 lo, $10, 0, 0x4140;",
             "prmt.b32 hi, $10, 0, 0x4342;",
             "mov.b32 k3, 0x22002200;", "mov.b32 kb, 0x63FB63FB;", "mov.b32 kn, 0xE402E402;",
             "mov.b32 b1, 0x3F803F80;", "mov.b32 bm, 0xC302C302;"]
    for i in range(5):
        for r, src in ((2 * i, "lo"), (2 * i + 1, "hi")):
            lines.append(f"shl.b32 t, {src}, 2;" if i == 0 else f"mul.lo.u32 t, {src}, {4 * 3 ** i};")
            lines += ["lop3.b32 t, t, 0x03FC03FC, 0x5C015C01, 0xEA;", "fma.rn.f16x2 t, t, k3, kb;"]
            if dtype == "fp16":
                lines.append(f"add.rn.f16x2 ${r}, t, kn;")
            else:
                lines += [f"lop3.b32 t, t, 0x00030003, {_pair(0x4300)}, 0xEA;", f"fma.rn.bf16x2 ${r}, t, b1, bm;"]
    lines.append("}")
    return "\n".join(lines)


def word_decode_asm(fmt: str, dtype: str) -> str:
    if fmt == "tq2":
        return tq2_word_decode_asm(dtype)
    if fmt == "tq1":
        return tq1_word_decode_asm(dtype)
    raise ValueError(fmt)


def widen_x4_asm(dtype: str) -> str:
    """Four 16-bit activations held in one 64-bit register -> four fp32 (the GEMV kernel's activation load).
    Written as asm so that the 64-bit load stays one load: plain shifts of a loaded int64 let LLVM narrow it
    into four 2-byte loads (seen in the sm_90a SASS)."""
    cvt = {"fp16": "cvt.f32.f16", "bf16": "cvt.f32.bf16"}[dtype]
    return ("{ .reg .b16 h0, h1, h2, h3;\n mov.b64 {h0, h1, h2, h3}, $4;\n"
            + "".join(f" {cvt} ${e}, h{e};\n" for e in range(4)) + "}")


def decode_asm(fmt: str, dtype: str) -> str:
    if fmt == "tq2":
        return tq2_decode_asm(dtype)
    if fmt == "tq1":
        return tq1_decode_asm(dtype)
    raise ValueError(fmt)


def decode_constraints(planes: int) -> str:
    return ",".join(["=r"] * planes + ["r"])
