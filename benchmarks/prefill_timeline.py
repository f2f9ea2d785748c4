"""Where the host and the GPU are during one prefill: is it bound by host work or by the GPU? (CUDA)

    python3 benchmarks/prefill_timeline.py --model 3.9b --prompt 2048 --kinds float,tq2

For each kind (random weights, fused projections as ``generate`` fuses them, batch 1): the host issue time and
the whole forward of ``model.prefill`` (median of 5, with Python's garbage collector on and off), then one
prefill with a host clock and a CUDA event around every module down to the projections: per module kind the host
time and the GPU time between its events, and where the host and the GPU stand at layers 0, 10, 20 and the last.
When the GPU's clock tracks the host's, the GPU waits for the host (host-bound); when it runs well behind it,
the host waits for the GPU. The per-call host time of the packed layers' launch plans is listed too.
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import time

import torch

from spectra.bench import build_random_model
from spectra.kernels import plans


def issue_times(model, tokens: torch.Tensor, trials: int = 5) -> tuple[float, float, list[float]]:
    """(median host issue ms, median forward ms, every issue ms) of model.prefill(tokens)."""
    issued, whole = [], []
    for _ in range(trials):
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        start = time.perf_counter()
        model.prefill(tokens)
        issued.append((time.perf_counter() - start) * 1e3)
        end.record()
        end.synchronize()
        whole.append(begin.elapsed_time(end))
    return statistics.median(issued), statistics.median(whole), issued


def timeline(model, tokens: torch.Tensor) -> str:
    """One prefill with a host clock and a CUDA event at the entry and exit of every module (depth <= 4)."""
    marks: list[tuple[str, str, float, torch.cuda.Event]] = []

    def mark(name: str, where: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((name, where, time.perf_counter(), event))

    hooks = []
    for name, module in model.named_modules():
        if name and name.count(".") <= 4:
            hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: mark(name, "in")))
            hooks.append(module.register_forward_hook(lambda m, a, o, name=name: mark(name, "out")))
    plan_call, plan_times = plans.Plan.__call__, []

    def timed_plan(plan, *args):
        start = time.perf_counter()
        out = plan_call(plan, *args)
        plan_times.append((time.perf_counter() - start, plan.cfg.kind))
        return out

    plans.Plan.__call__ = timed_plan
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.prefill(tokens)
        issued = time.perf_counter() - start
        torch.cuda.synchronize()
    finally:
        plans.Plan.__call__ = plan_call
        for hook in hooks:
            hook.remove()
    lines = [f"instrumented prefill: host issue {issued * 1e3:.2f} ms"]
    if plan_times:
        kinds = dict(collections.Counter(kind for _, kind in plan_times))
        host = sum(t for t, _ in plan_times) * 1e3
        lines.append(f"  packed-layer plan calls {len(plan_times)} {kinds}: host {host:.2f} ms, median "
                     f"{statistics.median(t for t, _ in plan_times) * 1e6:.0f} us per call")
    opened, totals = {}, collections.defaultdict(lambda: [0.0, 0.0, 0])
    for name, where, clock, event in marks:
        if where == "in":
            opened[name] = (clock, event)
            continue
        clock0, event0 = opened.pop(name)
        entry = totals[".".join(part for part in name.split(".") if not part.isdigit())]
        entry[0] += (clock - clock0) * 1e3
        entry[1] += event0.elapsed_time(event)
        entry[2] += 1
    for key, (host, gpu, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:12]:
        lines.append(f"  {key:40s} calls {calls:3d}  host {host:7.2f} ms  gpu {gpu:7.2f} ms")
    clock0, event0 = marks[0][2], marks[0][3]
    last = len(model.model.layers) - 1
    stops = [f"layer {name.rsplit('.', 1)[1]}: host {(clock - clock0) * 1e3:.1f} ms, "
             f"gpu {event0.elapsed_time(event):.1f} ms" for name, where, clock, event in marks
             if where == "in" and name in {f"model.layers.{i}" for i in (0, 10, 20, last)}]
    lines.append("  progress: " + "; ".join(stops))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="3.9b")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--kinds", default="float,tq2")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("prefill_timeline needs a CUDA GPU")
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(dev)}; {args.model}; prompt {args.prompt}; batch 1; fp16")
    for kind in args.kinds.split(","):
        model = build_random_model(args.model, kind, torch.float16, dev, max_seq_len=args.prompt + 16)
        model.fuse_projections()
        gen = torch.Generator(device=dev).manual_seed(1)
        tokens = torch.randint(0, model.config.vocab_size, (1, args.prompt), device=dev, generator=gen)
        model.setup_cache(1, args.prompt + 16)
        with torch.inference_mode():
            for _ in range(3):
                model.prefill(tokens)
            for label in ("gc on", "gc off"):
                if label == "gc off":
                    gc.disable()
                try:
                    issued, whole, every = issue_times(model, tokens)
                finally:
                    gc.enable()
                print(f"{kind} {label}: host issue {issued:.2f} ms, forward {whole:.2f} ms (every issue: "
                      f"{', '.join(f'{t:.1f}' for t in every)})", flush=True)
            print(f"{kind} " + timeline(model, tokens), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
