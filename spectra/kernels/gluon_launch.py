"""Host side of the Hopper Gluon kernels (``tq_gluon``): when they may run, their launch arguments, and the
fallback to the portable ``triton.language`` kernel where they cannot compile.

A config of kind ``"gluon"`` runs ``tq_gluon.tq_gemv_gluon_kernel``: ``block_m`` is the MMA width (8 or 16,
covering m), ``block_j`` the packed bytes per row and K step (64 or 128: 16 or 32 bytes per thread and row),
``split`` the split-k factor, clamped so that a program's activations fit
:data:`SMEM_BUDGET` bytes of shared memory. A config of kind ``"stream"`` runs
``tq_gluon.tq_stream_gluon_kernel`` (m <= 8, K a multiple of 16): ``num_warps`` warps of 16 weight rows each
(``block_n`` = 16 x warps), ``split`` the split-k factor. The kernels need an sm_90 GPU and a Triton with
Gluon; where either is missing, or a kernel fails to compile once, :func:`usable` says no, one warning line says
why, and the dispatcher runs the portable kernel instead.
"""

from __future__ import annotations

import os

import torch

from ..formats import get_format
from .launch_support import (
    WORKSPACE,
    FastPathSwitch,
    fused_args,
    pdl_enabled,
    scale_columns,
    scale_mode,
    split_k_slots,
)
from .ptx import word_decode_asm

BN = 64                   # weight rows per program (one warpgroup)
SMEM_BUDGET = 64 * 1024   # bytes of activations one program may hold (3 programs per SM at the largest)
MAX_M = 16
KINDS = ("gluon", "stream")  # config kinds that run a Gluon kernel
STREAM_MAX_M = 8          # the streaming kernel's mma.sync tile has 8 activation rows
STREAM_BJ = 64            # its packed bytes per row and K step (tq_gluon.STREAM_BJ; this module must import without
                          # Gluon, so the value is repeated here and a test checks that the two agree)
FALLBACK = FastPathSwitch("the Hopper Gluon kernel", "the portable Triton kernel")
# tests/test_gluon_kernel.py passed on an H100 (2026-12-07: the wgmma kernel after its late-wait loop was removed;
# the streaming kernel, and the wgmma kernel again with the shared epilogue, in a later session), so the tuner
# offers Gluon configs; not yet run on an H200. Dispatch uses the kernels only through tuned entries (H100: see
# docs/performance.md, "H100, 2026-12-07 (sixth session)").
VERIFIED_ON_GPU = True


def tuning_enabled() -> bool:
    """Whether ``tuning.tune`` tries Gluon configs (see VERIFIED_ON_GPU)."""
    return VERIFIED_ON_GPU or os.environ.get("SPECTRA_TUNE_GLUON") == "1"


def available() -> bool:
    """Triton has Gluon and the Gluon kernel module imports (it failed no earlier compile); SPECTRA_GLUON=0
    turns the kernel off (the portable kernel everywhere, e.g. to compare the two)."""
    if FALLBACK.broken is not None or os.environ.get("SPECTRA_GLUON") == "0":
        return False
    try:
        from . import tq_gluon  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an old Triton or a changed Gluon API: portable kernel instead
        disable(f"import failed: {type(exc).__name__}: {exc}")
        return False
    return True


def usable(device: torch.device, m: int, dtype: torch.dtype) -> bool:
    """Whether a launch of this m and dtype on `device` may take the Gluon kernel."""
    if m > MAX_M or dtype not in (torch.float16, torch.bfloat16) or device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    return available()


def disable(reason: str) -> None:
    """Stop using the Gluon kernel in this process, with one warning line (the first reason only)."""
    FALLBACK.disable(reason)


