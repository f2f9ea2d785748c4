"""Tuned-table entries for the Gluon kernel from a ``gluon_probe.py`` log.

    python benchmarks/gluon_table.py LOG [--write]

For every (format, shape, m) of the log, the fastest correct Gluon variant, where it beat the portable kernel
timed in the same run, becomes an entry with ``configs.GLUON_KEY_SUFFIX`` (m = 1 also stands for the m = 2, 4,
8 buckets, which run the same MMA width; m = 16 for its own bucket). Prints them; with --write merges them into
the shipped ``spectra/kernels/tuned_configs.json``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch

from spectra.kernels import configs, tuning

# logs before 2026-12-07 also name a "late" loop, since removed as unsafe: only its "late 0" lines are read
_VARIANT = re.compile(r"gluon (tq[12]) (\d+)x(\d+) m=(\d+) (?:late (\d) )?BJ (\d+) split (\d+) .*: ([\d.]+) us")
_SHAPE = re.compile(r"(tq[12]) (\d+)x(\d+) m=(\d+): fp16 [\d.]+ \| tl ([\d.]+)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    text = Path(args.log).read_text()
    gpu = re.search(r"\] (NVIDIA [^;]+);", text).group(1)
    best: dict[tuple, tuple[float, configs.KernelConfig]] = {}
    portable: dict[tuple, float] = {}
    for line in text.splitlines():
        if (v := _VARIANT.search(line)):
            fmt, n, k, m, late, bj, split, us = v.groups()
            if late == "1":
                continue
            key = (fmt, int(n), int(k), int(m))
            cfg = configs.KernelConfig("gluon", 8 if int(m) <= 8 else 16, 64, int(bj), int(split))
            if key not in best or float(us) < best[key][0]:
                best[key] = (float(us), cfg)
        elif (s := _SHAPE.search(line)):
            fmt, n, k, m, tl = s.groups()
            portable[(fmt, int(n), int(k), int(m))] = float(tl)
    entries = {}
    for (fmt, n, k, m), (us, cfg) in sorted(best.items()):
        tl = portable.get((fmt, n, k, m))
        won = tl is not None and us < tl
        print(f"{fmt} {n}x{k} m={m}: gluon {us:.1f} us ({tuning.describe(cfg)}) vs portable {tl} us"
              f"{'' if won else ' (portable kept)'}")
        if won:
            for bucket in ((1, 2, 4, 8) if m <= 8 else (16,)):
                key = configs.config_key(fmt, n, k, bucket, torch.float16, 0, gpu) + configs.GLUON_KEY_SUFFIX
                entries[key] = asdict(cfg)
    print(f"{len(entries)} entries for {gpu}")
    if args.write:
        path = Path(configs.__file__).with_name("tuned_configs.json")
        table = json.loads(path.read_text())
        table.update(entries)
        path.write_text(json.dumps(table, indent=1, sort_keys=True))
        print(f"merged into {path}")


if __name__ == "__main__":
    main()
