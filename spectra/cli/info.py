"""`spectra info`: parameters and size in bits of a model size or a checkpoint directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..block import is_block_linear_tensor
from ..checkpoint import checked_config, stored_tensor_bytes
from ..config import ModelConfig, get_config
from ..size import KIND_BITS, count_parameters, kv_cache_bytes, size_in_bits
from .common import human_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="parameters and size in bits of a model size or checkpoint",
                              description="Report parameter counts and size in bits/bytes for each weight kind. "
                                          "SOURCE is a size name (e.g. 3.9B, 99M, tiny) or a checkpoint directory.")
    p.add_argument("source", help="model size name or checkpoint directory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def stored_linear_bits(path: Path, config: ModelConfig) -> dict[str, float]:
    """Bytes actually stored for the block linear layers vs the rest, from the safetensors headers."""
    sizes = stored_tensor_bytes(path)
    linear_bytes = sum(n for name, n in sizes.items() if is_block_linear_tensor(name))
    other_bytes = sum(sizes.values()) - linear_bytes
    linear_params = count_parameters(config).linear
    return {"linear_bytes": linear_bytes, "other_bytes": other_bytes,
            "bits_per_linear_weight": 8 * linear_bytes / linear_params,
            "total_bytes": linear_bytes + other_bytes}


def info(source: str) -> dict:
    """The report `spectra info` prints, as a dict."""
    path = Path(source)
    stored = None
    if path.is_dir():
        config = checked_config(path)  # a config that disagrees with the files is an error, not a report
        stored = stored_linear_bits(path, config)
    else:
        config = get_config(source)
    counts = count_parameters(config)
    kinds = {kind: {"bits_per_linear_weight": bits, "size_bits": size_in_bits(config, kind),
                    "size_bytes": size_in_bits(config, kind) / 8} for kind, bits in KIND_BITS.items()}
    report = {"source": source, "config": config.to_dict(),
              "parameters": {"total": counts.total, "linear": counts.linear, "embedding": counts.embedding,
                             "lm_head": counts.lm_head, "norms": counts.norms},
              "kinds": kinds,
              "kv_cache_bytes_per_token": {name: kv_cache_bytes(config, 1, dtype)
                                           for name, dtype in (("float16", torch.float16), ("int8", torch.int8))}}
    if stored is not None:
        report["stored"] = stored
    return report


def run(args: argparse.Namespace) -> int:
    report = info(args.source)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    c, p = report["config"], report["parameters"]
    print(f"{args.source}: {p['total'] / 1e9:.3f}B parameters ({p['total'] / 1e6:.2f}M)  "
          f"hidden {c['hidden_size']}, GLU {c['intermediate_size']}, heads {c['num_heads']}, "
          f"layers {c['num_layers']}, vocab {c['vocab_size']}, model-parallel {c['model_parallel_size']}, "
          f"weight kind {c['weight_kind']}")
    print(f"  linear {p['linear'] / 1e6:.2f}M · embedding {p['embedding'] / 1e6:.2f}M · "
          f"lm head {p['lm_head'] / 1e6:.2f}M · norms {p['norms'] / 1e3:.1f}K")
    print(f"  {'kind':<10}{'bits/weight':>12}{'size (Gbit)':>14}{'size':>12}")
    for kind, row in report["kinds"].items():
        print(f"  {kind:<10}{row['bits_per_linear_weight']:>12.3f}{row['size_bits'] / 1e9:>14.3f}"
              f"{human_bytes(row['size_bytes']):>12}")
    kv = report["kv_cache_bytes_per_token"]
    print(f"  KV cache per sequence of {c['max_seq_len']} tokens: {human_bytes(kv['float16'] * c['max_seq_len'])} in "
          f"fp16, {human_bytes(kv['int8'] * c['max_seq_len'])} as int8 (--kv-cache int8)")
    if "stored" in report:
        s = report["stored"]
        print(f"  stored on disk: {human_bytes(s['total_bytes'])} "
              f"({s['bits_per_linear_weight']:.3f} bits per linear weight as stored)")
    return 0
