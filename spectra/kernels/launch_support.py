"""What every launcher of the packed kernels shares (dispatch, cached plans, the Gluon launcher, decode
attention, the compiled CPU product): the split-k workspace, how per-shard scales reach a kernel, and the
switch that turns a fast path off at its first failure."""

from __future__ import annotations

import functools
import os
import warnings

import torch


class _Workspace:
    """Per-device fp32 slots for split-k / stream-K partial tiles and their arrival counters (the kernels
    leave the counters at zero; the slots are overwritten by every launch).

    A grown workspace never frees the buffers it replaces: a CUDA graph captured earlier (a decode step) keeps
    their addresses, and a later, larger launch (the prompt's prefill) must not hand that memory to other
    tensors while the graph can still replay into it.
    """

    def __init__(self) -> None:
        self.buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.retired: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, device: torch.device, numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        ws, cnt = self.buffers.get(device, (None, None))
        if ws is None or ws.numel() < numel or cnt.numel() < tiles:
            if ws is not None:
                self.retired.append((ws, cnt))
            # grow geometrically so a sequence of growing launches retires few buffers
            size = max(numel, 0 if ws is None else 2 * ws.numel(), 1 << 16)
            ntiles = max(tiles, 0 if cnt is None else 2 * cnt.numel(), 1024)
            ws = torch.zeros(size, dtype=torch.float32, device=device)
            cnt = torch.zeros(ntiles, dtype=torch.int32, device=device)
            self.buffers[device] = (ws, cnt)
        return ws, cnt


def scale_mode(scales: torch.Tensor, shard_axis: int) -> int:
    return 0 if scales.numel() == 1 else 1 if shard_axis == 0 else 2


def scale_columns(x2: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """x2 [m, k] times the scale of each column's shard (P tensor_split shards of k), computed in fp32 and cast
    back to x2's dtype, in one kernel (reference: scale_columns_reference): how the tensor-core kernels take
    column-shard scales."""
    import triton

    from .tq_triton import tq_scale_columns_kernel  # optional: triton

    m = x2.shape[0]
    out = torch.empty((m, in_features), dtype=x2.dtype, device=x2.device)
    bk = 1024
    tq_scale_columns_kernel[(m, triton.cdiv(in_features, bk))](x2, scales, out, m, in_features, scales.numel(),
                                                                x2.stride(0), BK=bk, num_warps=4)
    return out


WORKSPACE = _Workspace()


def pdl_enabled(device: torch.device) -> bool:
    """Programmatic dependent launch: a Hopper-or-newer GPU and a Triton with the griddepcontrol intrinsics;
    SPECTRA_PDL=0 turns it off (to compare). Every kernel of a decode step is launched with it: it signals at
    its start that the next launch may begin, and waits for the kernels before it only where it first reads
    their output (the products load their first weights before that wait)."""
    return device.type == "cuda" and _pdl_supported(device.index, os.environ.get("SPECTRA_PDL"))


def pdl_options(device: torch.device) -> dict:
    """Launch keywords of a kernel whose ``PDL`` constexpr makes it signal at its start and wait before it reads
    its predecessor's output (the pointwise and attention kernels): launched with PDL where :func:`pdl_enabled`."""
    return dict(PDL=True, launch_pdl=True) if pdl_enabled(device) else dict(PDL=False)


@functools.cache  # pointwise launches ask on every call
def _pdl_supported(index: int | None, switch: str | None) -> bool:
    from . import tq_triton  # optional: triton

    return (tq_triton.gdc_wait is not None and switch != "0"
            and torch.cuda.get_device_capability(index)[0] >= 9)


class FastPathSwitch:
    """A fast path that turns itself off for the rest of the process at its first failure (a compiler that
    cannot build it), with one warning line giving the first reason; callers then take `instead`."""

    def __init__(self, name: str, instead: str) -> None:
        self.name, self.instead = name, instead
        self.broken: str | None = None  # why the fast path is off in this process, or None

    def disable(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            warnings.warn(f"spectra: {self.name} is unavailable ({reason}); using {self.instead}", RuntimeWarning,
                          stacklevel=4)
