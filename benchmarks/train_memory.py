"""The training-step memory estimate (spectra.train.memory) against the measured peak of real CPU steps.

Each configuration runs in a fresh process: it reads its resident memory after the imports and the dataset,
builds the model, optimizer and loader as `train()` does, runs two optimizer steps (the second holds the AdamW
moments and the activations together), and reports the growth of its peak resident memory
(`resource.getrusage(...).ru_maxrss`). The table gives the estimate, the measured growth and their ratio;
the estimate is meant to be above the measurement by at most ~1.5x.

    PYTHONPATH=$PWD python benchmarks/train_memory.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = [  # (preset, kind, batch size, seq len, packed documents as fine-tuning's rows)
    ("tiny", "ternary", 8, 128, False),
    ("tiny", "ternary", 64, 256, False),
    ("tiny", "float", 64, 256, False),
    ("mini", "ternary", 8, 256, False),
    ("mini", "ternary", 32, 512, False),
    ("mini", "float", 32, 512, False),
    ("99M", "ternary", 4, 512, False),
    ("mini", "ternary", 8, 512, True),
    ("mini", "ternary", 16, 256, True),
    ("mini", "float", 32, 512, True),
]
DOCUMENT_TOKENS = 100  # packed rows: a new document every 100 tokens


class PackedRows:
    """Windows with document ids, as fine-tuning's packed examples come (spectra.finetune.data)."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def next_batch(self) -> tuple:
        import torch

        inputs, targets = self.loader.next_batch()
        documents = (torch.arange(inputs.shape[1]) // DOCUMENT_TOKENS).expand_as(inputs).contiguous()
        return inputs, targets, documents


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(data: str, preset: str, kind: str, batch: int, seq_len: int, docs: bool, threads: int) -> dict:
    """One configuration, in this process: peak resident growth over two steps, and the estimate."""
    import torch

    from spectra.data import TokenDataset, WindowLoader
    from spectra.train import TrainConfig
    from spectra.train.memory import estimate_step_memory, planned_model_config
    from spectra.train.step import build_model, build_optimizer, train_step
    torch.set_num_threads(threads)
    cfg = TrainConfig(data=data, out_dir="unused", model=preset, kind=kind, batch_size=batch, seq_len=seq_len,
                      steps=2, device="cpu")
    dataset = TokenDataset(data)
    base = rss_now()
    model = build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg)
    loader = WindowLoader(dataset, "train", seq_len, batch, seed=0)
    loader = PackedRows(loader) if docs else loader
    schedule = cfg.make_schedule()
    for step in range(2):
        train_step(model, optimizer, loader, cfg, schedule, step, torch.device("cpu"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    estimate = estimate_step_memory(planned_model_config(cfg), batch, seq_len, ternary=kind == "ternary",
                                    document_masks=docs)
    return {"measured": peak - base, "estimate": estimate.total, "terms": estimate.describe()}


def prepare(root: Path, vocab: int) -> str:
    from spectra.data import prepare_data
    from spectra.tokenizer import train_tokenizer

    text = [f"line {i}: the quick brown fox {i % 97} jumps over the lazy dog {i % 13}" for i in range(20000)]
    (root / "corpus.txt").write_text("\n".join(text))
    tok = train_tokenizer(text, vocab_size=vocab)
    return str(prepare_data(root / "corpus.txt", root / "data", tokenizer=tok, progress=False).path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one JSON configuration in this process
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(measure(**spec, threads=args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(Path(tmp), 1024)
        print(f"{'model':>5} {'kind':>7} {'batch':>5} {'seq':>4} {'docs':>4} {'estimate MB':>11} "
              f"{'measured MB':>11} {'ratio':>5}  largest terms")
        for preset, kind, batch, seq_len, docs in CONFIGS:
            spec = {"data": data, "preset": preset, "kind": kind, "batch": batch, "seq_len": seq_len, "docs": docs}
            out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--one", json.dumps(spec)],
                                 check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"{preset:>5} {kind:>7} {batch:>5} {seq_len:>4} {'yes' if docs else 'no':>4} "
                  f"{row['estimate'] / 1e6:>11.1f} "
                  f"{row['measured'] / 1e6:>11.1f} {row['estimate'] / row['measured']:>5.2f}  {row['terms']}")


if __name__ == "__main__":
    main()
