"""`spectra train`: pretrain a TriLM or FloatLM on prepared data; `--resume` continues a run."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..train import TrainConfig, train
from ..train.loop import is_main_process
from .common import add_loop_flags

S = argparse.SUPPRESS  # unset flags stay absent, so a resumed run keeps its saved values


def _fraction_or_none(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "no") else float(text)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="pretrain a TriLM or FloatLM",
                              description="Pretrain a TriLM (--kind ternary, with the Spectra schedule) or a FloatLM "
                                          "(--kind float, AdamW + cosine) on data from `spectra data prepare`. "
                                          "With --resume DIR the saved configuration is used; flags given "
                                          "override it.")
    p.add_argument("--data", default=S, help="prepared dataset directory")
    p.add_argument("--out", dest="out_dir", default=S, help="run directory (metrics.jsonl, checkpoints/)")
    p.add_argument("--resume", default=None, help="run directory or checkpoint to continue from")
    p.add_argument("--model", default=S, help="preset (tiny, mini, 99M ... 3.9B) or checkpoint to start from")
    p.add_argument("--kind", choices=("ternary", "float"), default=S, help="TriLM or FloatLM (default ternary)")
    p.add_argument("--vocab-size", type=int, default=S, help="override the preset's vocabulary size")
    p.add_argument("--max-seq-len", type=int, default=S, help="override the preset's maximum sequence length")
    g = p.add_argument_group("batches")
    g.add_argument("--steps", type=int, default=S, help="optimizer steps (default 1000)")
    g.add_argument("--batch-size", type=int, default=S, help="sequences per micro-batch (default 8)")
    g.add_argument("--grad-accum", type=int, default=S, help="micro-batches per step (default 1)")
    g.add_argument("--seq-len", type=int, default=S, help="tokens per sequence (default: model maximum)")
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--lr", type=float, default=S, help="peak learning rate (default 2.4e-3 ternary, 1e-3 float)")
    g.add_argument("--min-lr-ratio", type=float, default=S, help="final LR / peak LR (default 0.1)")
    g.add_argument("--warmup-steps", type=int, default=S, help="default: 1%% of the steps")
    g.add_argument("--decay", choices=("cosine", "linear", "constant"), default=S,
                   help="LR decay (default linear for ternary, cosine for float)")
    g.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay (default 0.1)")
    g.add_argument("--betas", type=float, nargs=2, default=S, help="AdamW betas (default 0.9 0.95)")
    g.add_argument("--grad-clip", type=float, default=S, help="max gradient norm (default 1.0; 0 disables)")
    g.add_argument("--schedule", choices=("auto", "spectra", "plain"), default=S,
                   help="spectra: TriLM phases; plain: none; auto (default): spectra for ternary")
    g.add_argument("--lr-drop-at", type=_fraction_or_none, default=S,
                   help="fraction of training where the peak LR drops (default 0.5; 'none' disables)")
    g.add_argument("--lr-drop-scale", type=float, default=S, help="peak LR factor after the drop (default 0.625)")
    g.add_argument("--wd-off-at", type=_fraction_or_none, default=S,
                   help="fraction of training where weight decay stops (default 0.667; 'none' disables)")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--keep-last", type=int, default=S, help="checkpoints kept (default 3)")
    g.add_argument("--export", dest="export_dir", default=S, help="also save the final model here")
    g.add_argument("--force", action="store_true", help="write a new run into a non-empty directory that is not a "
                   "run, and replace an --export path that is not an earlier export")
    g = p.add_argument_group("runtime")
    add_loop_flags(g)
    g.add_argument("--compile", action="store_true", default=S, help="torch.compile the model")
    g.add_argument("--on-nan", choices=("stop", "skip"), default=S, help="non-finite loss: stop (default) or skip")
    g = p.add_argument_group("parallelism (launch with `torchrun --nproc-per-node DP*TP -m spectra train ...`)")
    g.add_argument("--dp", type=int, default=S, help="data-parallel ranks (default 1); --batch-size is split over them")
    g.add_argument("--tp", type=int, default=S, help="tensor-parallel ranks (default 1); a TriLM keeps one scale "
                                                      "per shard")
    g.add_argument("--dp-mode", choices=("fsdp", "ddp"), default=S, help="FSDP2 (default) or DDP for --dp")
    p.set_defaults(func=run)


def config_options(args: argparse.Namespace) -> dict:
    """TrainConfig fields given on the command line."""
    given = dict(vars(args))
    overrides = {k: given.pop(k) for k in ("vocab_size", "max_seq_len") if k in given}
    options = {k: v for k, v in given.items() if k in TrainConfig.__dataclass_fields__}
    if overrides:
        options["model_overrides"] = overrides
    if options.get("grad_clip") == 0:
        options["grad_clip"] = None
    return options


def run(args: argparse.Namespace) -> int:
    options = config_options(args)
    if args.resume is None:
        missing = [flag for flag, key in (("--data", "data"), ("--out", "out_dir")) if key not in options]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} required (or --resume DIR to continue a run)")
    result = train(resume=args.resume, force=args.force, **options)
    if not is_main_process():
        return 0
    print(f"step {result.step}: train loss {result.train_loss:.4f}"
          + (f", val loss {result.val_loss:.4f}" if result.val_loss is not None else "")
          + f", {result.tokens_per_s:,.0f} tokens/s")
    print(f"checkpoint: {result.checkpoint}" + (f"\nexported: {result.export_dir}" if result.export_dir else ""))
    return 0
