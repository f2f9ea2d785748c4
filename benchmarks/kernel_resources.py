"""Registers, spills and shared memory of a kernel config, compiled for sm_90a without a GPU.

    python benchmarks/kernel_resources.py --format tq2 --block-n 128 --warps 8 --stages 6
    python benchmarks/kernel_resources.py --sass        # + SASS instruction counts of the K loop
    python benchmarks/kernel_resources.py --format tq1 --in-features 8192 --sass   # the masks k = 8192 needs
    python benchmarks/kernel_resources.py --kernel gemv --block-n 16 --block-j 256 --stages 1 --sass
    python benchmarks/kernel_resources.py --kernel stream --warps 4 --split 2 --sass   # the streaming Gluon kernel

Compiles ``tq_matmul_kernel`` ahead of time with the installed Triton (its bundled ptxas and nvdisasm) for
the sizes a real launch specialises on (16-byte aligned rows; the column masks of --in-features, none by
default), and prints what bounds
occupancy: registers per thread (CTAs per SM by registers), shared memory per CTA, spills. This is how the
"compiles at N registers" statements in docs/performance.md were obtained; timings still need a GPU.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from spectra.formats import get_format
from spectra.kernels import tq_triton
from spectra.kernels.configs import KernelConfig
from spectra.kernels.dispatch import FENCE_MODE, _column_masks, gemv_args, kernel_constexprs
from spectra.kernels.launch_support import fused_args
from spectra.kernels.plans import Fusion

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_POINTERS = {"x_ptr": "*{dt}", "w_ptr": "*u8", "s_ptr": "*fp32", "y_ptr": "*{dt}", "ws_ptr": "*fp32",
             "cnt_ptr": "*i32", "xr_ptr": "*{dt}", "res_ptr": "*{dt}", "g_ptr": "*{dt}", "y2_ptr": "*{dt}",
             "eps": "fp32"}
# multiples of 16 in real layer shapes
_ALIGNED = ("N", "K", "Q", "stride_xm", "stride_ym", "J_PER_SPLIT", "C_PER_SPLIT")


def compile_config(fmt: str, cfg: KernelConfig, dtype: str = "fp16", in_features: int | None = None,
                   fusion: Fusion | None = None):
    """The kernel a launch with this config compiles to; with in_features, the column masks that k needs
    (q % block_j != 0 masks the first step of a range, and planes that pass k mask their activations); with
    a fusion, the GEMV kernel's fused epilogue."""
    spec = get_format(fmt)
    if cfg.kind in ("stream", "gluon"):
        from triton.experimental.gluon._runtime import GluonASTSource

        from spectra.kernels import tq_gluon
        from spectra.kernels.gluon_launch import steps_and_split
        from spectra.kernels.ptx import word_decode_asm

        g = spec.trits_per_byte
        constexprs = dict(G=g, SCALE_MODE=0, SPLIT_K=cfg.split > 1, ASM=word_decode_asm(fmt, dtype))
        if cfg.kind == "stream":
            fn = tq_gluon.tq_stream_gluon_kernel
            fused = fusion or Fusion()
            constexprs.update(W=cfg.num_warps, PDL=True, NORM=fused.norm, RESIDUAL=fused.residual, GAIN=fused.gain,
                              SWIGLU=fused.swiglu, BK=128 * cfg.num_warps)
        else:
            fn = tq_gluon.tq_gemv_gluon_kernel
            steps, _ = steps_and_split(spec.row_bytes(in_features or 8192), cfg.split, cfg.block_m, g, cfg.block_j)
            constexprs.update(BM=cfg.block_m, SLOTS=steps * g, BJ=cfg.block_j)
        source = GluonASTSource
    elif cfg.kind == "gemv":
        fn = tq_triton.tq_gemv_kernel
        k = in_features or 8192
        args = gemv_args(fmt, cfg, 1, 4096, k, spec.row_bytes(k), 0, FENCE_MODE, fusion=fusion)
        constexprs = {p.name: args[p.name] for p in fn.params if p.is_constexpr and p.name in args}
    else:
        fn = tq_triton.tq_matmul_kernel
        masks = (False, 0, 0)
        if in_features is not None:
            masks = _column_masks(spec.row_bytes(in_features), in_features, spec.trits_per_byte, cfg.block_j)
        constexprs = kernel_constexprs(fmt, cfg, torch.float16 if dtype == "fp16" else torch.bfloat16, 0, masks,
                                       use_asm=True, fence=FENCE_MODE)
        epilogue = fused_args(fusion, 4096, in_features or 8192, 128)
        constexprs.update({p.name: epilogue[p.name] for p in fn.params if p.is_constexpr and p.name in epilogue})
    if cfg.kind not in ("stream", "gluon"):
        source = ASTSource
        constexprs["SPLIT_K"] = cfg.split > 1
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            signature[name] = _POINTERS[name].format(dt=dtype)
            if name != "eps":
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in _ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(source(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, LOCAL (spill and stack bytes per thread) and SHARED of the kernel, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", out)}


def loop_op_counts(cubin: bytes) -> collections.Counter:
    """SASS opcodes of the longest backward-branch loop (the K loop)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(_BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    labels, code = {}, []
    pending = []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        addr = re.search(r"/\*([0-9a-f]{4,})\*/", line)
        if addr:
            body = line.split("*/", 1)[1].strip().rstrip(";").strip()
            for name in pending:
                labels[name] = len(code)
            pending = []
            code.append(body.split(None, 1)[1] if body.startswith("@") else body)
    best = (0, 0)
    for i, ins in enumerate(code):
        target = re.search(r"BRA\s+`?\(?\.?(L_x_\d+)", ins)
        if target and labels.get(target.group(1), i + 1) <= i:
            start = labels[target.group(1)]
            best = max(best, (i - start + 1, start))
    size, start = best
    return collections.Counter(op.split()[0].split(".")[0] for op in code[start:start + size])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", default="tc", choices=["tc", "gemv", "stream", "gluon"],
                   help="tc: the tensor-core kernel; gemv: the CUDA-core GEMV kernel (block-m is ignored); stream: "
                        "the streaming Gluon kernel (warps and split only); gluon: the wgmma Gluon kernel (block-m 8 "
                        "or 16, block-j 64 or 128, split)")
    p.add_argument("--format", default="tq2", choices=["tq2", "tq1"])
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--block-m", type=int, default=16)
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--block-j", type=int, default=64)
    p.add_argument("--split", type=int, default=1)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--in-features", type=int, default=None,
                   help="compile with the column masks this k needs (default: none, as for 70B TQ2 shapes)")
    p.add_argument("--sass", action="store_true", help="also count the SASS instructions of the K loop")
    p.add_argument("--fusion", default="", help="the GEMV kernel's fused epilogue, e.g. norm+swiglu or "
                                                "residual+gain (plans.Fusion fields joined by +)")
    args = p.parse_args()
    cfg = KernelConfig(args.kernel, args.block_m, args.block_n, args.block_j, args.split, args.warps, args.stages)
    fusion = Fusion(**{f: True for f in args.fusion.split("+")}) if args.fusion else None
    kernel = compile_config(args.format, cfg, args.dtype, args.in_features, fusion)
    usage = resource_usage(kernel.asm["cubin"])
    regs, shared = usage["REG"], kernel.metadata.shared
    threads = 32 * args.warps
    # registers are allocated per warp in units of 256 (8 per thread), 64K per SM; 227 KB of shared memory
    # per SM, of which the driver reserves 1 KB per CTA
    by_regs = 65536 // (-(-regs // 8) * 8 * threads)
    by_smem = (227 * 1024) // (shared + 1024)
    print(f"{args.format} BM {args.block_m} BN {args.block_n} BJ {args.block_j} split {args.split} "
          f"warps {args.warps} stages {args.stages} ({args.dtype}, sm_90a, Triton {triton.__version__}): "
          f"{regs} registers, {usage.get('LOCAL', 0)} B local memory (spills), shared {shared / 1024:.1f} KB; "
          f"CTAs per SM: {by_regs} by registers, {by_smem} by shared memory")
    if args.sass:
        ops = loop_op_counts(kernel.asm["cubin"])
        per_weight = ""
        if args.kernel == "stream":  # one loop step: 64 bytes of 16 rows per warp, 32 G weights per thread
            per_weight = f" ({sum(ops.values()) / (32 * get_format(args.format).trits_per_byte):.2f} per weight)"
        print(f"K loop: {sum(ops.values())} instructions{per_weight}: "
              + ", ".join(f"{k} {v}" for k, v in ops.most_common()))


if __name__ == "__main__":
    main()
