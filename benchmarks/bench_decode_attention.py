"""The decode-attention kernel alone: microseconds per launch and cache bytes read per second, by context,
batch and span size (blocks of CHUNK cache positions per program).

    python3 benchmarks/bench_decode_attention.py [--contexts 128,2048,8192] [--batches 1,16] [--subs 1,2,4,8,auto]
        [--cache fp16,int8] [--chunks 32,64]

One decode step's attention of a 3.9B-shaped model (24 heads of 128, fp16): the fused kernel
(`decode_step_attention`: rotary q/k, cache write at pos, attention to 0..pos) on caches of context + 68
positions, as `spectra bench decode --context N` allocates them. Cold caches (distinct copies, together
several times the L2, as a step's layers are), CUDA-graph replay, median of trials. Every variant is first
checked against the PyTorch reference. "auto" is what the library picks (`attention.blocks_per_span`). With
--cache int8 the caches are 8-bit rows with a scale each (``cache_dtype=torch.int8``); --chunks sets the block
height (positions per block; default: the library's for each cache).
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
    p.add_argument("--cache", default="fp16", help="fp16, int8 or both (fp16,int8)")
    p.add_argument("--chunks", default="", help="block heights to try, e.g. 32,64 (default: the library's)")
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
    print("| cache | batch | context | positions | block | blocks per span | warps | spans per head | us per launch "
          "| cache GB/s read |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator(device=dev).manual_seed(0)
    chunks = [int(c) for c in args.chunks.split(",") if c] or [0]
    for cache in args.cache.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for ctx in (int(c) for c in args.contexts.split(",")):
                variants = [(sub, int(w), c) for sub in args.subs.split(",") for w in args.warps.split(",")
                            for c in chunks]
                for row in time_context(cache == "int8", batch, ctx, h, d, variants, sms, args.reps, args.trials,
                                        gen):
                    print(row, flush=True)
                torch.cuda.empty_cache()


def time_context(int8: bool, batch: int, ctx: int, h: int, d: int, variants: list[tuple[str, int, int]], sms: int,
                 reps: int, trials: int, gen: torch.Generator) -> list[str]:
    """Table rows for one cache dtype, batch and context, one per (span size, warps, block height; 0: the
    library's) (each checked against the reference first)."""
    dev = gen.device
    length = ctx + 68
    row_bytes = d + 4 if int8 else 2 * d  # an int8 row carries its fp32 scale
    copies = max(2, min(30, -(-4 * l2_size(dev) // (2 * batch * h * length * row_bytes))))

    def cache() -> tuple[torch.Tensor, ...]:
        rows = torch.randn(batch, h, length, d, device=dev, dtype=torch.float16, generator=gen)
        return attention.quantize_cache_rows(rows) if int8 else (rows,)

    caches = []  # per copy: (k, v[, k scale, v scale]), as _launch takes them
    for _ in range(copies):
        k_parts, v_parts = cache(), cache()
        caches.append((k_parts[0], v_parts[0], *k_parts[1:], *v_parts[1:]))
    qkv = torch.randn(batch, 1, 3, h, d, device=dev, dtype=torch.float16, generator=gen)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    cos_t, sin_t = (t.to(dev, torch.float16) for t in rope_tables(d, length, 10000.0))
    pos = torch.tensor([ctx], device=dev)
    cos, sin = cos_t[ctx].contiguous(), sin_t[ctx].contiguous()
    rows = []
    name = "int8" if int8 else "fp16"
    for sub_arg, warps, chunk in variants:
        chunk = chunk or (attention.INT8_CHUNK if int8 else attention.CHUNK)
        sub = attention.blocks_per_span(length, batch * h, sms, chunk) if sub_arg == "auto" else int(sub_arg)
        label = f"auto ({sub})" if sub_arg == "auto" else sub_arg
        head = f"| {name} | {batch} | {ctx} | {length} | {chunk} | {label} | {warps} |"
        got = attention._launch(q, *(t.clone() for t in caches[0][:2]), pos, k, v, cos, sin,
                                *(t.clone() for t in caches[0][2:]), sub=sub, warps=warps, chunk=chunk)
        ref = [t.clone() for t in caches[0]]
        want = attention.decode_step_attention_reference(q, k, v, cos, sin, ref[0], ref[1], pos, *ref[2:])
        err = float((got.float() - want.float()).abs().max())
        if not err < 2e-3 * max(1.0, float(want.abs().max())):
            rows.append(f"{head} WRONG: max err {err:.2e} | | |")
            continue

        def launch(i: int, sub: int = sub, warps: int = warps, chunk: int = chunk) -> None:
            attention._launch(q, caches[i][0], caches[i][1], pos, k, v, cos, sin, *caches[i][2:], sub=sub,
                              warps=warps, chunk=chunk)

        t = time_graph(launch, copies, reps, trials)
        read = 2 * batch * h * (ctx + 1) * row_bytes
        spans = -(-length // (chunk * sub))
        rows.append(f"{head} {spans} | {t * 1e6:.1f} | {read / t / 1e9:.0f} |")
    return rows

if __name__ == "__main__":
    main()
