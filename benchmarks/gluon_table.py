"""Tuned-table entries for the Gluon kernel from a ``gluon_probe.py`` log.

    python benchmarks/gluon_table.py LOG [--write]

For every (format, shape, m) of the log, the fastest correct mma.sync variant of the Gluon kernel, where it
beat the portable kernel timed in the same run, becomes an entry with ``configs.GLUON_KEY_SUFFIX`` for the m
buckets from the probed m up to the next probed m (probing m = 1, 8, 16 fills the buckets 1, 2, 4 / 8 / 16: the
kernel's time barely depends on m below its MMA width, while the portable kernel's grows with m, so a win at
the probed m holds above it). wgmma lines (and logs from before the mma.sync
kernel) are references and give no entries. Prints them; with --write merges them into the shipped
``spectra/kernels/tuned_configs.json``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch

from spectra.kernels import configs, tuning

_VARIANT = re.compile(r"gluon (?:(sync|wgmma) )?(tq[12]) (\d+)x(\d+) m=(\d+) (?:late \d )?BJ (\d+) (?:W (\d+) )?"
                      r"split (\d+) .*: ([\d.]+) us")
_SHAPE = re.compile(r"(tq[12]) (\d+)x(\d+) m=(\d+): fp16 [\d.]+ \| tl ([\d.]+)")


def entries_from_log(text: str) -> tuple[dict[str, dict], list[str]]:
    """(tuned-table entries, one report line per probed shape) from a probe log's text."""
    gpu = re.search(r"\] (NVIDIA [^;]+);", text).group(1)
    best: dict[tuple, tuple[float, configs.KernelConfig]] = {}
    portable: dict[tuple, float] = {}
    for line in text.splitlines():
        if (v := _VARIANT.search(line)):
            mma, fmt, n, k, m, bj, w, split, us = v.groups()
            if mma != "sync":
                continue
            key = (fmt, int(n), int(k), int(m))
            cfg = configs.KernelConfig("gluon", 8 if int(m) <= 8 else 16, 16 * int(w), int(bj), int(split), int(w))
            if key not in best or float(us) < best[key][0]:
                best[key] = (float(us), cfg)
        elif (s := _SHAPE.search(line)):
            fmt, n, k, m, tl = s.groups()
            portable[(fmt, int(n), int(k), int(m))] = float(tl)
    entries, report = {}, []
    probed = sorted({m for (_, _, _, m) in best})
    for (fmt, n, k, m), (us, cfg) in sorted(best.items()):
        tl = portable.get((fmt, n, k, m))
        won = tl is not None and us < tl
        report.append(f"{fmt} {n}x{k} m={m}: gluon {us:.1f} us ({tuning.describe(cfg)}) vs portable {tl} us"
                      f"{'' if won else ' (portable kept)'}")
        if won:
            nxt = next((p for p in probed if p > m), cfg.block_m + 1)  # never past the MMA width
            for bucket in (b for b in configs.M_BUCKETS if m <= b < nxt and b <= cfg.block_m):
                key = configs.config_key(fmt, n, k, bucket, torch.float16, 0, gpu) + configs.GLUON_KEY_SUFFIX
                entries[key] = asdict(cfg)
    report.append(f"{len(entries)} entries for {gpu}")
    return entries, report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    entries, report = entries_from_log(Path(args.log).read_text())
    print("\n".join(report))
    if args.write:
        path = Path(configs.__file__).with_name("tuned_configs.json")
        table = json.loads(path.read_text())
        table.update(entries)
        path.write_text(json.dumps(table, indent=1, sort_keys=True))
        print(f"merged into {path}")


if __name__ == "__main__":
    main()
