"""`spectra finetune`: SFT or LoRA of a checkpoint on prompt/response pairs, chats or text; `--resume` continues."""

from __future__ import annotations

import argparse
import dataclasses

from ..errors import ConfigError
from ..finetune import FinetuneConfig, FinetuneResult, finetune
from ..lora import ALL_TARGETS, LoRAConfig
from ..train import TrainConfig
from .common import add_loop_flags

S = argparse.SUPPRESS  # unset flags stay absent: a resumed run keeps its saved values


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """The TrainConfig flags fine-tuning and conversion share with `spectra train`."""
    p.add_argument("--data", default=S, help=".jsonl of {prompt, response} / {messages} / {text}, a .txt file, "
                                              "or a prepared dataset directory")
    p.add_argument("--out", dest="out_dir", default=S, help="run directory (metrics.jsonl, checkpoints/, the result)")
    p.add_argument("--resume", default=None, help="run directory or checkpoint to continue from")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=S, help="optimizer steps (default 1000)")
    g.add_argument("--batch-size", type=int, default=S, help="packed rows per micro-batch (default 8)")
    g.add_argument("--grad-accum", type=int, default=S, help="micro-batches per step (default 1)")
    g.add_argument("--seq-len", type=int, default=S, help="tokens per packed row (default: model maximum)")
    g.add_argument("--lr", type=float, default=S, help="peak learning rate (default: by method, docs/finetuning.md)")
    g.add_argument("--warmup-steps", type=int, default=S, help="LR warm-up (default 5%% of the steps)")
    g.add_argument("--decay", choices=("cosine", "linear", "constant"), default=S, help="LR decay (default cosine)")
    g.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay (default 0.1; LoRA 0)")
    add_loop_flags(g)
    g.add_argument("--val-data", default=None, help="held-out examples (default: every k-th example of --data)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of --data (default 0.1)")
    g.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="render chats with spectra's template even when the tokenizer has one")


def train_options(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and k != "model"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune a checkpoint (SFT or LoRA) on examples",
                              description="Supervised fine-tuning of a TriLM or FloatLM checkpoint on prompt/response "
                                          "pairs, chat messages or text: loss on responses only, short examples "
                                          "packed without attention across them. A TriLM trains its latent weights "
                                          "and is frozen to exact trits at the end. --method lora trains low-rank "
                                          "adapters on the frozen (packed) base instead.")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory to fine-tune (not needed with --resume)")
    p.add_argument("--method", choices=("full", "lora"), default="full", help="every weight (default) or LoRA")
    add_training_flags(p)
    g = p.add_argument_group("LoRA (--method lora)")
    g.add_argument("--lora-rank", type=int, default=8, help="adapter rank r (default 8)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="update scale α / r (default α = 16)")
    g.add_argument("--lora-targets", default=",".join(ALL_TARGETS), help="comma-separated layer names (default all)")
    g.add_argument("--base-format", choices=("tq2", "tq1", "int8"), default="tq2",
                   help="a TriLM base stays packed in this format (default tq2; int8: unpacked trits)")
    p.add_argument("--pack", choices=("tq2", "tq1"), default=None, help="also pack the fine-tuned TriLM")
    p.set_defaults(func=run)


def task_from_args(args: argparse.Namespace, method: str, **extra) -> FinetuneConfig | None:
    if args.resume is not None:
        return None
    missing = [flag for flag, key in (("CHECKPOINT", "checkpoint"), ("--data", "data"), ("--out", "out_dir"))
               if getattr(args, key, None) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (or --resume DIR to continue a run)")
    return FinetuneConfig(checkpoint=args.checkpoint, method=method, val_data=args.val_data,
                          val_fraction=args.val_fraction, chat_template=args.chat_template, **extra)


def report(result: FinetuneResult) -> None:
    r = result.train
    before = f"{result.val_loss_before:.4f} -> " if result.val_loss_before is not None else ""
    after = f"{r.val_loss:.4f}" if r.val_loss is not None else "n/a (no held-out data)"
    print(f"step {r.step}: held-out loss {before}{after}, train loss {r.train_loss:.4f}, "
          f"{r.tokens_per_s:,.0f} tokens/s")
    print(f"{'adapter' if result.product.name == 'adapter' else 'model'}: {result.product}")


def run(args: argparse.Namespace) -> int:
    extra = {}
    if args.method == "lora":
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        extra["lora"] = dataclasses.asdict(LoRAConfig(args.lora_rank, args.lora_alpha, targets))
        extra["base_format"] = args.base_format
    extra["pack"] = args.pack
    task = task_from_args(args, args.method, **extra)
    result = finetune(task, resume=args.resume, **train_options(args))
    report(result)
    return 0
