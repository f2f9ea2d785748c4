"""Decode steps/s of the previous step structure beside the new one, same model, same run (CUDA).

    python benchmarks/bench_decode_paths.py --modes eager,compiled --kinds float,tq2,tq1 --batches 1,16

old: the step as `spectra bench decode` captured it before this change: RMSNorm, residual adds and SwiGLU as
     PyTorch ops (about 28 launches per block in an eager step), logits handed back for the host to sample.
new: what `spectra.generate` replays now: fused pointwise kernels (kernels/pointwise.py; under torch.compile
     inductor fuses those ops either way), the greedy token chosen inside the graph and fed back, the
     position advanced on the GPU (GraphSamplingStep), no host work between steps.
Both use this tree's packed matmuls and decode-attention kernel. Random weights (3.9B shape, 6 shard
scales per matrix), fp16 activations, fused q/k/v and gate/up, steps from --context. With --long-contexts,
batch 1 of the new path is also timed from those positions (attention reads only the filled cache). With
--fold-ab, the new path is also timed with the column-shard scales of o_proj/down_proj left where they are
(not moved onto v_proj/up_proj by fuse_projections): the last column, and the gain of moving them. With
--int8-cache, the new path is also timed with an 8-bit KV cache (``cache_dtype=torch.int8``), at --context and
the long contexts.
"""

from __future__ import annotations

import argparse
import time

import torch

from spectra.bench import build_random_model
from spectra.decode_graph import GraphDecodeStep, GraphSamplingStep, greedy, time_decode, time_replays
from spectra.kernels import pointwise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="3.9b")
    p.add_argument("--kinds", default="float,tq2,tq1")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--context", type=int, default=8)
    p.add_argument("--long-contexts", default="", help="e.g. 2048,8192: batch-1 new-path steps from there")
    p.add_argument("--fold-ab", action="store_true", help="also time the new path with the scales not moved")
    p.add_argument("--int8-cache", action="store_true", help="also time the new path with an 8-bit KV cache")
    args = p.parse_args()
    dev = torch.device("cuda")
    kinds, modes = args.kinds.split(","), args.modes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    longs = [int(c) for c in args.long_contexts.split(",") if c]
    max_len = max([128, args.context, *longs]) + args.steps + 8
    t0 = time.time()
    print(f"{torch.cuda.get_device_name(dev)}; {args.model}, fp16 activations, fused projections, CUDA-graph steps "
          f"from position {args.context}, cache {max_len}")
    ab = " new, scales not moved (steps/s, gain) |" if args.fold_ab else ""
    print(f"| mode | kind | batch | old steps/s | new steps/s | new tokens/s | new vs old | new vs float |{ab}")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.fold_ab else ""))
    float_new: dict[tuple[str, int], float] = {}
    for mode in modes:
        compile = mode == "compiled"
        for kind in kinds:
            model = build_random_model(args.model, kind, torch.float16, dev, max_seq_len=max_len)
            model.fuse_projections()
            for batch in batches:
                pointwise.ENABLED = False
                with GraphDecodeStep(model, batch, max_len, compile=compile) as step:
                    old = time_decode(step, batch, dev, args.steps, start=args.context)
                pointwise.ENABLED = True
                step = GraphSamplingStep(model, batch, max_len, greedy, compile=compile)
                new = time_replays(step, args.steps, args.context)
                extra = []
                if batch == 1:
                    extra = [(c, time_replays(step, args.steps, c)) for c in longs]
                step.close()
                unmoved = ""
                if args.fold_ab:
                    for module in model.modules():
                        if hasattr(module, "unfold_scales"):
                            module.unfold_scales()
                    step = GraphSamplingStep(model, batch, max_len, greedy, compile=compile)
                    t = time_replays(step, args.steps, args.context)
                    step.close()
                    model.fuse_projections()  # moves the scales again
                    unmoved = f" {1 / t:.0f} ({t / new:.3f}x) |"
                if kind == "float":
                    float_new[(mode, batch)] = new
                ratio = f"{float_new[(mode, batch)] / new:.2f}x" if (mode, batch) in float_new else "-"
                print(f"| {mode} | {kind} | {batch} | {1 / old:.0f} | {1 / new:.0f} | {batch / new:.0f} | "
                      f"{old / new:.2f}x | {ratio} |{unmoved}  [{time.time() - t0:.0f}s]", flush=True)
                for c, t in extra:
                    print(f"|   context {c} | {kind} | 1 | - | {1 / t:.0f} | {1 / t:.0f} | "
                          f"{new / t:.2f}x of context {args.context} | - |", flush=True)
                if args.int8_cache:
                    step = GraphSamplingStep(model, batch, max_len, greedy, compile=compile, cache_dtype=torch.int8)
                    contexts = [args.context] + (longs if batch == 1 else [])
                    for c, t in [(c, time_replays(step, args.steps, c)) for c in contexts]:
                        print(f"|   int8 cache, context {c} | {kind} | {batch} | - | {1 / t:.0f} | {batch / t:.0f} | "
                              f"{new / t:.2f}x of the fp16 cache at context {args.context} | - |", flush=True)
                    step.close()
            del model
            torch._dynamo.reset()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
