"""Decode steps with the norms, residual adds and SwiGLU inside the packed products (the fused step) against
the separate kernels, and what those kernels cost: the step timed as `spectra.generate` replays it (CUDA).

    python benchmarks/bench_fused_decode.py --kinds tq2 --batches 1,16

Variants (timed in turn, --repeats times, median of each):
  fused      the default: norms, SwiGLU and residual adds inside the packed products (kernels.FUSED_DECODE;
             the GEMV kernel on every product at batch 1 and 2)
  unfused    kernels.FUSED_DECODE off: the separate kernels, the tuned kernel per product (Gluon where tuned)
  nogluon    unfused, with the Gluon kernels off (SPECTRA_GLUON=0): the portable kernels' own entries
and, on the unfused step, kernels left out. Leaving a kernel out gives wrong tokens; what it measures is the
time that kernel costs, the most that fusing it away could gain:
  norm       RMSNorm (+ residual add) kernels return their input (61 launches per 3.9B step)
  swiglu     SwiGLU returns the gate (30 launches)
  attention  the decode-attention kernel (rotary + cache write + attention) returns q (30 launches)
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import spectra.kernels as kernels
import spectra.model as model_module
from spectra.bench import build_random_model
from spectra.decode_graph import GraphSamplingStep, greedy, time_replays

_REAL = {name: getattr(model_module, name) for name in ("add_rms_norm", "rms_norm", "swiglu",
                                                         "cached_step_attention")}
_SKIPS = {
    "norm": {"add_rms_norm": lambda x, residual, weight, eps: (x, x), "rms_norm": lambda x, weight, eps: x},
    "swiglu": {"swiglu": lambda gate, up: gate},
    "attention": {"cached_step_attention": lambda q, *rest: q},
}


def _patch(skips: list[str]) -> None:
    for name, fn in _REAL.items():
        setattr(model_module, name, fn)
    kernels.FUSED_DECODE = "fused" in skips
    os.environ["SPECTRA_GLUON"] = "0" if "nogluon" in skips else "1"
    kernels.clear_config_memo()
    for skip in skips:
        for name, fn in _SKIPS.get(skip, {}).items():
            setattr(model_module, name, fn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="3.9b")
    p.add_argument("--kinds", default="tq2")
    p.add_argument("--batches", default="1")
    p.add_argument("--variants", default="fused,unfused,nogluon,norm,swiglu,norm+swiglu,attention")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    dev = torch.device("cuda")
    variants = [v.split("+") for v in args.variants.split(",")]
    max_len = 256
    print(f"{torch.cuda.get_device_name(dev)}; {args.model}, fp16, fused projections, eager CUDA-graph sampling "
          f"step from position 8; median of {args.repeats}")
    print("| kind | batch | variant | step us | steps/s | us less than the first |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        model = build_random_model(args.model, kind, torch.float16, dev, max_seq_len=max_len)
        model.fuse_projections()
        for batch in (int(b) for b in args.batches.split(",")):
            times: dict[int, list[float]] = {i: [] for i in range(len(variants))}
            for _ in range(args.repeats):
                for i, skips in enumerate(variants):
                    _patch(skips)
                    step = GraphSamplingStep(model, batch, max_len, greedy)
                    times[i].append(time_replays(step, args.steps, 8))
                    step.close()
            _patch(["fused"])
            base = statistics.median(times[0])
            for i, skips in enumerate(variants):
                t = statistics.median(times[i])
                print(f"| {kind} | {batch} | {'+'.join(skips)} | {t * 1e6:.0f} | {1 / t:.0f} | "
                      f"{(base - t) * 1e6:.0f} |", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
