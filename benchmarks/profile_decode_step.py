"""Where a decode step's GPU time goes: kernel time and launches per step, by kernel (torch.profiler).

    python benchmarks/profile_decode_step.py                     # 3.9B TQ2, torch.compile-d step
    python benchmarks/profile_decode_step.py --kind float --eager

Random weights, fused q/k/v and gate/up, batch 1, a KV cache of --max-len positions, one token at position 8.
The step runs without a CUDA graph here, so the figures are kernel time (launch gaps not included).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from spectra.kernels.bench import build_random_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="3.9b", choices=("3.9b", "70b-slice"))
    p.add_argument("--kind", default="tq2", choices=("tq2", "tq1", "float"))
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--eager", action="store_true", help="profile the eager step instead of the compiled one")
    p.add_argument("--layers", type=int, default=None, help="layers (default: 30 for 3.9b, 4 for the slice)")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    dev = torch.device("cuda")
    layers = args.layers or (4 if args.model == "70b-slice" else None)
    model = build_random_model(args.model, args.kind, torch.float16, dev, layers, max_seq_len=max(args.max_len, 128))
    model.fuse_projections()
    model.setup_cache(1, args.max_len)
    step = model if args.eager else torch.compile(model, dynamic=False)
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    pos = torch.tensor([8], device=dev)
    reps = 5
    with torch.no_grad():
        for _ in range(3):  # compile and warm up outside the profile
            step(tok, input_pos=pos)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                step(tok, input_pos=pos)
            torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / reps, e.count / reps) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    print(f"{torch.cuda.get_device_name()}; {args.model} {args.kind}, {'eager' if args.eager else 'compiled'} step, "
          f"max_len {args.max_len}: kernel time per step {sum(r[1] for r in rows):.0f} us, "
          f"kernels per step {sum(r[2] for r in rows):.0f}")
    for key, us, count in rows[:args.top]:
        print(f"  {us:8.1f} us  {count:5.0f}x  {key[:110]}")


if __name__ == "__main__":
    main()