def steps_and_split(q: int, split: int, block_m: int, planes: int, block_j: int = 64) -> tuple[int, int]:
    """(K steps per split, split) for q bytes per row: at least the asked split, and enough that one split's
    activations (steps * planes slots of block_m x block_j values, 2 bytes each) fit SMEM_BUDGET."""
    blocks = -(-q // block_j)
    max_steps = max(1, SMEM_BUDGET // (planes * block_m * block_j * 2))
    split = max(1, min(split, blocks), -(-blocks // max_steps))
    steps = -(-blocks // split)
    return steps, -(-q // (steps * block_j))


def launch_args(x2: torch.Tensor, packed: torch.Tensor, fmt: str, scales: torch.Tensor, scale_mode: int,
                block_m: int, split: int, y: torch.Tensor, block_j: int = 64,
                ws: torch.Tensor | None = None,
                cnt: torch.Tensor | None = None) -> tuple[tuple[int, int, int], dict, dict]:
    """(grid, named arguments, launch options) of one launch on activations x2 [m, k] (column-shard scales
    already applied). ws / cnt: the split-k workspace (taken from WORKSPACE if not given)."""

    m, k = x2.shape
    n, q = packed.shape
    g = get_format(fmt).trits_per_byte
    steps, split = steps_and_split(q, split, block_m, g, block_j)
    grid = (-(-n // BN), split, 1)
    if ws is None:  # split-k slots per program row (tq_gluon._finish)
        ws, cnt = WORKSPACE.get(x2.device, split_k_slots(split, m, grid[0], BN), grid[0])
    named = dict(x_ptr=x2, w_ptr=packed, s_ptr=scales, y_ptr=y, ws_ptr=ws, cnt_ptr=cnt, M=m, N=n, K=k, Q=q,
                 stride_xm=x2.stride(0), stride_ym=y.stride(0), P=scales.numel(), J_PER_SPLIT=steps * block_j,
                 G=g, SCALE_MODE=scale_mode, BM=block_m, SLOTS=steps * g, SPLIT_K=split > 1,
                 ASM=word_decode_asm(fmt, "fp16" if x2.dtype == torch.float16 else "bf16"), BJ=block_j)
    return grid, named, dict(num_warps=4)


def launch(x2: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
           shard_axis: int, block_m: int, split: int, out: torch.Tensor | None = None,
           block_j: int = 64) -> torch.Tensor:
    """The Gluon kernel on a 2-D, row-contiguous x2 [m, k] with m <= block_m; returns y [m, n] (tests,
    benchmarks and the tuner; ternary_matmul goes through a cached plan)."""
    from .tq_gluon import tq_gemv_gluon_kernel  # needs triton's Gluon, which may be missing

    if x2.shape[0] > block_m:
        raise ValueError(f"the Gluon kernel takes m <= block_m = {block_m}, got m = {x2.shape[0]}")
    return _run(tq_gemv_gluon_kernel, x2, packed, in_features, scales, shard_axis, out,
                lambda x, mode, y: launch_args(x, packed, fmt, scales, mode, block_m, split, y, block_j))


def _run(kernel, x2: torch.Tensor, packed: torch.Tensor, in_features: int, scales: torch.Tensor, shard_axis: int,
         out: torch.Tensor | None, args) -> torch.Tensor:
    """One direct launch of a Gluon kernel: column-shard scales applied to x2 first, y allocated unless given,
    grid and arguments from args(x2, scale mode, y)."""
    mode = scale_mode(scales, shard_axis)
    if mode == 2:
        x2 = scale_columns(x2, scales, in_features)
    y = out if out is not None else torch.empty((x2.shape[0], packed.shape[0]), dtype=x2.dtype, device=x2.device)
    grid, named, options = args(x2, mode, y)
    kernel[grid](*[named[a] for a in kernel.arg_names], **options)
    return y


def takes(kind: str, m: int, k: int) -> bool:
    """Whether a Gluon kernel of this config kind computes a product of m rows and k input features (its shape
    limits; :func:`usable` says whether it can run on the device at all)."""
    if kind == "stream":
        return m <= STREAM_MAX_M and k % 16 == 0
    return m <= MAX_M


def runs(kind: str, device: torch.device, m: int, k: int, dtype: torch.dtype) -> bool:
    """Whether a config of this Gluon kind runs a product of m rows and k input features on `device`: the
    kernel takes the shape (:func:`takes`) and can run here (:func:`usable`)."""
    return takes(kind, m, k) and usable(device, m, dtype)


def stream_launch_args(x2: torch.Tensor, packed: torch.Tensor, fmt: str, scales: torch.Tensor, scale_mode: int,
                       warps: int, split: int, y: torch.Tensor, ws: torch.Tensor | None = None,
                       cnt: torch.Tensor | None = None, fusion=None) -> tuple[tuple[int, int, int], dict, dict]:
    """(grid, named arguments, launch options) of one streaming-kernel launch on x2 [m, k] (column-shard scales
    already applied); `split` is rounded so that every split has whole 64-byte steps and none is empty.
    `fusion`: the fused epilogue (a plans.Fusion; its row tensors are contiguous and passed by the caller)."""
    m, k = x2.shape
    n, q = packed.shape
    blocks = -(-q // STREAM_BJ)
    steps = -(-blocks // max(1, min(split, blocks)))
    split = -(-blocks // steps)
    rows = 16 * warps
    swiglu = bool(fusion and fusion.swiglu)
    grid = (-(-(n // 2) // (rows // 2)) if swiglu else -(-n // rows), split, 1)
    if ws is None:
        ws, cnt = WORKSPACE.get(x2.device, split_k_slots(split, m, grid[0], rows), grid[0])
    pdl = pdl_enabled(x2.device)
    named = dict(x_ptr=x2, w_ptr=packed, s_ptr=scales, y_ptr=y, ws_ptr=ws, cnt_ptr=cnt, M=m, N=n, K=k, Q=q,
                 stride_xm=x2.stride(0), stride_ym=y.stride(0), P=scales.numel(), J_PER_SPLIT=steps * STREAM_BJ,
                 G=get_format(fmt).trits_per_byte, SCALE_MODE=scale_mode, SPLIT_K=split > 1,
                 ASM=word_decode_asm(fmt, "fp16" if x2.dtype == torch.float16 else "bf16"), W=warps, PDL=pdl,
                 xr_ptr=None, res_ptr=None, g_ptr=None, y2_ptr=None)
    # BK: one [8, BK] step of the norm's squares spans the warps' 4 values x 32 lanes each, whatever k
    named.update(fused_args(fusion, n, k, 128 * warps), BK=128 * warps)
    return grid, named, dict(num_warps=warps, **(dict(launch_pdl=True) if pdl else {}))


def launch_stream(x2: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
                  shard_axis: int, warps: int, split: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The streaming Gluon kernel on a 2-D, row-contiguous x2 [m, k] (m <= 8, k a multiple of 16); returns
    y [m, n] (tests, benchmarks and the tuner; ternary_matmul goes through a cached plan)."""
    from .tq_gluon import tq_stream_gluon_kernel  # needs triton's Gluon, which may be missing

    if not takes("stream", x2.shape[0], in_features):
        raise ValueError(f"the streaming Gluon kernel takes m <= {STREAM_MAX_M} and in_features a multiple of 16, "
                         f"got m = {x2.shape[0]}, in_features = {in_features}")
    return _run(tq_stream_gluon_kernel, x2, packed, in_features, scales, shard_axis, out,
                lambda x, mode, y: stream_launch_args(x, packed, fmt, scales, mode, warps, split, y))
