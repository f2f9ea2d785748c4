"""Launching the Triton kernels: validation, configs, split-k sizing, workspace, autotune cache.

A config is a tensor-core launch of ``tq_matmul_kernel`` (tile sizes, split-k, warps, stages), the same
kernel body as a persistent stream-K launch (``sk``, ``tq_matmul_sk_kernel``), or ``dequant`` (decode the whole
weight to a dense matrix with ``tq_dequant_kernel`` on every call, then cuBLAS; nothing is cached). Configs
are chosen per (format, n, k, m bucket, activation dtype, scale mode, GPU name): from the tuned table shipped
beside this file (``tuned_configs.json``), then from the user cache (``$SPECTRA_CACHE`` or
``~/.cache/spectra/kernel_configs.json``) written by :func:`tune`, else from a heuristic.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import DeviceError, FormatError
from ..formats import ROW_ALIGN_BYTES, get_format
from ..io import write_text_atomic
from ..ternary import shard_bounds
from . import gluon_launch
from .launch_support import WORKSPACE, scale_columns, scale_mode
from .ptx import decode_asm

# The kernels tell Triton that byte offsets of K-step boundaries are multiples of 16 (16-byte cp.async vectors);
# that holds because packed rows are padded to ROW_ALIGN_BYTES.
if ROW_ALIGN_BYTES % 16:
    raise ImportError(f"spectra.formats.ROW_ALIGN_BYTES = {ROW_ALIGN_BYTES}: the kernels need a multiple of 16")

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SHIPPED = Path(__file__).with_name("tuned_configs.json")
_lock = threading.Lock()


@dataclass(frozen=True)
class KernelConfig:
    # "tc": tensor-core kernel on packed weights, one program per output tile (times split-k);
    # "sk": the same product as a persistent stream-K launch (the GEMM regime, large m);
    # "dequant": decode the whole weight, then cuBLAS; "gluon": the Hopper Gluon kernel (m <= 16; block_m and
    # split only, see gluon_launch).
    kind: str = "tc"
    block_m: int = 16
    block_n: int = 64
    block_j: int = 128        # packed bytes per row per K step (block_j * G weights)
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3
    programs: int = 0         # "sk": persistent programs (0 = one per SM)
    wait_late: bool = False   # "gluon": decode the next K step while the tensor cores run this one

    @staticmethod
    def from_dict(d: dict) -> KernelConfig:
        return KernelConfig(**d)


def m_bucket(m: int) -> int:
    """Smallest bucket >= m (the largest bucket for anything bigger)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1] * (1 + (m - 1) // M_BUCKETS[-1])


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def config_key(fmt: str, n: int, k: int, m: int, dtype: torch.dtype, scale_mode: int, gpu: str) -> str:
    return f"{gpu}|{fmt}|{n}x{k}|m{m_bucket(m)}|{str(dtype).replace('torch.', '')}|s{scale_mode}"


def user_cache_path() -> Path:
    root = os.environ.get("SPECTRA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spectra")
    return Path(root) / "kernel_configs.json"


_table: dict[str, dict] | None = None


def _load_table() -> dict[str, dict]:
    global _table
    if _table is None:
        table: dict[str, dict] = {}
        for path in (_SHIPPED, user_cache_path()):
            try:
                table.update(json.loads(path.read_text()))
            except (OSError, ValueError):
                pass  # no cache yet, or an unreadable one: fall back to the heuristic
        _table = table
    return _table


def save_configs(entries: dict[str, KernelConfig], path: Path | None = None) -> Path:
    """Merge tuned entries into the user cache (atomic write)."""
    path = path or user_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        table = {}
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            pass
        table.update({key: asdict(cfg) for key, cfg in entries.items()})
        write_text_atomic(path, json.dumps(table, indent=1, sort_keys=True))
        _load_table().update({key: asdict(cfg) for key, cfg in entries.items()})
    return path


def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


SMEM_LIMIT = 200 * 1024  # bytes of shared memory a config may plan for (H100: 227 KB per block)


def smem_bytes(cfg: KernelConfig, fmt: str) -> int:
    """Shared memory of the pipelined tensor-core kernel, an upper bound: byte tile + G activation tiles per
    stage, plus one 16-bit output tile (Triton's epilogue and operand layouts take up to that much more; checked
    against compiled kernels in tests/test_kernels.py)."""
    g = get_format(fmt).trits_per_byte
    stage = cfg.block_n * cfg.block_j + g * cfg.block_j * cfg.block_m * 2
    return cfg.num_stages * stage + cfg.block_m * cfg.block_n * 2


def heuristic_config(n: int, k: int, m: int, fmt: str, sms: int) -> KernelConfig:
    """A sane default: the tensor-core kernel, split-k until the grid covers the GPU a few times over."""
    g = get_format(fmt).trits_per_byte
    q = get_format(fmt).row_bytes(k)
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    bn = 64
    bj = 128 if q >= 512 else 64 if q >= 128 else 32
    tiles = -(-n // bn) * -(-m // bm)
    blocks = -(-q // bj)
    split = 1
    # Aim for ~4 programs per SM; keep at least 4 K steps per program so the pipeline has work.
    while tiles * split < 4 * sms and blocks // (split * 2) >= 4:
        split *= 2
    del g
    if bm >= 64:
        bj = min(bj, 64 if bm == 64 else 32)
    return KernelConfig("tc", bm, bn, bj, split, 4, 4 if bm <= 32 else 3)


def candidate_configs(n: int, k: int, m: int, fmt: str, sms: int) -> list[KernelConfig]:
    """What :func:`tune` tries: the heuristic and neighbours in split, tile width and depth, plus dequant."""
    base = heuristic_config(n, k, m, fmt, sms)
    q = get_format(fmt).row_bytes(k)
    out = {base}
    if m <= 16:
        # Decode-bound GEMV regime: depth and occupancy matter (each wgmma waits for its register operand).
        depths = [(32, 4), (64, 2), (64, 3), (64, 4), (64, 5), (128, 2), (128, 3), (128, 4)]
    else:
        depths = [(64, 3), (128, 3)]
    for bj, stages in depths:
        if bj <= max(32, q):
            for split in {max(1, base.split // 2), base.split, base.split * 2}:
                if -(-q // bj) >= split:
                    out.add(KernelConfig("tc", base.block_m, base.block_n, bj, split, 4, stages))
    if m > 16:
        for bm in (64, 128):
            if bm <= max(64, m_bucket(m)):
                for bj in (32, 64):
                    out.add(KernelConfig("tc", bm, 64, bj, 1, 4, 3))
                    out.add(KernelConfig("tc", bm, 128, bj, 1, 8, 3))
    out |= set(large_m_configs(m))
    out = {c for c in out if smem_bytes(c, fmt) <= SMEM_LIMIT}
    out.add(KernelConfig("dequant"))
    return sorted(out, key=lambda c: (c.kind, c.block_m, c.block_j, c.split))


def large_m_configs(m: int) -> list[KernelConfig]:
    """Persistent stream-K candidates for the GEMM regime (m > 32): the same tiles as the tensor-core kernel,
    but every program gets the same number of K steps, so a tile count that is not a multiple of the SMs
    leaves no partial last wave. Measured on an H200 (2026-11-23) it wins where the one-program-per-tile grid
    is unbalanced (e.g. 70B shapes, TQ1, m = 128: 569 -> 504 us per layer); the tuner decides per shape."""
    b = m_bucket(m)
    if b < 64:
        return []
    bm = 64 if b == 64 else 128
    return [KernelConfig("sk", bm, 128, 32, 1, 8, 3)]


# Prefill-sized m, past the tuned buckets: above this m, decoding the weight once per call and running cuBLAS
# beats the packed kernel (H100, 2026-11-23, both layer-shape sets, benchmarks/results/
# h100_prefill_dequant_crossover.txt: TQ2 70B m = 1024 3048 vs 3110 us (a tie), m = 2048 5533 vs 6230; TQ1 70B
# m = 512 1919 vs 2034, m = 2048 5671 vs 7793). The decode is amortised over m rows; the kernel's tensor-core
# loop is not. Compared on the m bucket (multiples of 256 here), so every m of a bucket gets the same choice.
DEQUANT_ABOVE_M = {"tq2": 1024, "tq1": 512}


# Tuned entries for the Hopper Gluon kernel carry this suffix on their key, beside the portable kernel's entry
# for the same shape (which a Triton without Gluon, or a failed Gluon compile, still uses).
GLUON_KEY_SUFFIX = "|gluon"


def gluon_candidates(m: int) -> list[KernelConfig]:
    """Gluon kernel configs the tuner tries (m <= 16): the MMA width covering m, split-k factors."""
    bm = 8 if m <= 8 else 16
    return [KernelConfig("gluon", bm, 64, bj, split, wait_late=late) for late in (False, True) for bj in (64, 128)
            for split in (1, 2, 3, 4, 6, 8, 12, 16)]


def lookup_config(fmt: str, n: int, k: int, m: int, dtype: torch.dtype, scale_mode: int,
                  device: torch.device, gluon: bool = True) -> KernelConfig:
    """The config a launch uses: a tuned Gluon entry (if `gluon` and the kernel can run here), else the tuned
    portable entry, else the nearest tuned m bucket's, else the heuristic."""
    key = config_key(fmt, n, k, m, dtype, scale_mode, gpu_name(device))
    if gluon and m <= 16 and device.type == "cuda":
        entry = (_load_table().get(key + GLUON_KEY_SUFFIX)
                 or _load_table().get(config_key(fmt, n, k, m, dtype, 0, gpu_name(device)) + GLUON_KEY_SUFFIX))
        if entry is not None:
            if gluon_launch.usable(device, m, dtype):
                return KernelConfig.from_dict(entry)
    entry = _load_table().get(key)
    if entry is None and scale_mode:
        # Tuned tables hold the single-scale entry; per-shard scales cost the same bandwidth.
        entry = _load_table().get(config_key(fmt, n, k, m, dtype, 0, gpu_name(device)))
    if entry is None and m_bucket(m) > DEQUANT_ABOVE_M.get(fmt, 1 << 62):
        return KernelConfig("dequant")
    if entry is None:
        # An untuned bucket borrows the nearest tuned one that uses the same tile height.
        same_tile = [b for b in M_BUCKETS if heuristic_config(n, k, b, fmt, 1).block_m
                     == heuristic_config(n, k, m, fmt, 1).block_m]
        for b in sorted(same_tile, key=lambda b: abs(b - m_bucket(m))):
            entry = _load_table().get(config_key(fmt, n, k, b, dtype, 0, gpu_name(device)))
            if entry is not None:
                break
    if entry is not None:
        return KernelConfig.from_dict(entry)
    return heuristic_config(n, k, m, fmt, num_sms(device))


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
        ws, cnt = WORKSPACE.get(x2.device, split * m * n, grid[0] * grid[1])
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
    """`cfg`, or where it names the Gluon kernel and that cannot run here, the portable kernel's heuristic."""
    if cfg.kind != "gluon":
        return cfg
    if device.type == "cuda" and gluon_launch.usable(device, m, torch.float16):
        return cfg
    return heuristic_config(n, k, m, fmt, num_sms(device) if device.type == "cuda" else 4)


def run_config(x2: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
               shard_axis: int, cfg: KernelConfig, use_asm: bool = True) -> torch.Tensor:
    if cfg.kind == "gluon":
        if gluon_launch.usable(x2.device, x2.shape[0], x2.dtype):
            return gluon_launch.launch(x2, packed, fmt, in_features, scales, shard_axis, cfg.block_m, cfg.split,
                                       block_j=cfg.block_j, wait_late=cfg.wait_late)
        cfg = portable_config(cfg, fmt, packed.shape[0], in_features, x2.shape[0], x2.device)
    if cfg.kind == "dequant":
        w = dequantize(packed, fmt, in_features, scales, shard_axis, x2.dtype)
        return torch.matmul(x2, w.t())
    if cfg.kind == "sk":
        return launch_sk(x2, packed, fmt, in_features, scales, shard_axis, cfg, use_asm=use_asm)
    return launch_tc(x2, packed, fmt, in_features, scales, shard_axis, cfg, use_asm=use_asm)
