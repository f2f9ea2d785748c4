"""Distributed pretraining on GPUs: the DP/TP equivalence check on NCCL, then a throughput table.

    python benchmarks/bench_distributed.py                 # on a node with 2 GPUs (1.1B TriLM and FloatLM)
    python benchmarks/bench_distributed.py --device cpu --size tiny --seq 64 --micro-batch 2   # smoke test

The script launches itself under torchrun for each configuration (1 GPU; 2 GPUs FSDP2; 2 GPUs TP), so one
command gives the whole table. Throughput rows: tokens/s (all GPUs), MFU, step time, peak memory, and the
TriLM/FloatLM step-time ratio of the same configuration (target <= 1.10). MFU counts 6 FLOPs per weight per
token (linear layers and lm head) plus attention's 12 * layers * hidden * seq, against the GPU's dense
bf16 peak. Data is random tokens: the timing does not depend on the text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from spectra import SpectraLM, count_parameters, get_config
from spectra.checkpoint import load_checkpoint
from spectra.distributed import (
    ParallelContext,
    barrier,
    clip_grad_norm_,
    config_for_tensor_parallel,
    init_parallel,
    local_batch,
    mean_over_data_parallel,
    parallelize,
    save_training_checkpoint,
)

# Dense bf16 tensor-core peaks (SXM parts), FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
CHECK_TOL = 1e-4  # loss difference allowed between 2-GPU and 1-GPU runs (fp32, TF32 off)


# --- workers (run under torchrun) -----------------------------------------------------------------

def check_worker(args: argparse.Namespace) -> dict:
    """Tiny TriLM with 2 scales per matrix: DP=2 (FSDP2) and TP=2 losses vs one process; TP checkpoint logits."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report: dict = {}
    ctx = init_parallel(dp=2, tp=1, device=args.device)
    report["dp2_fsdp"] = _tiny_run(ctx)[1]
    ctx = init_parallel(dp=1, tp=2, device=args.device)
    model, report["tp2"] = _tiny_run(ctx)
    tokens = _tiny_batch(99, ctx.device)[:, :-1]
    with torch.no_grad():
        tp_logits = model.eval()(tokens).float().cpu()
    ckpt = Path(args.out).with_suffix(".tp2-ckpt")
    save_training_checkpoint(ckpt, model, None, ctx, meta={"step": 8})
    if ctx.is_main:
        single = ParallelContext(0, 1, 0, ctx.device, 1, 1, None)
        report["single"] = _tiny_run(single)[1]
        with torch.no_grad():
            loaded = load_checkpoint(ckpt, device=ctx.device, dtype=torch.float32)
            report["tp2_checkpoint_max_logit_diff"] = (loaded(tokens).float().cpu() - tp_logits).abs().max().item()
        for name in ("dp2_fsdp", "tp2"):
            report[f"{name}_max_loss_diff"] = max(abs(a - b) for a, b in zip(report[name], report["single"]))
        report["passed"] = (max(report["dp2_fsdp_max_loss_diff"], report["tp2_max_loss_diff"]) <= CHECK_TOL
                            and report["tp2_checkpoint_max_logit_diff"] <= 1e-4)
    barrier(ctx)
    return report


def _tiny_batch(step: int, device: torch.device) -> torch.Tensor:
    corpus = torch.randint(0, 1024, (97,), generator=torch.Generator().manual_seed(7)).repeat(8)
    starts = torch.randint(0, corpus.numel() - 65, (8,), generator=torch.Generator().manual_seed(1000 + step))
    return torch.stack([corpus[s:s + 65] for s in starts.tolist()]).to(device)


