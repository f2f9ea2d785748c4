"""Kernel configs: how one packed matmul is launched, and which launch a shape gets.

A config (:class:`KernelConfig`) is a tensor-core launch of ``tq_matmul_kernel`` (tile sizes, split-k, warps,
stages), the same kernel body as a persistent stream-K launch (``sk``, ``tq_matmul_sk_kernel``), ``dequant``
(decode the whole weight to a dense matrix with ``tq_dequant_kernel`` on every call, then cuBLAS; nothing is
cached), ``gluon`` / ``stream`` (the Hopper Gluon kernels: wgmma, m <= 16; mma.sync streaming, m <= 8), or
``gemv`` (``tq_gemv_kernel`` on the CUDA cores, m <= 2). Configs are keyed by (GPU name, format, n x k, m bucket,
activation dtype, scale mode) (:func:`config_key`; a Gluon entry adds :data:`GLUON_KEY_SUFFIX`) and come from, in
order: the user cache (``$SPECTRA_CACHE`` or ``~/.cache/spectra/kernel_configs.json``, written by
:mod:`spectra.kernels.tuning`), the tuned table shipped beside this file (``tuned_configs.json``), else a
heuristic (:func:`heuristic_config`).
:func:`lookup_config` is that choice; :mod:`spectra.kernels.dispatch` launches what it returns.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

import torch

from ..formats import get_format
from ..io import write_text_atomic
from . import gluon_launch

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SHIPPED = Path(__file__).with_name("tuned_configs.json")
_lock = threading.Lock()


@dataclass(frozen=True)
class KernelConfig:
    # "tc": tensor-core kernel on packed weights, one program per output tile (times split-k);
    # "sk": the same product as a persistent stream-K launch (the GEMM regime, large m);
    # "dequant": decode the whole weight, then cuBLAS; "gluon": the Hopper Gluon wgmma kernel (m <= 16; block_m,
    # block_j and split only), "stream": the Gluon streaming kernel (m <= 8; num_warps and split; see
    # gluon_launch); "gemv": the CUDA-core GEMV kernel (small m; block_n rows per program,
    # block_j packed bytes per row and step, block_m unused).
    kind: str = "tc"
    block_m: int = 16
    block_n: int = 64
    block_j: int = 128        # packed bytes per row per K step (block_j * G weights)
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3
    programs: int = 0         # "sk": persistent programs (0 = one per SM)

    @staticmethod
    def from_dict(d: dict) -> KernelConfig:
        # "wait_late" named a Gluon loop removed as unsafe (tq_gluon); an entry tuned with it runs the safe loop
        return KernelConfig(**{k: v for k, v in d.items() if k != "wait_late"})


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
    out |= set(gemv_candidates(n, k, m, fmt, sms))
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


# GEMV tiles (rows per program, packed bytes per row and step, stages) the tuner tries at m <= GEMV_MAX_M: rows
# per thread amortise the activation loads, and deeper tiles keep more weight bytes in flight per thread.
GEMV_TILES = ((16, 256, 1), (32, 256, 1), (64, 128, 1), (64, 256, 1), (32, 512, 1), (32, 256, 2), (64, 256, 2))
GEMV_MAX_M = 2


def gemv_candidates(n: int, k: int, m: int, fmt: str, sms: int,
                    tiles: tuple[tuple[int, int, int], ...] = GEMV_TILES) -> list[KernelConfig]:
    """CUDA-core GEMV configs (m <= GEMV_MAX_M; one activation row per program): each tile with the split-k
    factors that give between half a wave and a few waves of programs."""
    if m > GEMV_MAX_M:
        return []
    words = get_format(fmt).row_bytes(k) // 4
    out = []
    for bn, bj, stages in tiles:
        fits = [s for s in (1, 2, 3, 4, 6, 8, 12, 16) if s == 1 or words // s >= bj // 4]
        programs = {s: -(-n // bn) * s * m for s in fits}
        chosen = [s for s in fits if sms // 2 <= programs[s] <= 8 * sms]
        # a small matrix: the split that comes nearest to filling the GPU
        out += [KernelConfig("gemv", 1, bn, bj, s, 4, stages)
                for s in chosen or [min(fits, key=lambda s: abs(programs[s] - sms))]]
    return out


_fused: dict[tuple, KernelConfig | None] = {}


def fused_config(fmt: str, n: int, k: int, m: int, dtype: torch.dtype, scale_mode: int,
                 device: torch.device, gluon: bool = True) -> KernelConfig | None:
    """The config of a decode product with a fused epilogue (m <= FUSED_MAX_M; plans.Fusion), or None (no kernel
    with the epilogue fits: the separate kernels run). In order: the tuned entry where its kernel has the
    epilogue (the streaming Gluon kernel if `gluon`, the GEMV kernel, the tensor-core kernel); up to m = 8 the
    m = 1 bucket's streaming entry (its 8-row tile costs the same for m = 1..8); the portable kernel's entry
    where the tuned one is the wgmma Gluon kernel. Memoised per shape; clear_fused_memo forgets (after
    tuning)."""
    key = (fmt, n, k, m, dtype, scale_mode, device, gluon)
    if key not in _fused:
        _fused[key] = _fused_config(fmt, n, k, m, dtype, scale_mode, device, gluon)
    return _fused[key]


def clear_fused_memo() -> None:
    _fused.clear()


FUSED_KINDS = ("gemv", "stream", "tc")  # kernels with the fused epilogue of a decode product
FUSED_MAX_M = 16  # the decode tile of the tensor-core kernel


def _fused_config(fmt: str, n: int, k: int, m: int, dtype: torch.dtype, scale_mode: int, device: torch.device,
                  gluon: bool) -> KernelConfig | None:
    if m > FUSED_MAX_M:
        return None
    cfg = lookup_config(fmt, n, k, m, dtype, scale_mode, device, gluon=gluon)
    if cfg.kind in FUSED_KINDS:
        return cfg
    if gluon and 1 < m <= gluon_launch.STREAM_MAX_M:
        first = lookup_config(fmt, n, k, 1, dtype, scale_mode, device, gluon=True)
        if first.kind == "stream" and gluon_launch.runs("stream", device, m, k, dtype):
            return first
    if gluon:  # a wgmma Gluon entry: the portable kernel's own
        cfg = lookup_config(fmt, n, k, m, dtype, scale_mode, device, gluon=False)
        if cfg.kind in FUSED_KINDS:
            return cfg
    return None


# Prefill-sized m, past the tuned buckets: above this m, decoding the weight once per call and running cuBLAS
# beats the packed kernel (H100, 2026-11-23, both layer-shape sets, benchmarks/results/
# h100_prefill_dequant_crossover.txt: TQ2 70B m = 1024 3048 vs 3110 us (a tie), m = 2048 5533 vs 6230; TQ1 70B
# m = 512 1919 vs 2034, m = 2048 5671 vs 7793). The decode is amortised over m rows; the kernel's tensor-core
# loop is not. Compared on the m bucket (multiples of 256 here), so every m of a bucket gets the same choice.
DEQUANT_ABOVE_M = {"tq2": 1024, "tq1": 512}


# Tuned entries for the Hopper Gluon kernel carry this suffix on their key, beside the portable kernel's entry
# for the same shape (which a Triton without Gluon, or a failed Gluon compile, still uses).
GLUON_KEY_SUFFIX = "|gluon"


def gluon_candidates(m: int, k: int) -> list[KernelConfig]:
    """Gluon kernel configs the tuner tries (m <= 16): the wgmma kernel at the MMA width covering m, and (where
    it takes the shape) the streaming kernel at 4 or 8 warps, each with split-k factors."""
    bm = 8 if m <= 8 else 16
    splits = (1, 2, 3, 4, 6, 8, 12, 16)
    out = [KernelConfig("gluon", bm, 64, bj, split) for bj in (64, 128) for split in splits]
    if gluon_launch.takes("stream", m, k):
        out += [KernelConfig("stream", 8, 16 * w, gluon_launch.STREAM_BJ, split, w) for w in (4, 8) for split in splits]
    return out


def table_configs(fmt: str, n: int, k: int, m: int, dtype: torch.dtype) -> list[KernelConfig]:
    """Every config the tables (shipped and user cache) hold for this format, shape, m bucket and dtype, tuned on
    any GPU, Gluon entries included: the candidates of a quick tune on another GPU (``spectra bench tune
    --quick``), which a config that won on one Hopper part usually is on its sibling."""
    rest = config_key(fmt, n, k, m, dtype, 0, "")  # "|fmt|nxk|mB|dtype|s0", the key without its GPU
    found = {KernelConfig.from_dict(entry) for key, entry in _load_table().items()
             if key[key.index("|"):] in (rest, rest + GLUON_KEY_SUFFIX)}
    return sorted(found, key=astuple)


def lookup_config(fmt: str, n: int, k: int, m: int, dtype: torch.dtype, scale_mode: int,
                  device: torch.device, gluon: bool = True) -> KernelConfig:
    """The config a launch uses: a tuned Gluon entry (if `gluon` and the kernel can run here), else the tuned
    portable entry, else the nearest tuned m bucket's, else the heuristic."""
    key = config_key(fmt, n, k, m, dtype, scale_mode, gpu_name(device))
    if gluon and m <= 16 and device.type == "cuda":
        entry = (_load_table().get(key + GLUON_KEY_SUFFIX)
                 or _load_table().get(config_key(fmt, n, k, m, dtype, 0, gpu_name(device)) + GLUON_KEY_SUFFIX))
        cfg = KernelConfig.from_dict(entry) if entry is not None else None
        if cfg is not None and gluon_launch.runs(cfg.kind, device, m, k, dtype):
            return cfg
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
            if entry is not None and entry.get("kind") == "gemv" and m_bucket(m) > GEMV_MAX_M:
                entry = None  # one activation row per program: reads the weights m times
            if entry is not None:
                break
    if entry is not None:
        return KernelConfig.from_dict(entry)
    return heuristic_config(n, k, m, fmt, num_sms(device))
