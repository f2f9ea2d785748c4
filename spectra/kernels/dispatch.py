"""Launching the Triton kernels: input validation, the compile-time arguments and grids of the tensor-core
and stream-K launches, dequantize-then-cuBLAS, and running a config.

What to launch is decided in :mod:`spectra.kernels.configs` (:func:`~spectra.kernels.configs.lookup_config`);
this module runs a :class:`~spectra.kernels.configs.KernelConfig` (:func:`run_config`). Cached per-signature
launches (the path ``ternary_matmul`` takes) live in :mod:`spectra.kernels.plans`, which uses the grids and
arguments defined here.
"""

from __future__ import annotations

import torch

from ..errors import DeviceError, FormatError
from ..formats import ROW_ALIGN_BYTES, get_format
from ..ternary import shard_bounds
from . import gluon_launch, launch_support
from .configs import KernelConfig, heuristic_config, num_sms
from .launch_support import WORKSPACE, fused_args, scale_columns, scale_mode, split_k_slots
from .ptx import decode_asm, widen_x4_asm

# The kernels tell Triton that byte offsets of K-step boundaries are multiples of 16 (16-byte cp.async vectors);
# that holds because packed rows are padded to ROW_ALIGN_BYTES.
if ROW_ALIGN_BYTES % 16:
    raise ImportError(f"spectra.formats.ROW_ALIGN_BYTES = {ROW_ALIGN_BYTES}: the kernels need a multiple of 16")

# How split-k / stream-K programs order their partial-tile stores before the arrival counter (see
# tq_triton._gpu_fence): 1 = per-thread fence.sc.gpu, 2 = per-thread fence.acq_rel.gpu, 3 = CTA barrier only.
# 3 measured on an H100 (2026-11-23, benchmarks/results/h100_fence_modes.txt): correct in the split-k / stream-K
# stress (480 launches, 0 failures) and 1-9% faster per split-k shape than 1 (70B TQ2 m = 1: 136.7 -> 134.2 us
# per layer; 3.9B TQ1 49.9 -> 47.5); 2 is no faster than 1.
FENCE_MODE = 3


