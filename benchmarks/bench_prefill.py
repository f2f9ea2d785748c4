"""Time to first token: the prompt's forward pass as `spectra.generate` runs it, packed kinds beside fp16 (CUDA).

    python benchmarks/bench_prefill.py --model 3.9b --prompts 128,512,2048 --kinds float,tq2,tq1

Random weights (the named shape, fused q/k/v and gate/up as `generate` fuses them), a KV cache of the prompt
plus 16 positions, batch 1 unless --batches says more. One trial = the prompt's forward with the cache
(``model.prefill(tokens)``, the call `generate` makes: the prompt attends to itself causally and its keys and
values go into the cache; with --all-logits every position's logits, as before `generate` asked for the last
only) and the greedy first token, timed with CUDA events around the
whole call (host work included, as a user waits for it); the median of --trials after two warm-up calls. Each
line also gives how long the host took to issue the call: when that is close to the whole, the prefill is
bound by host work (Python, launches), not by the GPU.
Packed layers at prefill-sized m take the dispatcher's large-m path (dequantize into cached fp16 scratch, then
cuBLAS), so the ratio to fp16 is the cost of that path. With --generate, each line also gives the wall-clock
time to the first token of ``spectra.generate_stream`` (its default path, all host work included).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spectra.bench import build_random_model


def random_prompt(model, batch: int, prompt: int, seed: int) -> torch.Tensor:
    """[batch, prompt] random token ids on the model's device."""
    dev = model.lm_head.weight.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, prompt), device=dev, generator=gen)


def time_prefill(model, batch: int, prompt: int, trials: int, last_only: bool = True) -> tuple[float, float]:
    """(seconds from the call to the first token on the GPU, seconds the host took to issue the call): medians.
    When the two are close, the prefill is bound by host work, not by the GPU."""
    tokens = random_prompt(model, batch, prompt, 1)
    model.setup_cache(batch, prompt + 16)
    times, issue = [], []
    with torch.inference_mode():
        for trial in range(trials + 2):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            begin.record()
            start = time.perf_counter()
            first = model.prefill(tokens, last_only=last_only)[:, -1].argmax(-1)
            issued = time.perf_counter() - start
            end.record()
            end.synchronize()
            if trial >= 2:
                times.append(begin.elapsed_time(end) / 1e3)
                issue.append(issued)
    assert first.shape == (batch,)
    model.clear_cache()
    return statistics.median(times), statistics.median(issue)


def time_generate_first_token(model, batch: int, prompt: int, trials: int) -> float:
    """Wall-clock seconds from calling ``generate_stream`` (default path: fused projections, graph-captured
    step) to holding its first token on the host: what a user of `spectra.generate` waits for, everything the
    library does before that token included. Median of `trials` after two warm-up calls."""
    from spectra.generate import generate_stream

    tokens = random_prompt(model, batch, prompt, 2)
    times = []
    for trial in range(trials + 2):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        stream = generate_stream(model, tokens, 16, temperature=0)
        next(stream)
        elapsed = time.perf_counter() - begin
        stream.close()
        if trial >= 2:
            times.append(elapsed)
    return statistics.median(times)


def profile_prefill(model, batch: int, prompt: int, rows: int = 15) -> str:
    """torch.profiler tables of one prefill (after a warm-up one): the ops with the most self CPU time, then
    the GPU kernels with the most device time; then the calls of one more prefill that made the host wait for
    the GPU (PyTorch's sync debug mode): a host issue time as long as the forward's points at one."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    tokens = random_prompt(model, batch, prompt, 3)
    model.setup_cache(batch, prompt + 16)
    with torch.inference_mode():
        model.prefill(tokens)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.prefill(tokens)
            torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model.prefill(tokens)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    model.clear_cache()
    syncs = sorted({f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught
                    if "synchroniz" in str(w.message)})
    averages = prof.key_averages()
    return (averages.table(sort_by="self_cpu_time_total", row_limit=rows) + "\n"
            + averages.table(sort_by="self_device_time_total", row_limit=rows) + "\n"
            + f"host waits for the GPU in one prefill: {len(syncs) or 'none'}\n" + "\n".join(syncs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="3.9b")
    p.add_argument("--kinds", default="float,tq2,tq1")
    p.add_argument("--prompts", default="128,512,2048")
    p.add_argument("--batches", default="1")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--all-logits", action="store_true", help="compute every position's logits (the old prefill)")
    p.add_argument("--profile", action="store_true",
                   help="also print the host-side profile of one prefill per kind (torch.profiler, top ops by self "
                        "CPU time): where a host-bound prefill spends its time")
    p.add_argument("--generate", action="store_true",
                   help="also time the first token of spectra.generate_stream (wall clock, all its host work)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_prefill needs a CUDA GPU")
    dev = torch.device("cuda")
    kinds = args.kinds.split(",")
    prompts = [int(v) for v in args.prompts.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    print(f"# {torch.cuda.get_device_name(dev)}; {args.model}; fp16 activations; median of {args.trials}; "
          f"{'all positions' if args.all_logits else 'last position'}'s logits")
    results, host = {}, {}
    for kind in kinds:
        model = build_random_model(args.model, kind, torch.float16, dev, max_seq_len=max(prompts) + 16)
        model.fuse_projections()
        for batch in batches:
            for prompt in prompts:
                results[kind, batch, prompt], host[kind, batch, prompt] = time_prefill(
                    model, batch, prompt, args.trials, not args.all_logits)
                print(f"{kind} batch {batch} prompt {prompt}: the forward {results[kind, batch, prompt] * 1e3:.2f} ms, "
                      f"of which the host took {host[kind, batch, prompt] * 1e3:.2f} ms to issue", flush=True)
                if args.profile:
                    print(profile_prefill(model, batch, prompt), flush=True)
                if args.generate:
                    first = time_generate_first_token(model, batch, prompt, args.trials)
                    print(f"{kind} batch {batch} prompt {prompt}: generate_stream's first token {first * 1e3:.2f} ms",
                          flush=True)
        del model
        torch.cuda.empty_cache()
    print("| batch | prompt | " + " | ".join(f"{k} ms" for k in kinds) + " | "
          + " | ".join(f"{k} vs float" for k in kinds if k != "float") + " |")
    print("|---" * (2 + len(kinds) + sum(k != "float" for k in kinds)) + "|")
    for batch in batches:
        for prompt in prompts:
            ms = [results[k, batch, prompt] * 1e3 for k in kinds]
            ratio = [results["float", batch, prompt] / results[k, batch, prompt] for k in kinds
                     if k != "float" and "float" in kinds]
            print(f"| {batch} | {prompt} | " + " | ".join(f"{v:.2f}" for v in ms) + " | "
                  + " | ".join(f"{r:.2f}x" for r in ratio) + " |")


if __name__ == "__main__":
    main()
