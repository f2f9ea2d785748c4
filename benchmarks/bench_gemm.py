"""Packed TQ2/TQ1 GEMM vs cuBLAS fp16 (same as `spectra bench gemm`; options: --help)."""

import sys

from spectra.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "gemm", *sys.argv[1:]]))
