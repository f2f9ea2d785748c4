"""Repeated `spectra.generate` calls: the kept decode step replayed against a capture in every call. (CUDA)

    python3 benchmarks/bench_generate_calls.py --model 3.9b --kind tq2 --new 64

Random weights; five calls per line, each a new prompt (100 to 128 tokens, so every call fits the cache the
first one sized), greedy; wall-clock ms per call, all host work included (prefill, capture where there is one,
the streamed tokens). "capture every call" drops the kept step before each call
(`spectra.generate.release_decode_step`), which is what every call cost before generate kept it. The first
call of the first line also compiles the kernels; the median leaves each line's first call out.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spectra.bench import build_random_model
from spectra.generate import generate, release_decode_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="3.9b")
    p.add_argument("--kind", default="tq2")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_generate_calls needs a CUDA GPU")
    dev = torch.device("cuda")
    model = build_random_model(args.model, args.kind, torch.float16, dev, max_seq_len=1024)
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"# {torch.cuda.get_device_name(dev)}; {args.model} {args.kind}; batch 1; {args.new} new tokens per call")
    for label, release in (("capture every call", True), ("kept step", False)) * 2:
        times = []
        for i in range(args.calls):
            if release:
                release_decode_step(model)
            prompt = torch.randint(0, model.config.vocab_size, (1, 100 + 7 * i), device=dev, generator=gen)
            torch.cuda.synchronize()
            start = time.perf_counter()
            generate(model, prompt, args.new, temperature=0)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        print(f"{label:20s}: median {statistics.median(times[1:]):.1f} ms per call (every call: "
              f"{', '.join(f'{t:.1f}' for t in times)})", flush=True)


if __name__ == "__main__":
    main()
