"""Size in bits the way the Spectra papers count it, from configs and from built models."""

import math

import pytest
import torch
import torch.nn as nn
from eval_support import tiny_model

import spectra
from spectra import ConfigError
from spectra.size import linear_storage_bits, model_size_bits, model_size_breakdown, size_in_bits

# 3.9B by hand: d 3072, GLU 9216, 30 layers, vocab 50304, 6 model-parallel shards (one scale each).
D, H, LAYERS, VOCAB, SHARDS = 3072, 9216, 30, 50304, 6
LINEAR = LAYERS * (4 * D * D + 3 * D * H)               # 3,680,501,760 ternary/float weights
FP16_REST = 2 * VOCAB * D + (2 * LAYERS + 1) * D        # embedding + lm head + norms
TRILM_BITS = 16 * FP16_REST + math.log2(3) * LINEAR + 16 * SHARDS * 7 * LAYERS
FLOATLM_BITS = 16 * (FP16_REST + LINEAR)


def meta_model(kind: str) -> spectra.SpectraLM:
    with torch.device("meta"):  # shapes only: a 3.9B model costs no memory
        return spectra.SpectraLM(spectra.get_config("3.9B", weight_kind=kind))


def test_hand_calculation_is_what_the_papers_report():
    assert LINEAR == 3_680_501_760 and FP16_REST == 309_255_168
    assert TRILM_BITS / 8e9 == pytest.approx(1.3477, abs=1e-4)    # GB: below FloatLM 830M's 1.66 GB
    assert FLOATLM_BITS / 8e9 == pytest.approx(7.9795, abs=1e-4)


@pytest.mark.parametrize("kind,expected", [("ternary", TRILM_BITS), ("ternary_frozen", TRILM_BITS),
                                           ("float", FLOATLM_BITS)])
def test_3_9b_model_size_matches_hand_calculation(kind, expected):
    model = meta_model(kind)
    assert model_size_bits(model) == pytest.approx(expected, rel=1e-12)
    config_kind = "float16" if kind == "float" else "ternary"
    assert size_in_bits(model.config, config_kind) == pytest.approx(expected, rel=1e-12)


def test_floatlm_830m_has_more_bits_than_trilm_3_9b():
    with torch.device("meta"):
        small_float = spectra.SpectraLM(spectra.get_config("830M", weight_kind="float"))
    assert model_size_bits(small_float) > model_size_bits(meta_model("ternary"))


class CodesLinear(nn.Module):
    """A stand-in QuantLM layer: 3-bit codes, one fp16 scale and zero per group of 32 weights."""

    def __init__(self, in_features, out_features, group=32):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group

    def storage_bits(self) -> float:
        groups = self.out_features * math.ceil(self.in_features / self.group)
        return 3 * self.in_features * self.out_features + 32 * groups


class BpwLinear(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def bits_per_weight(self) -> float:
        return 4.25


def test_storage_bits_protocol_and_breakdown():
    model = tiny_model("float")
    d, h = model.config.hidden_size, model.config.intermediate_size
    assert linear_storage_bits(CodesLinear(h, d)) == 3 * h * d + 32 * d * math.ceil(h / 32)
    assert linear_storage_bits(BpwLinear(d, h)) == 4.25 * d * h
    before = model_size_breakdown(model)
    model.model.layers[0].mlp.down_proj = CodesLinear(h, d)
    after = model_size_breakdown(model)
    assert after["other_bits"] == before["other_bits"]
    assert after["linear_bits"] == before["linear_bits"] - 16 * h * d + 3 * h * d + 32 * d * math.ceil(h / 32)
    model.model.layers[0].mlp.up_proj = nn.Identity()
    model.model.layers[0].mlp.up_proj.in_features = model.model.layers[0].mlp.up_proj.out_features = 4
    with pytest.raises(ConfigError, match="storage-bits protocol"):
        model_size_bits(model)


def test_packed_layers_report_their_real_bits():
    packed = pytest.importorskip("spectra.convert")
    model = tiny_model("ternary", seed=7)
    trits_bits = model_size_breakdown(model)["linear_bits"]
    pack = getattr(packed, "pack_model", None)
    if pack is None:
        pytest.skip("spectra.convert has no pack_model")
    pack(model, "tq2")
    bits = model_size_breakdown(model)["linear_bits"]
    layers = model.linear_layers().values()
    assert bits == sum(m.storage_bits() for m in layers)
    assert bits > trits_bits  # 2 bits (plus row padding) per trit vs log2(3)
