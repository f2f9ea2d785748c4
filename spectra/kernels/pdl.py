"""Programmatic dependent launch (PDL, compute capability 9.0 and newer) for the kernels of a decode step.

A decode step is a chain of ~300 short dependent kernels, each paying its own launch and start-up latency.
Launched with PDL, a kernel may be scheduled while its predecessor in the stream still runs: its first
instruction (:func:`wait_for_predecessor`) blocks until the predecessor has finished and its writes are
visible, then lets its own successor be scheduled. Nothing touches memory before the wait, so results are
unchanged; only launch and start-up overlap. Every kernel launched with PDL waits unconditionally, so a
kernel's completion implies its predecessors' (what a kernel two launches later relies on).

Experimental: off unless ``SPECTRA_PDL=1`` (or :data:`ENABLED` set before the first launch) until a GPU run
measures the gain; never under TRITON_INTERPRET.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs launch no Triton kernel
    triton = None

ENABLED = os.environ.get("SPECTRA_PDL") == "1"
_hopper: dict[int, bool] = {}


def pdl_applies(device: torch.device) -> bool:
    """Whether launches on `device` use PDL: enabled, a CUDA device of compute capability >= 9, compiled code."""
    if not ENABLED or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _hopper:
        _hopper[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _hopper[index]


def pdl_args(device: torch.device) -> tuple[dict, dict]:
    """(constexprs, launch options) of a kernel launch on `device`: GDC for the kernel, launch_pdl for Triton."""
    on = pdl_applies(device)
    return {"GDC": on}, ({"launch_pdl": True} if on else {})


if triton is not None:

    @triton.jit
    def wait_for_predecessor(GDC: tl.constexpr):
        """First thing in a PDL kernel: wait for the previous kernel's results, then let the next one launch."""
        if GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
