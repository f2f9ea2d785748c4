"""`spectra eval ppl` (sliding-window perplexity) and `spectra eval tasks` (lm-evaluation-harness benchmarks)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..checkpoint import load_model, resolve_device
from ..errors import ConfigError
from ..eval.perplexity import load_eval_tokens, perplexity
from ..eval.results import RESULTS_FORMAT, describe_model, result_record, write_json
from ..io import check_output, json_recognizer
from ..tokenizer import load_tokenizer
from .common import (
    add_allow_nonfinite,
    add_force,
    add_threads_option,
    apply_threads,
    default_device,
    parse_dtype,
    seed_int,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="perplexity and lm-eval benchmarks of a checkpoint",
                              description="Evaluate a checkpoint: `ppl` for sliding-window perplexity on local "
                                          "data, `tasks` for lm-evaluation-harness benchmarks.")
    sub = p.add_subparsers(dest="eval_command", metavar="WHAT", required=True)

    ppl = sub.add_parser("ppl", help="sliding-window token-level perplexity",
                         description="Token-level perplexity with sliding windows over text files, a folder of "
                                     "them, .jsonl ({\"text\": ...} per line), .npy token ids or prepared shards.")
    _common(ppl)
    ppl.add_argument("--data", required=True, help="text file, folder, .jsonl, .npy or prepared-shard directory")
    ppl.add_argument("--protocol", choices=("sliding", "llama.cpp"), default="sliding",
                     help="sliding (default): every token scored once with --window/--stride; llama.cpp: as "
                          "llama.cpp's perplexity tool, disjoint --window (its -c) chunks, second half scored")
    ppl.add_argument("--window", type=int, help="tokens fed to the model per window (default: max_seq_len)")
    ppl.add_argument("--stride", type=int, help="new tokens scored per window (default: half the window)")
    ppl.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    ppl.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of the data")
    ppl.add_argument("--split", help="split of prepared shards (default: val, else train)")
    ppl.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ppl.set_defaults(func=run_ppl)

    tasks = sub.add_parser("tasks", help="lm-evaluation-harness tasks (the paper's zero-shot list by default)",
                           description="Run lm-evaluation-harness tasks. Datasets must be in the local Hugging "
                                       "Face cache (offline by default); a task that needs the hub is an error "
                                       "naming it, unless --skip-unavailable.")
    _common(tasks)
    tasks.add_argument("--tasks", help="comma-separated lm-eval task names (default: the Spectra paper's list)")
    tasks.add_argument("--include-path", help="folder of extra task YAMLs (e.g. local datasets)")
    tasks.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples (default 0, as the paper)")
    tasks.add_argument("--batch-size", type=int, default=16, help="requests per forward pass (default 16)")
    tasks.add_argument("--limit", type=float, help="evaluate only this many (or this fraction of) documents")
    tasks.add_argument("--skip-unavailable", action="store_true", help="skip tasks whose data is not local")
    tasks.add_argument("--online", action="store_true", help="allow datasets to download from the hub")
    tasks.add_argument("--seed", type=seed_int, default=1234, help="seed for few-shot sampling and sampled generation")
    tasks.set_defaults(func=run_tasks)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (any weight kind) with tokenizer.json")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp32 on CPU)")
    p.add_argument("--family", help="family label for `spectra compare` (default: from the weight kind)")
    p.add_argument("--name", help="model name in the result file (default: the directory name)")
    p.add_argument("--out", help="write the result JSON here (it is always printed)")
    add_force(p)
    add_allow_nonfinite(p)
    add_threads_option(p)


def _sources(args: argparse.Namespace) -> list[str]:
    """The inputs --out may never overwrite nor lie inside: the checkpoint and the evaluation data."""
    return [s for s in (args.checkpoint, getattr(args, "data", None), getattr(args, "include_path", None)) if s]


def _check_out(args: argparse.Namespace) -> None:
    """Refuse a bad --out before the (long) evaluation runs."""

    if args.out:
        check_output(args.out, "eval", force=args.force, kind="file", sources=_sources(args),
                     recognize=json_recognizer(lambda d: d.get("format") == RESULTS_FORMAT))


def _emit(record: dict[str, Any], args: argparse.Namespace) -> None:
    if args.out:
        write_json(record, args.out, force=args.force, sources=_sources(args))
    print(json.dumps(record, indent=2, default=str))


def run_ppl(args: argparse.Namespace) -> int:
    apply_threads(args)
    _check_out(args)
    model = load_model(args.checkpoint, device=args.device or default_device(), dtype=parse_dtype(args.dtype),
                       allow_nonfinite=args.allow_nonfinite)
    tokenizer = load_tokenizer(args.checkpoint) if Path(args.checkpoint, "tokenizer.json").is_file() else None
    tokens = load_eval_tokens(args.data, tokenizer, args.max_tokens, args.split)
    result = perplexity(model, tokens, args.window, args.stride, args.batch_size, progress=not args.no_progress,
                        protocol=args.protocol)
    metrics = {"perplexity": result.perplexity, "loss": result.loss, "bits_per_token": result.bits_per_token}
    details = {"data": str(args.data), "split": args.split, **result.to_dict()}
    _emit(result_record(describe_model(model, args.checkpoint, args.family, args.name), metrics, details), args)
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    try:
        from ..eval.harness import PAPER_TASKS, SpectraEvalLM, evaluate_tasks, flatten_metrics
    except ImportError as err:
        raise ConfigError(f"lm-evaluation-harness is not installed ({err}); install it with pip install lm-eval "
                          f"(or, in a clone of spectra, pip install -e \".[eval]\")") from None

    _check_out(args)
    apply_threads(args)
    if args.device:  # the harness adapter falls back to the CPU for lm-eval's default cuda:0; a user's choice must not
        resolve_device(args.device)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(PAPER_TASKS)
    if not names:
        raise ConfigError("--tasks is empty; name at least one lm-eval task")
    lm = SpectraEvalLM(args.checkpoint, device=args.device or default_device(), dtype=args.dtype,
                       batch_size=args.batch_size)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = evaluate_tasks(lm, names, include_path=args.include_path,
                             num_fewshot=args.num_fewshot, batch_size=args.batch_size, limit=limit,
                             skip_unavailable=args.skip_unavailable, online=args.online, seed=args.seed)
    details = {"tasks": names, "num_fewshot": args.num_fewshot, "limit": args.limit,
               "skipped_tasks": results.get("skipped_tasks", {}), "lm_eval_results": results.get("results", {}),
               "n_samples": results.get("n-samples", {})}
    record = result_record(describe_model(lm.model, args.checkpoint, args.family, args.name),
                           flatten_metrics(results), details)
    _emit(record, args)
    return 0
