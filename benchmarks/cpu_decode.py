"""CPU decoding speed of a TriLM: frozen int8 trits vs packed TQ2 / TQ1 (the plain PyTorch paths).

    python benchmarks/cpu_decode.py                 # 99M TriLM, random weights, greedy, batch 1
    python benchmarks/cpu_decode.py --size tiny --tokens 16

Prints tokens/s of greedy KV-cache decoding after a short warm-up (which also compiles), and checks that every
packed model decodes the same tokens as the frozen one. Packed models run twice: with the decode steps'
products compiled into one loop over the packed bytes (spectra.kernels.cpu_gemv, the default) and with the
reference (unpack the whole matrix, then a dense product; SPECTRA_CPU_GEMV=0).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import spectra
from spectra.generate import generate
from spectra.kernels import cpu_gemv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="99M")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per timed run")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = spectra.get_config(args.size, weight_kind="ternary")
    frozen = spectra.freeze_ternary(spectra.SpectraLM(config).eval())
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,)).tolist()
    # pack_model converts in place: pack copies.
    tq2, tq1 = (spectra.pack_model(copy.deepcopy(frozen), fmt) for fmt in ("tq2", "tq1"))
    models = {"frozen (int8 trits)": (frozen, False), "tq2, reference": (tq2, False), "tq2, compiled": (tq2, True),
              "tq1, reference": (tq1, False), "tq1, compiled": (tq1, True)}
    print(f"{args.size} TriLM, CPU, {torch.get_num_threads()} threads, greedy, batch 1, "
          f"prompt {args.prompt_len}, {args.tokens} new tokens")
    print("| weights | tokens/s | same tokens as frozen |")
    print("|---|---|---|")
    reference = None
    for name, (model, compiled) in models.items():
        cpu_gemv.ENABLED = compiled
        with torch.no_grad():
            generate(model, prompt, max_new_tokens=2, temperature=0)  # warm-up
            start = time.perf_counter()
            out = generate(model, prompt, max_new_tokens=args.tokens, temperature=0)
            elapsed = time.perf_counter() - start
        reference = out if reference is None else reference
        print(f"| {name} | {args.tokens / elapsed:.1f} | {bool(torch.equal(out, reference))} |")


if __name__ == "__main__":
    main()
