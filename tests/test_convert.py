"""spectra.convert_: each spec gives what the per-kind verbs and the layers' own constructors give, records the
weight kind once, and the block table (spectra.block) is what the model is built from."""

import copy

import pytest
import torch

import spectra
from spectra.block import BLOCK_LINEARS, FUSION_GROUPS, INPUT_GROUPS, block_linear_shapes, fused_shapes, spec_of
from spectra.checkpoint import checkpoint_tensors, load_tensors, save_checkpoint
from spectra.convert import (
    FrozenTernary,
    FusedProjections,
    Packed,
    Quantized,
    convert_,
    convert_checkpoint,
    freeze_ternary,
    pack_checkpoint,
    pack_model,
    quantize_model,
)
from spectra.errors import ConfigError, FormatError
from spectra.formats import FORMAT_VERSION, get_format
from spectra.packed import PackedTernaryLinear
from spectra.quant import QuantConfig, QuantLinear, rtn_quantize
from spectra.size import count_parameters
from spectra.tensor_table import expected_tensors
from spectra.ternary import ternarize

# odd sizes, so no two of the block's dimensions coincide
CONFIG = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_heads=3, num_layers=2, max_seq_len=32)


def model_of(kind: str, parts: int = 1, seed: int = 0) -> spectra.SpectraLM:
    torch.manual_seed(seed)
    return spectra.SpectraLM(spectra.get_config("tiny", weight_kind=kind, model_parallel_size=parts,
                                                **CONFIG)).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(seed))


def test_frozen_ternary_holds_the_exact_trits_and_scales():
    latent = model_of("ternary", parts=2)
    frozen = copy.deepcopy(latent)
    assert convert_(frozen, FrozenTernary()) is None
    assert frozen.config.weight_kind == "ternary_frozen"
    for name, layer in frozen.linear_layers().items():
        reference = latent.get_submodule(name)
        trits, scales = ternarize(reference.weight, reference.parts, reference.shard_axis)
        assert torch.equal(layer.trits, trits) and torch.equal(layer.scales, scales)
    old = freeze_ternary(copy.deepcopy(latent))
    assert torch.equal(frozen(tokens()), old(tokens())) and old.config == frozen.config


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
def test_packed_equals_the_frozen_model_and_packs_its_trits(fmt):
    frozen = freeze_ternary(model_of("ternary", parts=2, seed=3))
    packed = copy.deepcopy(frozen)
    convert_(packed, Packed(fmt.upper()))  # format names are case-insensitive, as get_format's
    assert packed.config.weight_kind == fmt
    assert packed.config.weight_options == {"format_version": FORMAT_VERSION}
    for name, layer in packed.linear_layers().items():
        assert isinstance(layer, PackedTernaryLinear)
        assert torch.equal(layer.qweight, get_format(fmt).pack(frozen.get_submodule(name).trits))
    assert torch.equal(packed(tokens()), frozen(tokens()))
    old = pack_model(copy.deepcopy(frozen), fmt)
    assert torch.equal(old(tokens()), packed(tokens())) and old.config == packed.config


def test_packed_refuses_float_weights_and_leaves_the_model_alone():
    model = model_of("float", seed=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FormatError, match="not ternary"):
        convert_(model, Packed("tq2"))
    assert model.config.weight_kind == "float"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quantized_rtn_equals_each_layer_quantized_alone():
    model = model_of("float", seed=5)
    config = QuantConfig(bits=4, group_size=16, method="rtn")
    quantized = copy.deepcopy(model)
    report = convert_(quantized, Quantized(config))
    assert quantized.config.weight_kind == "quant"
    assert quantized.config.weight_options == config.weight_options()
    assert report.config == config
    for name, layer in quantized.linear_layers().items():
        assert isinstance(layer, QuantLinear)
        weight = model.get_submodule(name).dense_weight()
        expected = rtn_quantize(weight, config.bits, config.group_size, config.sym).dequantize()
        assert torch.equal(layer.dense_weight(torch.float32), expected.float())
    old = copy.deepcopy(model)
    quantize_model(old, config, progress=False)
    assert torch.equal(old(tokens()), quantized(tokens())) and old.config == quantized.config


