"""The decode-attention kernel alone: microseconds per launch and cache bytes read per second, by context,
batch and span size (blocks of 64 cache positions per program).

    python3 benchmarks/bench_decode_attention.py [--contexts 128,2048,8192] [--batches 1,16] [--subs 1,2,4,8,auto]

One decode step's attention of a 3.9B-shaped model (24 heads of 128, fp16): the fused kernel
(`decode_step_attention`: rotary q/k, cache write at pos, attention to 0..pos) on caches of context + 68
positions, as `spectra bench decode --context N` allocates them. Cold caches (distinct copies, together
several times the L2, as a step's layers are), CUDA-graph replay, median of trials. Every variant is first
checked against the PyTorch reference. "auto" is what the library picks (`attention.blocks_per_span`).
"""

from __future__ import annotations

import argparse

import torch

from spectra.kernels import attention
from spectra.kernels.timing import l2_size, time_graph
from spectra.model import rope_tables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="128,2048,8192")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--subs", default="1,2,4,8,auto")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--trials", type=int, default=5)
    args = p.parse_args()
    dev = torch.device("cuda")
    h, d = args.heads, args.head_dim
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"{torch.cuda.get_device_name(dev)}; {h} heads x {d}, fp16, cold caches, CUDA graphs of {args.reps} "
          f"launches, median of {args.trials}")
    print("| batch | context | cache | blocks per span | warps | spans per head | us per launch | cache GB/s read |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator(device=dev).manual_seed(0)
    for batch in (int(b) for b in args.batches.split(",")):
        for ctx in (int(c) for c in args.contexts.split(",")):
            variants = [(sub, int(w)) for sub in args.subs.split(",") for w in args.warps.split(",")]
            for row in time_context(batch, ctx, h, d, variants, sms, args.reps, args.trials, gen):
                print(row, flush=True)
            torch.cuda.empty_cache()


def time_context(batch: int, ctx: int, h: int, d: int, variants: list[tuple[str, int]], sms: int, reps: int,
                 trials: int, gen: torch.Generator) -> list[str]:
    """Table rows for one batch and context, one per (span size, warps) (each checked against the reference
    first)."""
    dev = gen.device
    length = ctx + 68
    copies = max(2, min(30, -(-4 * l2_size(dev) // (2 * batch * h * length * d * 2))))
    caches = [(torch.randn(batch, h, length, d, device=dev, dtype=torch.float16, generator=gen),
               torch.randn(batch, h, length, d, device=dev, dtype=torch.float16, generator=gen))
              for _ in range(copies)]
    qkv = torch.randn(batch, 1, 3, h, d, device=dev, dtype=torch.float16, generator=gen)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    cos_t, sin_t = (t.to(dev, torch.float16) for t in rope_tables(d, length, 10000.0))
    pos = torch.tensor([ctx], device=dev)
    cos, sin = cos_t[ctx].contiguous(), sin_t[ctx].contiguous()
    rows = []
    for sub_arg, warps in variants:
        sub = attention.blocks_per_span(length, batch * h, sms) if sub_arg == "auto" else int(sub_arg)
        label = f"auto ({sub})" if sub_arg == "auto" else sub_arg
        got = attention._launch(q, caches[0][0].clone(), caches[0][1].clone(), pos, k, v, cos, sin, sub=sub,
                                warps=warps)
        want = attention.decode_step_attention_reference(q, k, v, cos, sin, caches[0][0].clone(),
                                                         caches[0][1].clone(), pos)
        err = float((got.float() - want.float()).abs().max())
        if not err < 2e-3 * max(1.0, float(want.abs().max())):
            rows.append(f"| {batch} | {ctx} | {length} | {label} | {warps} | WRONG: max err {err:.2e} | | |")
            continue

        def launch(i: int, sub: int = sub, warps: int = warps) -> None:
            attention._launch(q, caches[i][0], caches[i][1], pos, k, v, cos, sin, sub=sub, warps=warps)

        t = time_graph(launch, copies, reps, trials)
        read = 2 * batch * h * (ctx + 1) * d * 2
        spans = -(-length // (attention.CHUNK * sub))
        rows.append(f"| {batch} | {ctx} | {length} | {label} | {warps} | {spans} | {t * 1e6:.1f} | "
                    f"{read / t / 1e9:.0f} |")
    return rows

if __name__ == "__main__":
    main()
