"""Where a decode step's GPU time goes: kernel time and launches per step, by kernel (torch.profiler).

    python benchmarks/profile_decode_step.py                              # 3.9B TQ2: eager-old, eager-new, compiled
    python benchmarks/profile_decode_step.py --kind float --variants compiled

Random weights, fused q/k/v and gate/up, batch --batch (1), a KV cache of --max-len positions, one token at --pos.
Variants: eager-old (RMSNorm, residual adds and SwiGLU as PyTorch ops), eager-new (the fused pointwise
kernels of kernels/pointwise.py), compiled (torch.compile; inductor fuses the pointwise ops itself).
The per-kernel table is kernel time without a CUDA graph; the step time is a CUDA-graph replay of the same
step at the same position (launch gaps included), and "non-matmul" is that step time minus the packed-matmul and cuBLAS
(fp16 layers, lm head) kernel time: what the decode issue's 150 us target counts. Under PDL a kernel's profiled
duration includes its wait for the kernel before it, which makes that difference too small; the step's products
are therefore also timed alone, in one graph in the step's order, and the step minus that is printed too.
"""

from __future__ import annotations

import argparse
import re

import torch
from torch.profiler import ProfilerActivity, profile

from spectra.bench import build_random_model
from spectra.kernels import pointwise
from spectra.kernels.timing import time_graph

MATMUL = re.compile(r"tq_matmul|tq_dequant|gemm|gemv|nvjet|cutlass|xmma|cublas", re.IGNORECASE)


def products_us(model, batch: int) -> float:
    """us per CUDA-graph replay of a step's matrix products alone, in the step's order (each block's q/k/v,
    o, gate/up and down, then the lm head) on fixed random activations: what the step would cost if everything
    between its products were free. Unlike summed kernel durations it is right under PDL, where a kernel's
    profiled duration includes its wait for the kernel before it."""
    dev = torch.device("cuda")
    calls = []
    for layer in model.model.layers:
        for module in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            calls.append((module, torch.randn(batch, 1, module.in_features, dtype=torch.float16, device=dev)))
    head = model.lm_head
    calls.append((head, torch.randn(batch, 1, head.in_features, dtype=torch.float16, device=dev)))

    def run() -> None:
        for module, x in calls:
            module(x)

    with torch.no_grad():
        return time_graph(lambda _: run(), 1, reps=1, trials=20) * 1e6


def profile_variant(model, variant: str, max_len: int, pos: int, top: int, batch: int = 1) -> None:
    dev = torch.device("cuda")
    pointwise.ENABLED = variant != "eager-old"
    compile = variant == "compiled"
    model.setup_cache(batch, max_len)
    step = torch.compile(model, dynamic=False) if compile else model
    tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    at = torch.tensor([pos], device=dev)
    reps = 5
    with torch.no_grad():
        for _ in range(3):  # compile and warm up outside the profile
            step(tok, input_pos=at)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                step(tok, input_pos=at)
            torch.cuda.synchronize()
        # the same step (same compiled code and cache) captured in a CUDA graph: its time includes the gaps
        step_us = time_graph(lambda _: step(tok, input_pos=at), 1, reps=1, trials=20) * 1e6
    model.clear_cache()
    only_products = products_us(model, batch)
    rows = [(e.key, e.device_time_total / reps, e.count / reps) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    kernel_us = sum(r[1] for r in rows)
    matmul_us = sum(r[1] for r in rows if MATMUL.search(r[0]))
    print(f"## {variant}: graph step {step_us:.0f} us; kernel time {kernel_us:.0f} us in "
          f"{sum(r[2] for r in rows):.0f} kernels; matmul kernels {matmul_us:.0f} us; "
          f"non-matmul kernels {kernel_us - matmul_us:.0f} us; non-matmul step time {step_us - matmul_us:.0f} us")
    print(f"   the step's products alone, one graph: {only_products:.0f} us; step minus that: "
          f"{step_us - only_products:.0f} us (the non-matmul share, right under PDL)")
    for key, us, count in rows[:top]:
        print(f"  {us:8.1f} us  {100 * us / kernel_us:5.1f}%  {count:5.0f}x  {key[:100]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="3.9b", choices=("3.9b", "70b-slice"))
    p.add_argument("--kind", default="tq2", choices=("tq2", "tq1", "float"))
    p.add_argument("--variants", default="eager-old,eager-new,compiled")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--pos", type=int, default=8, help="the step's position (context = pos + 1 tokens)")
    p.add_argument("--layers", type=int, default=None, help="layers (default: 30 for 3.9b, 4 for the slice)")
    p.add_argument("--top", type=int, default=16)
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (one token each per step)")
    args = p.parse_args()
    dev = torch.device("cuda")
    layers = args.layers or (4 if args.model == "70b-slice" else None)
    max_len = max(args.max_len, args.pos + 60)
    model = build_random_model(args.model, args.kind, torch.float16, dev, layers, max_seq_len=max(max_len, 128))
    model.fuse_projections()
    print(f"{torch.cuda.get_device_name()}; {args.model} {args.kind}, batch {args.batch}, position {args.pos}, "
          f"cache {max_len}")
    for variant in args.variants.split(","):
        profile_variant(model, variant, max_len, args.pos, args.top, args.batch)


if __name__ == "__main__":
    main()