def _tiny_run(ctx: ParallelContext, steps: int = 8) -> tuple[SpectraLM, list[float]]:
    torch.manual_seed(0)
    config = get_config("tiny", weight_kind="ternary", model_parallel_size=2)
    model = SpectraLM(config).to(ctx.device)
    parallelize(model, ctx)
    # eps 1e-6: Adam with 1e-8 turns reduction-order noise in near-zero gradients into lr-sized steps.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6, weight_decay=0.1, foreach=False)
    losses = []
    for step in range(steps):
        batch = local_batch(_tiny_batch(step, ctx.device), ctx)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        clip_grad_norm_(model, 0.5, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(mean_over_data_parallel(loss, ctx).item())
    return model, losses


def throughput_worker(args: argparse.Namespace) -> dict:
    """Time FloatLM and TriLM training steps on this mesh (FSDP2 bf16 compute, fp32 master weights)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    ctx = init_parallel(dp=args.dp, tp=args.tp, device=args.device)
    rows = []
    for kind in ("float", "ternary"):
        config = config_for_tensor_parallel(get_config(args.size, weight_kind=kind, max_seq_len=args.seq), args.tp)
        torch.manual_seed(0)
        with torch.device(ctx.device):
            model = SpectraLM(config)
        dtype = torch.bfloat16 if ctx.device.type == "cuda" else None
        parallelize(model, ctx, param_dtype=dtype, compile=args.compile == "on")
        # foreach=False as in spectra.train: under TP the plain (embedding, norms) and DTensor parameters
        # cannot share one multi-tensor kernel.
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=False)
        gen = torch.Generator(device=ctx.device).manual_seed(1)
        global_batch = args.micro_batch * args.dp
        step_times = []
        for step in range(args.warmup + args.steps):
            tokens = torch.randint(0, config.vocab_size, (global_batch, args.seq + 1), device=ctx.device,
                                   generator=gen)
            batch = local_batch(tokens, ctx)
            _sync(ctx)
            start = time.perf_counter()
            _, loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            clip_grad_norm_(model, 1.0, ctx)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(ctx)
            if step >= args.warmup:
                step_times.append(time.perf_counter() - start)
        step_s = sorted(step_times)[len(step_times) // 2]  # median: robust to one slow step
        if args.profile and ctx.device.type == "cuda":  # every rank steps (collectives), rank 0 prints
            _print_profile(model, opt, batch, f"{kind} dp={args.dp} tp={args.tp}", ctx.is_main)
        tokens_per_step = global_batch * args.seq
        rows.append({"kind": kind, "size": args.size, "gpus": ctx.world_size, "dp": args.dp, "tp": args.tp,
                     "compile": args.compile, "step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
                     "flops_per_token": flops_per_token(config, args.seq),
                     "peak_mem_gb": (torch.cuda.max_memory_allocated() / 1e9 if ctx.device.type == "cuda"
                                     else float("nan")),
                     "loss": mean_over_data_parallel(loss, ctx).item()})
        del model, opt
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return {"rows": rows, "device": _device_name(ctx.device)}


def _print_profile(model, opt, batch: torch.Tensor, label: str, main: bool) -> None:
    """One more forward + backward under torch.profiler: the ops that take the device time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    if not main:
        return
    print(f"profile of one forward + backward, {label}", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60), flush=True)