def check_inputs(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
                 shard_axis: int) -> None:
    """Shape/dtype checks shared by every path, with messages that say what to fix."""
    spec = get_format(fmt)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise FormatError(f"packed weights must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != spec.row_bytes(in_features):
        raise FormatError(f"{fmt} rows hold {packed.shape[1]} bytes but in_features={in_features} needs "
                          f"{spec.row_bytes(in_features)}")
    if x.shape[-1] != in_features:
        raise FormatError(f"activations have {x.shape[-1]} features, the layer expects {in_features}")
    if shard_axis not in (0, 1):
        raise FormatError(f"shard_axis must be 0 (output rows) or 1 (input columns), got {shard_axis}")
    if scales.dim() > 1 or scales.numel() < 1:
        raise FormatError(f"scales must be a 1-D tensor of P >= 1 per-shard scales, got shape {tuple(scales.shape)}")
    shard_bounds((packed.shape[0], in_features)[shard_axis], scales.numel())  # ConfigError if P is too large
    if x.device != packed.device or scales.device != packed.device:
        raise DeviceError(f"activations ({x.device}), packed weights ({packed.device}) and scales "
                          f"({scales.device}) must be on one device")


def kernel_constexprs(fmt: str, cfg: KernelConfig, dtype: torch.dtype, scale_mode: int,
                      masks: tuple[bool, int, int], use_asm: bool, fence: int) -> dict:
    """The compile-time arguments both tensor-core kernels share (format, scale mode, dtype, tiles, decode asm,
    column masks from :func:`_column_masks`, fence); benchmarks/kernel_resources.py compiles with the same."""
    import triton.language as tl

    use_asm = use_asm and dtype != torch.float32  # the inline-PTX decode exists for fp16 and bf16 only
    mask_j, plane_mask, loop_plane_mask = masks
    return dict(G=get_format(fmt).trits_per_byte, SCALE_MODE=scale_mode,
                DT={torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype],
                BM=cfg.block_m, BN=cfg.block_n, BJ=cfg.block_j, USE_ASM=use_asm,
                ASM=decode_asm(fmt, "fp16" if dtype == torch.float16 else "bf16") if use_asm else "",
                NUM_STAGES=cfg.num_stages, FENCE=fence, MASK_J=mask_j, PLANE_MASK=plane_mask,
                LOOP_PLANE_MASK=loop_plane_mask)


def _launch_setup(x2: torch.Tensor, packed: torch.Tensor, fmt: str, scales: torch.Tensor, shard_axis: int,
                  out: torch.Tensor | None, use_asm: bool, cfg: KernelConfig):
    """What every tensor-core launch needs: the activations (column-shard scales applied), sizes, the output,
    and the launch options both kernels share (:func:`kernel_constexprs`, warps, stages)."""
    mode = scale_mode(scales, shard_axis)
    if mode == 2:
        x2 = scale_columns(x2, scales, x2.shape[1])
    m, k = x2.shape
    n, q = packed.shape
    masks = _column_masks(q, k, get_format(fmt).trits_per_byte, cfg.block_j)
    y = out if out is not None else torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    shared = dict(kernel_constexprs(fmt, cfg, x2.dtype, mode, masks, use_asm, FENCE_MODE if x2.is_cuda else 0),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return x2, m, k, n, q, shared, y


def _column_masks(q: int, k: int, planes: int, block_j: int) -> tuple[bool, int, int]:
    """Which column masks a launch needs: whether some K step runs past the q byte columns; a bitmask of the
    planes whose activation columns i*q .. (i+1)*q - 1 can pass k (rows are padded to an alignment, so that can
    be more than the last plane), for the steps that carry the byte mask (every plane then); and the same
    bitmask for the whole steps of the loop. Unmasked loads carry no per-step predicate arithmetic."""
    mask_j = q % block_j != 0
    loop_mask = sum(1 << i for i in range(planes) if (i + 1) * q > k)
    return mask_j, (2 ** planes - 1 if mask_j else loop_mask), loop_mask


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_k_grid(m: int, n: int, q: int, cfg: KernelConfig) -> tuple[tuple[int, int, int], int]:
    """Grid of the tensor-core launch and the K bytes each split covers (the last split may be shorter):
    the split count is cut to what the byte columns allow, then to the splits that hold any columns."""
    blocks = _cdiv(q, cfg.block_j)
    j_per_split = _cdiv(blocks, max(1, min(cfg.split, blocks))) * cfg.block_j
    return (_cdiv(m, cfg.block_m), _cdiv(n, cfg.block_n), _cdiv(q, j_per_split)), j_per_split


def gemv_grid(m: int, n: int, q: int, cfg: KernelConfig, swiglu: bool = False) -> tuple[tuple[int, int, int], int]:
    """Grid of the CUDA-core GEMV launch (one activation row per program on axis 0) and the int32 words of a
    row each split covers (a multiple of the words per step). With `swiglu` the n rows are [gate; up] halves and
    a program takes block_n / 2 rows of each."""
    words, step = q // 4, cfg.block_j // 4
    blocks = _cdiv(words, step)
    c_per_split = _cdiv(blocks, max(1, min(cfg.split, blocks))) * step
    programs = _cdiv(n // 2, cfg.block_n // 2) if swiglu else _cdiv(n, cfg.block_n)
    return (m, programs, _cdiv(words, c_per_split)), c_per_split


def workspace_slots(grid: tuple[int, int, int], m: int, cfg: KernelConfig) -> int:
    """fp32 split-k slots of a GEMV or tensor-core launch on `grid` (row programs on axis 1, splits on axis 2)."""
    return split_k_slots(grid[2], m, grid[1], cfg.block_n)


def gemv_args(fmt: str, cfg: KernelConfig, m: int, n: int, k: int, q: int, mode: int, fence: int,
              x_vec: bool = True, dtype: torch.dtype | None = torch.float16, pdl: bool = False,
              parts: int = 1, fusion=None) -> dict:
    """Non-tensor arguments of tq_gemv_kernel for a config (the grid comes from :func:`gemv_grid`). x_vec: the
    activations' rows start 8-byte aligned, so four of them load as one int64; dtype: the activations' dtype on
    a GPU (their inline-asm widening), None under the interpreter; pdl: launched with programmatic dependent
    launch (the launch must then pass launch_pdl=True); parts: the number of scales; fusion: the fused epilogue
    (a plans.Fusion; its row tensors are contiguous)."""
    planes = get_format(fmt).trits_per_byte
    swiglu = bool(fusion and fusion.swiglu)
    grid, c_per_split = gemv_grid(m, n, q, cfg, swiglu)
    return dict(M=m, N=n, K=k, Q=q, P=parts, C_PER_SPLIT=c_per_split, SPLIT_K=grid[2] > 1, G=planes,
                SCALE_MODE=mode, BN=cfg.block_n,
                BC=cfg.block_j // 4, MASK_C=(q // 4) % (cfg.block_j // 4) != 0,
                PLANE_MASK=_column_masks(q, k, planes, cfg.block_j)[2], FENCE=fence, NUM_STAGES=cfg.num_stages,
                X_VEC=x_vec, USE_ASM=dtype is not None, PDL=pdl,
                X_ASM=widen_x4_asm("fp16" if dtype == torch.float16 else "bf16") if dtype is not None else "",
                **fused_args(fusion, n, k, 1024))


def gemv_usable(packed: torch.Tensor) -> bool:
    """The GEMV kernel reads packed rows as int32 words: rows must be 4-byte aligned (ROW_ALIGN_BYTES makes
    row lengths so; a tensor's start may not be, e.g. a view at an odd byte offset)."""
    return packed.data_ptr() % 4 == 0 and packed.stride(0) % 4 == 0 and packed.stride(1) == 1


def x_vec_aligned(x2: torch.Tensor, row_stride: int | None = None, fresh: bool = False) -> bool:
    """Rows of the activations the GEMV kernel reads start at 8-byte boundaries (its int64 activation loads):
    16-bit values, a row stride (default x2's) of a multiple of 4 values, and x2's start aligned, unless the
    kernel reads a fresh copy (`fresh`: the allocator aligns it)."""
    stride = x2.stride(0) if row_stride is None else row_stride
    return x2.element_size() == 2 and stride % 4 == 0 and (fresh or x2.data_ptr() % 8 == 0)


def launch_gemv(x2: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
                shard_axis: int, cfg: KernelConfig, out: torch.Tensor | None = None) -> torch.Tensor:
    """CUDA-core GEMV kernel on a 2-D, row-contiguous x2 [m, k] (same inputs and result as :func:`launch_tc`)."""
    from .tq_triton import tq_gemv_kernel  # optional: triton

    mode = scale_mode(scales, shard_axis)
    if mode == 2:
        x2 = scale_columns(x2, scales, x2.shape[1])
    m, k = x2.shape
    n, q = packed.shape
    y = out if out is not None else torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    grid, _ = gemv_grid(m, n, q, cfg)
    ws, cnt = WORKSPACE.get(x2.device, workspace_slots(grid, m, cfg), grid[0] * grid[1])
    pdl = launch_support.pdl_enabled(x2.device)
    named = gemv_args(fmt, cfg, m, n, k, q, mode, FENCE_MODE if x2.is_cuda else 0, x_vec_aligned(x2),
                      x2.dtype if x2.is_cuda else None, pdl, scales.numel())
    tq_gemv_kernel[grid](x2, packed, scales, y, ws, cnt, stride_xm=x2.stride(0), stride_ym=y.stride(0),
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages, **named,
                         **(dict(launch_pdl=True) if pdl else {}))
    return y


def stream_k_grid(m: int, n: int, q: int, cfg: KernelConfig, device: torch.device) -> tuple[int, int, int, int, int]:
    """Programs, output tiles (m, n), K steps per tile and total work units of the persistent stream-K launch."""
    tiles_m, tiles_n, steps = _cdiv(m, cfg.block_m), _cdiv(n, cfg.block_n), _cdiv(q, cfg.block_j)
    total = tiles_m * tiles_n * steps
    programs = cfg.programs or (num_sms(device) if device.type == "cuda" else 4)
    return max(1, min(programs, total)), tiles_m, tiles_n, steps, total


def launch_tc(x2: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
              shard_axis: int, cfg: KernelConfig, out: torch.Tensor | None = None,
              use_asm: bool = True) -> torch.Tensor:
    """Tensor-core kernel on a 2-D, row-contiguous x2 [m, k]; returns y [m, n] in x2's dtype."""
    from .tq_triton import tq_matmul_kernel  # optional: triton

    x2, m, k, n, q, shared, y = _launch_setup(x2, packed, fmt, scales, shard_axis, out, use_asm, cfg)
    grid, j_per_split = split_k_grid(m, n, q, cfg)
    split = grid[2]
    if split > 1:
        ws, cnt = WORKSPACE.get(x2.device, workspace_slots(grid, m, cfg), grid[0] * grid[1])
    else:
        ws, cnt = y, y  # unused
    tq_matmul_kernel[grid](
        x2, packed, scales, y, ws, cnt, m, n, k, q, x2.stride(0), y.stride(0), scales.numel(), j_per_split,
        SPLIT_K=split > 1, **shared)
    return y


def launch_sk(x2: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
              shard_axis: int, cfg: KernelConfig, out: torch.Tensor | None = None,
              use_asm: bool = True) -> torch.Tensor:
    """Persistent stream-K launch of the tensor-core kernel (same inputs and result as :func:`launch_tc`)."""
    from .tq_triton import tq_matmul_sk_kernel  # optional: triton

    x2, m, k, n, q, shared, y = _launch_setup(x2, packed, fmt, scales, shard_axis, out, use_asm, cfg)
    programs, tiles_m, tiles_n, steps, total = stream_k_grid(m, n, q, cfg, x2.device)
    ws, cnt = WORKSPACE.get(x2.device, programs * 2 * cfg.block_m * cfg.block_n, tiles_m * tiles_n)
    tq_matmul_sk_kernel[(programs,)](
        x2, packed, scales, y, ws, cnt, m, n, k, q, x2.stride(0), y.stride(0), scales.numel(),
        tiles_m, steps, total, **shared)
    return y


def dequantize(packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor, shard_axis: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Dense [n, k] weight (trits * scales) in `dtype`, decoded on the GPU."""
    import triton

    from .tq_triton import tq_dequant_kernel  # optional: triton

    n, q = packed.shape
    out = torch.empty((n, in_features), dtype=dtype, device=packed.device)
    bn, bj = 32, 128
    grid = (triton.cdiv(n, bn), triton.cdiv(q, bj))
    tq_dequant_kernel[grid](packed, scales, out, n, in_features, q, scales.numel(),
                            G=get_format(fmt).trits_per_byte, SCALE_MODE=scale_mode(scales, shard_axis),
                            BN=bn, BJ=bj, num_warps=4)
    return out


def portable_config(cfg: KernelConfig, fmt: str, n: int, k: int, m: int, device: torch.device) -> KernelConfig:
    """`cfg`, or where it names a Gluon kernel and that cannot run here, the portable kernel's heuristic."""
    if cfg.kind not in gluon_launch.KINDS:
        return cfg
    if device.type == "cuda" and gluon_launch.runs(cfg.kind, device, m, k, torch.float16):
        return cfg
    return heuristic_config(n, k, m, fmt, num_sms(device) if device.type == "cuda" else 4)


def run_config(x2: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
               shard_axis: int, cfg: KernelConfig, use_asm: bool = True) -> torch.Tensor:
    if cfg.kind in gluon_launch.KINDS:
        if gluon_launch.runs(cfg.kind, x2.device, *x2.shape, x2.dtype):
            if cfg.kind == "stream":
                return gluon_launch.launch_stream(x2, packed, fmt, in_features, scales, shard_axis, cfg.num_warps,
                                                  cfg.split)
            return gluon_launch.launch(x2, packed, fmt, in_features, scales, shard_axis, cfg.block_m, cfg.split,
                                       block_j=cfg.block_j)
        cfg = portable_config(cfg, fmt, packed.shape[0], in_features, x2.shape[0], x2.device)
    if cfg.kind == "dequant":
        w = dequantize(packed, fmt, in_features, scales, shard_axis, x2.dtype)
        return torch.matmul(x2, w.t())
    if cfg.kind == "sk":
        return launch_sk(x2, packed, fmt, in_features, scales, shard_axis, cfg, use_asm=use_asm)
    if cfg.kind == "gemv":
        if gemv_usable(packed):
            return launch_gemv(x2, packed, fmt, in_features, scales, shard_axis, cfg)
        cfg = heuristic_config(packed.shape[0], in_features, x2.shape[0], fmt,
                               num_sms(x2.device) if x2.is_cuda else 4)
    return launch_tc(x2, packed, fmt, in_features, scales, shard_axis, cfg, use_asm=use_asm)
