"""Helpers shared by the Triton kernel tests."""

from __future__ import annotations

import os
import subprocess
import sys

# every interpreter battery counts its checks in `cases` and collects messages in `failures`; this ends it
_REPORT = """
import sys
print(f"cases={cases}")
for f in failures:
    print("FAIL", f)
sys.exit(1 if failures else 0)
"""


def run_in_interpreter(script: str) -> str:
    """Run a kernel battery in a fresh process under TRITON_INTERPRET=1 (it must be set before triton is
    imported); its stdout ("cases=N" and a line per failure), after asserting exit 0. The battery (dedented)
    defines `cases` and `failures`; the report is appended here."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script + _REPORT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def fp32_reference(x, packed, fmt, k, scales, axis):
    """The GPU tests' reference: fp32 product of the kernels' definition on the CPU, on x's device. Column-shard
    scales multiply x first, cast back to x's dtype (scale_columns_reference), as every kernel does. Without
    that rounding, a lone output (n = m = 1) that is a sum of 16 cancelling terms showed a relative error of
    0.7% (fp16) / 3.5% (bf16) on an H100 from that rounding alone."""
    import torch

    from spectra.formats import get_format
    from spectra.kernels import scale_columns_reference
    from spectra.ternary import expand_scales

    if axis == 1 and scales.numel() > 1:
        x, scales, axis = scale_columns_reference(x, scales, k), torch.ones(1, device=scales.device), 0
    trits = get_format(fmt).unpack(packed.cpu(), k).float()
    w = trits * expand_scales(scales.float().cpu(), tuple(trits.shape), axis)
    return (x.float().cpu() @ w.t()).to(x.device)


def tolerance(dtype) -> float:
    """Relative error a kernel's fp32-accumulated result may show in this activation dtype (its rounding)."""
    import torch

    return 2e-3 if dtype == torch.float16 else 1.6e-2


def relative_error(y, ref) -> float:
    """||y - ref|| / ||ref|| in fp32; NaN (fails every `<` check) where y holds a NaN."""
    return float((y.float() - ref).norm() / ref.norm())


def poisoned_launch_error(launch, x, packed, fmt, k, scales, axis) -> float:
    """Relative error of launch(out=y) into a NaN-filled y [m, n] against fp32_reference: an output the kernel
    never writes stays NaN and fails the check."""
    import torch

    y = torch.full((x.shape[0], packed.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    launch(out=y)
    return relative_error(y, fp32_reference(x, packed, fmt, k, scales, axis))
