import json
import math

import numpy as np
import pytest
import torch
from eval_support import save_tiny_checkpoint, tiny_model

from spectra import ConfigError
from spectra.cli.main import main
from spectra.eval import analyze_weights, entropy_of_counts, plot_weight_stats, shannon_entropy, stats_table
from spectra.ternary import ternarize


def test_entropy_of_uniform_discrete_values_is_log2_k():
    for k in (2, 3, 5, 16):
        values = torch.arange(k, dtype=torch.float32).repeat(37)
        assert shannon_entropy(values, bins=k) == pytest.approx(math.log2(k), abs=1e-12)


def test_entropy_of_dyadic_distribution():
    # p = (1/2, 1/4, 1/8, 1/8): H = 1/2 + 2/4 + 3/8 + 3/8 = 1.75 bits.
    values = torch.tensor([-1.0] * 40 + [0.0] * 20 + [1.0] * 10 + [2.0] * 10)
    assert shannon_entropy(values, bins=4) == pytest.approx(1.75, abs=1e-12)
    # Ternary weights {-s, 0, s} need no more than log2(3) bits at any bin count.
    trits = torch.tensor([-0.3] * 25 + [0.0] * 50 + [0.3] * 25)
    assert all(shannon_entropy(trits, b) == pytest.approx(1.5, abs=1e-12) for b in (3, 16, 1024))
    assert entropy_of_counts(np.array([5, 0, 5])) == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        entropy_of_counts(np.zeros(3))


def test_entropy_of_gaussian_matches_differential_entropy():
    # For fine bins of width w, H ≈ h(X) - log2(w) with h(N(0, s^2)) = 1/2 log2(2 pi e s^2).
    sigma = 0.37
    values = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)) * sigma
    bins = 400
    width = (values.max() - values.min()).item() / bins
    expected = 0.5 * math.log2(2 * math.pi * math.e * sigma**2) - math.log2(width)
    assert shannon_entropy(values, bins) == pytest.approx(expected, abs=0.01)


def test_stats_of_ternary_and_float_models():
    tri = tiny_model("ternary", seed=5)
    stats = analyze_weights(tri, entropy_bins=(2, 8, 64))
    layers = tri.linear_layers()
    assert [s.name for s in stats] == list(layers)
    for s, module in zip(stats, layers.values()):
        w = module.dense_weight().float()
        assert s.std == pytest.approx(w.std().item(), rel=1e-6)
        assert s.zero_fraction == pytest.approx((module.trits == 0).float().mean().item())
        assert s.entropy[64] <= math.log2(3) + 1e-9 and s.entropy[2] <= 1.0
        assert sum(s.hist_counts) == w.numel()  # trits / abs-mean fit the histogram range
    flt = tiny_model("float", seed=5)
    fstats = analyze_weights(flt, entropy_bins=(8,))
    for s, module in zip(fstats, flt.linear_layers().values()):
        trits, _ = ternarize(module.weight, module.parts, module.shard_axis)
        assert s.zero_fraction == pytest.approx((trits == 0).float().mean().item())
        assert s.entropy[8] > math.log2(3)  # a Gaussian spreads over more than three bins
    table = stats_table(stats)
    assert "L0.self_attn.q_proj" in table and "H@64" in table


def test_plot_and_cli(tmp_path, capsys):
    stats = {"tri": analyze_weights(tiny_model("ternary", seed=6)), "float": analyze_weights(tiny_model("float"))}
    png = plot_weight_stats(stats, tmp_path / "w.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = save_tiny_checkpoint(tmp_path / "trilm", seed=6)
    out_png, out_json = tmp_path / "cli.png", tmp_path / "stats.json"
    assert main(["analyze", "weights", str(ckpt), "--bins", "4,32", "--plot", str(out_png),
                 "--json", str(out_json)]) == 0
    assert "H@32" in capsys.readouterr().out and out_png.stat().st_size > 1000
    data = json.loads(out_json.read_text())["trilm"]
    assert len(data["layers"]) == 14 and set(data["mean_entropy"]) == {"4", "32"}
    layer = data["layers"][0]
    assert len(layer["hist_counts"]) + 1 == len(data["histogram_edges_over_abs_mean"])
    assert sum(layer["hist_counts"]) == layer["shape"][0] * layer["shape"][1]
    assert main(["analyze", "weights", str(ckpt), "--bins", "4,x"]) == 2


def test_packed_and_quantized_layers_are_analysed():
    packed = pytest.importorskip("spectra.convert")
    tri = tiny_model("ternary", seed=8)
    reference = analyze_weights(tri, entropy_bins=(8,))
    packed.pack_model(tri, "tq1")
    unfused = analyze_weights(tri, entropy_bins=(8,))
    tri.fuse_projections()  # as spectra.generate leaves a GPU model: still analysed layer by layer
    for got in (unfused, analyze_weights(tri, entropy_bins=(8,))):
        assert [s.name for s in got] == [s.name for s in reference]
        for a, b in zip(reference, got, strict=True):
            assert (a.zero_fraction, a.entropy, a.hist_counts) == (b.zero_fraction, b.entropy, b.hist_counts)
            assert a.std == pytest.approx(b.std, rel=1e-6)
