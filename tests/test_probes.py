"""The probes in benchmarks/ (candidate kernels and paths timed beside the library's): their timings only mean
something if they compute what the library computes, so each one's --check runs here (Triton kernels under the
interpreter, on odd shapes; the GPU runs check again before timing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _check(script: str, *args: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--check", *args], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_fused_mlp_probe_matches_the_reference():
    # gate/up, SwiGLU and down in one kernel: partial blocks of units, rows and columns everywhere
    pytest.importorskip("triton")
    assert "all variants match the reference" in _check("fused_mlp_probe.py", "--bj", "8,16", "--warps", "4")


def test_sliced_dequant_probe_matches_the_whole_product():
    # the slicing alone (the overlapped path needs streams: its GPU run checks it before timing)
    assert "the sliced product matches the whole-weight product" in _check("prefill_sliced_dequant_probe.py")
