"""Float -> ternary conversion at a larger size: pretrain a FloatLM briefly, convert it with the teacher,
print one table (held-out losses and training tokens/s of both phases).

    python benchmarks/convert_table.py --data runs/demo/data --model 99M --float-steps 200 --convert-steps 200

The data is any prepared dataset (the demo's Shakespeare shards are what docs/finetuning.md used); the
model is a preset with its vocabulary matched to the data's tokenizer. On CUDA the loop trains in bf16
autocast with fp32 master weights, as `spectra train` does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import spectra
from spectra.finetune import FinetuneConfig, finetune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="runs/convert_table")
    p.add_argument("--model", default="99M")
    p.add_argument("--float-steps", type=int, default=200)
    p.add_argument("--convert-steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=100, help="ternarization warm-up steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()

    out = Path(args.out)
    vocab = spectra.TokenDataset(args.data).vocab_size
    common = dict(data=args.data, batch_size=args.batch_size, seq_len=args.seq_len, eval_batches=args.eval_batches,
                  eval_every=0, save_every=0, keep_last=1, progress=False)
    started = time.perf_counter()
    pre = spectra.train(out_dir=str(out / "float"), model=args.model, kind="float", steps=args.float_steps,
                        model_overrides={"vocab_size": vocab, "max_seq_len": args.seq_len},
                        export_dir=str(out / "floatlm"), **common)
    rows = [{"run": f"FloatLM {args.model} pretrain", "steps": pre.step, "val_loss": pre.val_loss,
             "tokens_per_s": pre.tokens_per_s}]
    task = FinetuneConfig(checkpoint=str(out / "floatlm"), method="convert", ternary_warmup=args.warmup,
                          teacher=True)
    conv = finetune(task, out_dir=str(out / "convert"), steps=args.convert_steps, echo=lambda s: None, **common)
    rows.append({"run": f"-> TriLM (warm-up {args.warmup}, teacher)", "steps": conv.train.step,
                 "val_loss": conv.train.val_loss, "tokens_per_s": conv.train.tokens_per_s,
                 "val_loss_before": conv.val_loss_before})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}; model {args.model} (vocab {vocab}); batch {args.batch_size} x {args.seq_len}; "
          f"total {time.perf_counter() - started:.0f} s")
    print(f"{'run':44} {'steps':>6} {'val loss':>9} {'tokens/s':>11}")
    for r in rows:
        print(f"{r['run']:44} {r['steps']:>6} {r['val_loss']:>9.4f} {r['tokens_per_s']:>11,.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
