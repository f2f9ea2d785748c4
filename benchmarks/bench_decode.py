"""CUDA-graph decoding with packed weights vs fp16 (same as `spectra bench decode`; options: --help)."""

import sys

from spectra.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
