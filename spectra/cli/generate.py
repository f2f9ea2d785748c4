"""`spectra generate`: sample text from a checkpoint, streaming tokens as they come."""

from __future__ import annotations

import argparse
import sys

import torch

from ..checkpoint import load_checkpoint, resolve_device
from ..errors import DataError
from ..generate import check_sampling, decode_plan, generate
from ..lora import load_adapter
from ..tokenizer import eos_id, load_tokenizer
from .common import (
    add_allow_nonfinite,
    add_kv_cache_option,
    add_threads_option,
    apply_threads,
    default_device,
    kv_cache_dtype,
    parse_dtype,
    seed_int,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint",
                              description="Continue a prompt with a checkpoint's model (KV cache, streaming).")
    p.add_argument("checkpoint", help="checkpoint directory (spectra or transformers LLaMA, with tokenizer.json)")
    p.add_argument("--prompt", default="The ", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=seed_int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float32 on CPU)")
    add_threads_option(p)
    add_kv_cache_option(p)
    p.add_argument("--compile", action="store_true",
                   help="CUDA: compile the decode step with torch.compile before capturing it (slower start; on "
                        "an H100 no faster than the default step, whose kernels are already fused)")
    p.add_argument("--no-fast", action="store_true",
                   help="CUDA: decode with the plain step-by-step loop instead of the fused, graph-captured step")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (spectra finetune --method lora) to "
                                                    "apply to the model")
    p.add_argument("--force-base", action="store_true",
                   help="apply --adapter even if it was trained on another base than CHECKPOINT (its recorded "
                        "weight fingerprint differs); prints a warning")
    add_allow_nonfinite(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device or default_device())  # an unknown or absent device fails here
    plan = decode_plan(device, fast=False if args.no_fast else None, compile=args.compile)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the terminal's encoding could not decode reach Python as surrogates
        raise DataError("--prompt is not valid UTF-8 text; set the terminal to UTF-8 or retype the prompt") from None
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)  # before the (slow) load
    apply_threads(args)
    tokenizer = load_tokenizer(args.checkpoint)
    model = load_checkpoint(args.checkpoint, device=device, dtype=parse_dtype(args.dtype),
                            allow_nonfinite=args.allow_nonfinite)
    if args.adapter:
        load_adapter(model, args.adapter, force=args.force_base, base=args.checkpoint)
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise DataError("the prompt encodes to no tokens; give a non-empty --prompt")
    if len(ids) >= model.config.max_seq_len:
        raise DataError(f"the prompt has {len(ids)} tokens; the model's maximum is {model.config.max_seq_len}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    generated: list[int] = []
    printed = ""

    def stream(token: torch.Tensor) -> None:
        nonlocal printed
        generated.append(int(token[0]))
        # Decode the whole continuation each time: byte-level BPE pieces may split UTF-8 characters.
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, seed=args.seed, eos_id=eos_id(tokenizer), on_token=stream, fast=plan.graph,
             compile=plan.compile, cache_dtype=kv_cache_dtype(args))
    sys.stdout.write(tokenizer.decode(generated)[len(printed):] + "\n")
    return 0
