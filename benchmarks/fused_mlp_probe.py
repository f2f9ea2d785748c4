"""Probe (not the library's path): a decode step's whole packed MLP (gate/up, SwiGLU, down) in one kernel, batch 1.

    python3 benchmarks/fused_mlp_probe.py [--shapes 3.9b,70b] [--formats tq2,tq1] [--bj 8,16,32] [--warps 4,8]
    TRITON_INTERPRET=1 python3 benchmarks/fused_mlp_probe.py --check    # CPU: correctness only

Why: the products are 86% of a 3.9B decode step (1275 us against about 410 us of bytes; H100, eighth session),
and each is a separate 5-11 us kernel, mostly fixed cost (launch, ramp-up, tail, split-k fix-up). Here the MLP
is one kernel and a small reduction:

- TQ2 and TQ1 keep column c of a row at byte c mod Q, plane c div Q (Q bytes per row; G = 4 or 5 planes).
  Program p owns bytes j in [p * BJ, (p + 1) * BJ) of down's rows, i.e. the G * BJ intermediate units
  c = i * Q + j (i < G).
- It computes gate and up for those units (G * BJ rows each of the fused gate/up weight, against x; fp32
  sums on CUDA cores), rounds them to fp16 as the unfused path's outputs are rounded, and takes SwiGLU, as the
  library's swiglu rounds it;
- then multiplies down's [H, BJ] bytes by those values, one byte giving all G planes' products, into an fp32
  partial of the H outputs: no intermediate activation goes through memory and down starts as soon as the
  program's gate/up rows are done.
- A second kernel sums the partials in a fixed order (deterministic, unlike atomics) and applies down's scale.

What it times, side by side in one run (cold weights: distinct copies, several times the L2; CUDA-graph replay;
median of trials): the library's path (fused gate/up product, `pointwise.swiglu`, down product, as a decode
step runs them) and this probe for each block width and warp count, both checked against an fp32 reference
first. Per-tensor scales. TQ1 beside TQ2 asks the Spectra 1.1 question (a 1.6-bit kernel faster than a 2-bit
one) of this design too.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from spectra.formats import get_format
from spectra.kernels.timing import copies_for, l2_size, time_graph

SHAPES = {"3.9b": (3072, 9216), "70b": (8192, 28672)}  # (hidden, intermediate)


@triton.jit
def _trits(b, i: tl.constexpr, G: tl.constexpr):
    """Plane i of TQ2 (G = 4) or TQ1 (G = 5) bytes as fp32 trits."""
    if G == 4:
        return (((b >> (2 * i)) & 3).to(tl.int32) - 1).to(tl.float32)
    p: tl.constexpr = 3 ** i
    return ((((b.to(tl.int32) * p) & 255) * 3 >> 8) - 1).to(tl.float32)


@triton.jit
def _mlp_partial_kernel(x_ptr, gu_ptr, down_ptr, part_ptr, H, INTER, QH, QI, sg, su,
                        G: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """part[p, :H] = down[:, units of p] @ swiglu(gate, up)[units of p] (fp32, before down's scale). Masked
    bytes read 0 whatever trits that decodes to: they always meet a zero (x past H, or h of a unit past INTER)."""
    pid = tl.program_id(0)
    rj = pid * BJ + tl.arange(0, BJ)  # down's byte columns of this program
    j_ok = rj < QI
    # gate/up rows of the program's units, plane-major: unit (i, j) = i * QI + j (PG >= G planes, a power of 2)
    PG: tl.constexpr = 4 if G == 4 else 8
    rp = tl.arange(0, PG)
    units = rp[:, None] * QI + rj[None, :]  # [PG, BJ]
    u_ok = (rp < G)[:, None] & j_ok[None, :] & (units < INTER)
    g = tl.zeros((PG, BJ), tl.float32)
    u = tl.zeros((PG, BJ), tl.float32)
    rk = tl.arange(0, BK)
    g_rows = gu_ptr + units[:, :, None].to(tl.int64) * QH
    u_rows = gu_ptr + (units + INTER)[:, :, None].to(tl.int64) * QH
    for k0 in range(0, QH, BK):
        kb = k0 + rk
        k_ok = kb < QH
        m3 = u_ok[:, :, None] & k_ok[None, None, :]
        bg = tl.load(g_rows + kb[None, None, :], mask=m3, other=0)
        bu = tl.load(u_rows + kb[None, None, :], mask=m3, other=0)
        for i in tl.static_range(G):
            cols = i * QH + kb
            xv = tl.load(x_ptr + cols, mask=k_ok & (cols < H), other=0.0).to(tl.float32)[None, None, :]
            g += tl.sum(_trits(bg, i, G) * xv, axis=2)
            u += tl.sum(_trits(bu, i, G) * xv, axis=2)
    # rounded where the unfused path rounds: the products' fp16 outputs, silu(gate), the SwiGLU product
    g16 = (g * sg).to(tl.float16).to(tl.float32)
    u16 = (u * su).to(tl.float16).to(tl.float32)
    act = (g16 / (1.0 + tl.exp(-g16))).to(tl.float16).to(tl.float32)
    h = tl.where(u_ok, (act * u16).to(tl.float16).to(tl.float32), 0.0)  # [PG, BJ]
    rn0 = tl.arange(0, BN)
    for n0 in range(0, H, BN):
        rn = n0 + rn0
        n_ok = rn < H
        b = tl.load(down_ptr + rn[:, None].to(tl.int64) * QI + rj[None, :], mask=n_ok[:, None] & j_ok[None, :],
                    other=0)  # [BN, BJ]
        acc = tl.zeros((BN,), tl.float32)
        for i in tl.static_range(G):
            h_i = tl.sum(tl.where(rp[:, None] == i, h, 0.0), axis=0)  # plane i's values [BJ]
            acc += tl.sum(_trits(b, i, G) * h_i[None, :], axis=1)
        tl.store(part_ptr + pid.to(tl.int64) * H + rn, acc, mask=n_ok)


@triton.jit
def _sum_partials_kernel(part_ptr, y_ptr, H, PROGRAMS, sd, BN: tl.constexpr, BP: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = rn < H
    acc = tl.zeros((BN,), tl.float32)
    for p0 in range(0, PROGRAMS, BP):
        rp = p0 + tl.arange(0, BP)
        part = tl.load(part_ptr + rp[:, None].to(tl.int64) * H + rn[None, :],
                       mask=(rp < PROGRAMS)[:, None] & n_ok[None, :], other=0.0)
        acc += tl.sum(part, axis=0)
    tl.store(y_ptr + rn, (acc * sd).to(y_ptr.dtype.element_ty), mask=n_ok)


def fused_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, scales: tuple[float, float, float],
              hidden: int, inter: int, fmt: str = "tq2", bj: int = 16, bk: int = 64, bn: int = 64, warps: int = 4,
              part: torch.Tensor | None = None) -> torch.Tensor:
    """down(swiglu(gate(x), up(x))) for one token x [hidden] (fp16), packed weights: gate_up [2 * inter, QH]
    (gate rows, then up rows), down [hidden, QI]; per-tensor scales (gate, up, down)."""
    qh, qi = gate_up.shape[1], down.shape[1]
    programs = triton.cdiv(qi, bj)
    if part is None:
        part = torch.empty(programs, hidden, device=x.device, dtype=torch.float32)
    y = torch.empty(hidden, device=x.device, dtype=x.dtype)
    sg, su, sd = scales
    _mlp_partial_kernel[(programs,)](x, gate_up, down, part, hidden, inter, qh, qi, sg, su,
                                     G=get_format(fmt).trits_per_byte, BJ=bj, BK=bk, BN=bn, num_warps=warps)
    _sum_partials_kernel[(triton.cdiv(hidden, 128),)](part, y, hidden, programs, sd, BN=128, BP=16, num_warps=4)
    return y


def reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, scales: tuple[float, float, float],
              hidden: int, inter: int, fmt: str) -> torch.Tensor:
    """The unfused path's arithmetic in fp32 with its fp16 roundings (products' outputs, silu, SwiGLU)."""
    f = get_format(fmt)
    w = f.unpack(gate_up, hidden).float()
    g = (x.float() @ w[:inter].t() * scales[0]).half()
    u = (x.float() @ w[inter:].t() * scales[1]).half()
    h = (F.silu(g.float()).half().float() * u.float()).half()
    return ((h.float() @ f.unpack(down, inter).float().t()) * scales[2]).half()


def random_weights(hidden: int, inter: int, fmt: str, device, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    f = get_format(fmt)
    gate_up = f.pack(torch.randint(-1, 2, (2 * inter, hidden), dtype=torch.int8, device=device, generator=gen))
    down = f.pack(torch.randint(-1, 2, (hidden, inter), dtype=torch.int8, device=device, generator=gen))
    return gate_up, down


def check(fmts: list[str], bjs: list[int], warps: list[int]) -> list[str]:
    """Failures of the probe against the reference (odd sizes: partial blocks everywhere)."""
    gen = torch.Generator().manual_seed(0)
    failures = []
    for fmt in fmts:
        for hidden, inter in ((96, 200), (72, 136), (130, 64)):
            gate_up, down = random_weights(hidden, inter, fmt, "cpu", gen)
            x = torch.randn(hidden, generator=gen).half()
            scales = (0.05, 0.07, 0.03)
            want = reference(x, gate_up, down, scales, hidden, inter, fmt).float()
            for bj in bjs:
                for wp in warps:
                    got = fused_mlp(x, gate_up, down, scales, hidden, inter, fmt, bj=bj, bk=32, bn=32, warps=wp)
                    err = float((got.float() - want).abs().max())
                    if not err <= 2e-3 * max(1.0, float(want.abs().max())):
                        failures.append(f"{fmt} hidden {hidden} inter {inter} bj {bj} warps {wp}: max err {err:.2e}")
    return failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="3.9b,70b")
    p.add_argument("--formats", default="tq2,tq1")
    p.add_argument("--bj", default="8,16,32", help="down byte columns per program (4x as many SwiGLU units)")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--check", action="store_true", help="correctness only (runs on a CPU under TRITON_INTERPRET=1)")
    args = p.parse_args()
    bjs = [int(v) for v in args.bj.split(",")]
    warps = [int(v) for v in args.warps.split(",")]
    if args.check:
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--check without a GPU needs TRITON_INTERPRET=1")
        failures = check(args.formats.split(","), bjs, warps)
        print("\n".join(failures) or "all variants match the reference")
        raise SystemExit(1 if failures else 0)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name(dev)}; batch 1, fp16, per-tensor scales, cold weights, CUDA graphs of "
          f"{args.reps} calls, median of {args.trials}")
    print("| shapes | format | path | BJ | warps | us per MLP | weight GB/s | vs library |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        for fmt in args.formats.split(","):
            for row in time_shape(name, fmt, bjs, warps, args.reps, args.trials, gen):
                print(row, flush=True)
            torch.cuda.empty_cache()


def time_shape(name: str, fmt: str, bjs: list[int], warps: list[int], reps: int, trials: int,
               gen: torch.Generator) -> list[str]:
    """Table rows for one shape: the library's three launches, then each probe variant."""
    from spectra.kernels import pointwise, ternary_matmul

    dev = gen.device
    hidden, inter = SHAPES[name]
    nbytes = 3 * hidden * get_format(fmt).row_bytes(inter)  # the three matrices' packed bytes (about)
    copies = copies_for(nbytes, l2_size(dev))
    layers = [random_weights(hidden, inter, fmt, dev, gen) for _ in range(copies)]
    x = torch.randn(hidden, device=dev, dtype=torch.float16, generator=gen)
    scales = (0.011, 0.013, 0.017)
    s_gu = torch.tensor([scales[0], scales[1]], device=dev)  # two row shards: gate's scale, up's
    s_d = torch.tensor([scales[2]], device=dev)
    want = reference(x, *layers[0], scales, hidden, inter, fmt).float()
    tol = 2e-3 * max(1.0, float(want.abs().max()))

    def library(i: int) -> torch.Tensor:
        gu = ternary_matmul(x[None], layers[i][0], fmt, hidden, s_gu, 0)
        return ternary_matmul(pointwise.swiglu(gu[:, :inter], gu[:, inter:]), layers[i][1], fmt, inter, s_d, 0)[0]

    err = float((library(0).float() - want).abs().max())
    t_lib = time_graph(library, copies, reps, trials)
    rows = [f"| {name} | {fmt} | library (3 launches) | - | - | {t_lib * 1e6:.1f} | {nbytes / t_lib / 1e9:.0f} | "
            f"1.00x (err {err:.1e}) |"]
    for bj in bjs:
        part = torch.empty(triton.cdiv(layers[0][1].shape[1], bj), hidden, device=dev)
        for wp in warps:
            def probe(i: int, bj: int = bj, wp: int = wp, part: torch.Tensor = part) -> torch.Tensor:
                return fused_mlp(x, *layers[i], scales, hidden, inter, fmt, bj=bj, warps=wp, part=part)

            err = float((probe(0).float() - want).abs().max())
            if not err <= tol:
                rows.append(f"| {name} | {fmt} | fused | {bj} | {wp} | WRONG: max err {err:.2e} | | |")
                continue
            t = time_graph(probe, copies, reps, trials)
            rows.append(f"| {name} | {fmt} | fused | {bj} | {wp} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | "
                        f"{t_lib / t:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