def test_quantized_gptq_needs_calibration_and_matches_the_old_verb():
    model = model_of("float", seed=6)
    config = QuantConfig(bits=3, group_size=16, method="gptq")
    with pytest.raises(spectra.DataError, match="calibration"):
        convert_(copy.deepcopy(model), Quantized(config))
    calibration = torch.randint(0, CONFIG["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(7))
    new, old = copy.deepcopy(model), copy.deepcopy(model)
    report = convert_(new, Quantized(config, calibration, batch_size=2))
    old_report = quantize_model(old, config, calibration, batch_size=2, progress=False)
    assert report.layers == old_report.layers and len(report.layers) == len(BLOCK_LINEARS) * CONFIG["num_layers"]
    assert torch.equal(new(tokens()), old(tokens())) and new.config == old.config


def test_quantized_refuses_a_ternary_model():
    with pytest.raises(ConfigError, match="starts from a FloatLM"):
        convert_(model_of("ternary"), Quantized(QuantConfig(method="rtn")))


@pytest.mark.parametrize("kind", ["float", "tq1"])
def test_fused_projections_keep_the_outputs_and_the_config(kind):
    model = model_of("float" if kind == "float" else "ternary", seed=8)
    if kind != "float":
        pack_model(model, kind)
    fused = copy.deepcopy(model)
    assert convert_(fused, FusedProjections()) == len(FUSION_GROUPS) * CONFIG["num_layers"]
    assert fused.config == model.config and fused.projections_fused
    block = fused.model.layers[0]
    shapes = [block.get_submodule(f"{group[0].owner}.{group[0].fused or group[0].name}") for group in INPUT_GROUPS]
    assert [(m.out_features, m.in_features) for m in shapes] == fused_shapes(model.config)
    torch.testing.assert_close(fused(tokens()), model(tokens()), rtol=1e-5, atol=1e-5)


def test_unknown_spec_is_one_clear_error():
    with pytest.raises(ConfigError, match="unknown conversion"):
        convert_(model_of("float"), QuantConfig())


def test_convert_checkpoint_equals_pack_checkpoint(tmp_path):
    save_checkpoint(model_of("ternary", parts=2, seed=9), tmp_path / "tri")
    report = convert_checkpoint(tmp_path / "tri", tmp_path / "new", Packed("tq1"))
    old = pack_checkpoint(tmp_path / "tri", tmp_path / "old", "tq1")
    assert report == old
    new_tensors, old_tensors = load_tensors(tmp_path / "new"), load_tensors(tmp_path / "old")
    assert new_tensors.keys() == old_tensors.keys()
    assert all(torch.equal(new_tensors[k], old_tensors[k]) for k in new_tensors)
    with pytest.raises(ConfigError, match="in memory only"):
        convert_checkpoint(tmp_path / "tri", tmp_path / "fused", FusedProjections())


# --- the block table drives the model ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["float", "ternary", "tq2", "quant"])
def test_the_block_table_gives_every_layer_its_name_shape_and_axis(kind):
    model = model_of("ternary" if kind == "tq2" else "float" if kind == "quant" else kind, parts=2)
    if kind == "tq2":
        pack_model(freeze_ternary(model), "tq2")
    if kind == "quant":
        quantize_model(model, QuantConfig(bits=4, group_size=16, method="rtn"), progress=False)
    layers = model.linear_layers()
    assert list(layers) == [f"model.layers.{i}.{spec.path}" for i in range(CONFIG["num_layers"])
                            for spec in BLOCK_LINEARS]
    for name, layer in layers.items():
        spec = spec_of(name)
        assert (layer.in_features, layer.out_features) == spec.features(model.config)
        assert layer.shard_axis == spec.axis
    assert [(o, i) for _, o, i in block_linear_shapes(model.config)] == \
        [(m.out_features, m.in_features) for m in list(layers.values())[:len(BLOCK_LINEARS)]]
    assert count_parameters(model.config).linear == sum(m.out_features * m.in_features for m in layers.values())
    table = expected_tensors(model.config, dense=kind in ("float", "ternary"))
    assert set(table) == set(checkpoint_tensors(model))


def test_input_groups_are_the_fusion_groups_and_singles_in_block_order():
    assert [tuple(s.name for s in group) for group in INPUT_GROUPS] == \
        [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
    assert {name: tuple(s.name for s in group) for name, group in FUSION_GROUPS.items()} == \
        {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
