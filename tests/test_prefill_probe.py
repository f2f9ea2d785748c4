"""benchmarks/prefill_sliced_dequant_probe.py: its timings only mean something if the sliced product equals the
whole-weight one (the GPU run checks its overlapped path itself before timing it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_sliced_dequant_probe_matches_the_whole_product():
    probe = Path(__file__).parents[1] / "benchmarks" / "prefill_sliced_dequant_probe.py"
    proc = subprocess.run([sys.executable, str(probe), "--check"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the sliced product matches the whole-weight product" in proc.stdout