def _sync(ctx: ParallelContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    barrier(ctx)


def flops_per_token(config, seq: int) -> float:
    """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention scores and values."""
    counts = count_parameters(config)
    return 6 * (counts.linear + counts.lm_head) + 12 * config.num_layers * config.hidden_size * seq


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# --- launcher -------------------------------------------------------------------------------------

CONFIGS = {"1gpu": (1, 1, 1), "fsdp": (2, 2, 1), "tp": (2, 1, 2)}  # name: (processes, dp, tp)


def launch(args: argparse.Namespace, worker: str, nproc: int, dp: int = 1, tp: int = 1,
           compile_mode: str = "off") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", __file__, "--worker", worker,
               "--out", str(out), "--dp", str(dp), "--tp", str(tp), "--compile", compile_mode,
               "--size", args.size, "--seq", str(args.seq), "--micro-batch", str(args.micro_batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
        cmd += ["--profile"] if args.profile else []
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-4000:]
            return {"error": f"{worker} on {nproc} process(es) dp={dp} tp={tp} failed:\n{tail}"}
        if args.profile:
            print(proc.stdout, flush=True)
        return json.loads(out.read_text())


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def table(rows: list[dict], peak: float | None) -> str:
    lines = ["| model | GPUs | mesh | compile | step (s) | tokens/s | tokens/s/GPU | MFU | peak mem (GB) | "
             "TriLM/FloatLM step time |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["gpus"], r["dp"], r["tp"], r["compile"], r["kind"]): r for r in rows}
    for r in rows:
        per_gpu = r["tokens_per_s"] / r["gpus"]
        mfu = f"{100 * per_gpu * r['flops_per_token'] / peak:.1f}%" if peak else "n/a"
        ratio = ""
        if r["kind"] == "ternary":
            base = by_key.get((r["gpus"], r["dp"], r["tp"], r["compile"], "float"))
            ratio = f"{r['step_s'] / base['step_s']:.3f}" if base else ""
        name = f"{'TriLM' if r['kind'] == 'ternary' else 'FloatLM'} {r['size']}"
        mesh = f"dp={r['dp']} tp={r['tp']}" + (" (FSDP2)" if r["dp"] > 1 else "")
        lines.append(f"| {name} | {r['gpus']} | {mesh} | {r['compile']} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {per_gpu:,.0f} | {mfu} | {r['peak_mem_gb']:.1f} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1.1B", help="model size preset (default 1.1B, the suite's ~1B TriLM)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per data-parallel rank per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", choices=("off", "on", "both"), default="both",
                   help="torch.compile each block (fuses the ternarization); 'both' measures each way")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    p.add_argument("--skip-check", action="store_true", help="skip the NCCL equivalence check")
    p.add_argument("--max-gpus", type=int, default=2, help="run only the configurations with at most this many GPUs")
    p.add_argument("--meshes", default="1gpu,fsdp,tp",
                   help="comma-separated configurations to time: 1gpu, fsdp (dp=2), tp (tp=2)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per run (GPU)")
    p.add_argument("--worker", choices=("check", "throughput"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--dp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    unknown = set(args.meshes.split(",")) - set(CONFIGS)
    if unknown:
        p.error(f"unknown --meshes {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGS)}")

    if args.worker:
        result = check_worker(args) if args.worker == "check" else throughput_worker(args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(result))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 0

    report: dict = {}
    if not args.skip_check:
        report["check"] = launch(args, "check", 2)
        check = report["check"]
        if "error" in check:
            print(check["error"])
        else:
            print(f"equivalence (tiny TriLM, 2 scales/matrix, 8 AdamW steps, fp32, TF32 off): "
                  f"DP=2 FSDP2 max |dloss| {check['dp2_fsdp_max_loss_diff']:.2e}, "
                  f"TP=2 max |dloss| {check['tp2_max_loss_diff']:.2e}, "
                  f"TP=2 checkpoint -> 1 process max |dlogit| {check['tp2_checkpoint_max_logit_diff']:.2e}: "
                  f"{'PASS' if check['passed'] else 'FAIL'}")
    modes = ("off", "on") if args.compile == "both" else (args.compile,)
    rows, device = [], "?"
    for compile_mode in modes:
        for name in args.meshes.split(","):
            nproc, dp, tp = CONFIGS[name]
            if nproc > args.max_gpus:
                continue
            result = launch(args, "throughput", nproc, dp, tp, compile_mode)
            if "error" in result:
                print(result["error"])
                continue
            rows += result["rows"]
            device = result["device"]
            steps = ", ".join(f"{r['kind']} {r['step_s']:.3f} s/step" for r in result["rows"])
            print(f"done: {nproc} process(es) dp={dp} tp={tp} compile={compile_mode}: {steps}", flush=True)
    peak = peak_flops(device, args.peak_tflops)
    print(f"\n{device}; MFU against {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else f"\n{device}")
    print(table(rows, peak))
    report.update({"device": device, "peak_flops": peak, "rows": rows})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    failed = "check" in report and not report["check"].get("passed", False)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
