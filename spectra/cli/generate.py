"""`spectra generate`: sample text from a checkpoint, streaming tokens as they come."""

from __future__ import annotations

import argparse
import sys

import torch

from ..checkpoint import load_checkpoint
from ..errors import DataError, DeviceError
from ..generate import generate
from ..tokenizer import eos_id, load_tokenizer
from .common import add_threads_option, apply_threads, default_device, parse_dtype


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint",
                              description="Continue a prompt with a checkpoint's model (KV cache, streaming).")
    p.add_argument("checkpoint", help="checkpoint directory (spectra or transformers LLaMA, with tokenizer.json)")
    p.add_argument("--prompt", default="The ", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float32 on CPU)")
    add_threads_option(p)
    p.add_argument("--compile", action="store_true",
                   help="CUDA: compile the decode step with torch.compile before capturing it (slower start, "
                        "faster tokens; worth it for long generations)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    if args.compile and not str(device).startswith("cuda"):
        raise DeviceError("--compile applies to CUDA decoding (a compiled, graph-captured step); drop it on CPU")
    apply_threads(args)
    tokenizer = load_tokenizer(args.checkpoint)
    model = load_checkpoint(args.checkpoint, device=device, dtype=parse_dtype(args.dtype))
    model.fuse_projections()  # q/k/v and gate/up as one product each: fewer, larger matmuls per token
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

    options = {}
    run_generate = generate
    if str(device).startswith("cuda"):
        # one-token steps replayed from a CUDA graph, so kernel launches don't dominate decoding
        from ..kernels.cudagraph import generate_cuda_graph as run_generate
        options["compile"] = args.compile
    run_generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, seed=args.seed, eos_id=eos_id(tokenizer), on_token=stream, **options)
    sys.stdout.write(tokenizer.decode(generated)[len(printed):] + "\n")
    return 0
