"""Helpers shared by the Triton kernel tests."""

from __future__ import annotations

import os
import subprocess
import sys


def run_in_interpreter(script: str) -> str:
    """Run a kernel battery in a fresh process under TRITON_INTERPRET=1 (it must be set before triton is
    imported); its stdout, after asserting exit 0."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout
