"""QuantLM storage: bit packing against its reference, the "quant" weight kind, checkpoints and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from quant_support import hamlet, trained_float_lm

from spectra.checkpoint import load_checkpoint, save_checkpoint
from spectra.cli.info import info
from spectra.cli.main import main
from spectra.convert import quantize_model
from spectra.errors import DataError, FormatError
from spectra.quant import (
    QuantConfig,
    QuantLinear,
    calibration_windows,
    gptq_quantize,
    pack_codes,
    pack_codes_reference,
    packed_length,
    rtn_quantize,
    unpack_codes,
)
from spectra.size import model_size_breakdown


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_packing_matches_reference_and_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    for rows, n in ((1, 1), (3, 7), (5, 33), (2, 130)):
        codes = torch.randint(0, 2**bits, (rows, n), generator=g)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_length(n, bits))
        assert torch.equal(packed, pack_codes_reference(codes, bits))
        assert torch.equal(unpack_codes(packed, bits, n).long(), codes)
    # Dense packing: exactly `bits` bits per code once rows fill whole chunks.
    assert packed_length(24, bits) * 8 == 24 * bits


def test_packing_rejects_bad_input():
    with pytest.raises(FormatError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([[0, 8]]), 3)
    with pytest.raises(FormatError, match="unsupported"):
        pack_codes(torch.tensor([[0, 1]]), 5)
    with pytest.raises(FormatError, match="cannot hold"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.uint8), 3, 7)


@pytest.mark.parametrize("sym,act_order", [(False, False), (True, True), (False, True)])
def test_quant_linear_forward_is_dequantize_then_matmul(sym, act_order):
    torch.manual_seed(0)
    w = torch.randn(21, 45)
    x = torch.randn(3, 5, 45)
    hessian = torch.cov(torch.randn(45, 300)) * 2 + torch.eye(45)
    layer = QuantLinear.from_quantized(gptq_quantize(w, hessian, 3, 16, sym, act_order), sym)
    dense = layer.dense_weight()
    torch.testing.assert_close(layer(x), F.linear(x, dense), rtol=1e-5, atol=1e-5)
    assert (dense - w).abs().max() < w.abs().max()  # a 3-bit approximation, not noise
    assert (hasattr(layer, "perm")) == act_order and (hasattr(layer, "qzeros")) == (not sym)


def quantized_copy(config: QuantConfig):
    model, train, _ = trained_float_lm()
    quantized = copy.deepcopy(model)
    quantize_model(quantized, config, calibration_windows(train, 8, 64, seed=2), progress=False)
    return quantized, model.tokenizer


@pytest.mark.parametrize("config", [QuantConfig(bits=4, group_size=32, act_order=True),
                                    QuantConfig(bits=3, group_size=-1, sym=True),
                                    QuantConfig(bits=6, group_size=64, method="rtn")])
def test_save_load_same_logits_and_stored_bits(tmp_path, config):
    model, tokenizer = quantized_copy(config)
    tokens = torch.randint(0, model.config.vocab_size, (2, 37))
    path = save_checkpoint(model, tmp_path / "quant", tokenizer=tokenizer)
    loaded = load_checkpoint(path)
    assert loaded.config.weight_kind == "quant" and loaded.config.weight_options == config.weight_options()
    assert torch.equal(model(tokens), loaded(tokens))
    for name, layer in loaded.linear_layers().items():
        assert isinstance(layer, QuantLinear)
        assert torch.equal(layer.qweight, model.get_submodule(name).qweight)
    # The bits `spectra info` reads from the file headers equal the layers' storage bits: codes + scales
    # (+ zeros, + permutation); and a grid of `bits` bits costs at least `bits` bits per weight.
    stored = info(str(path))["stored"]
    linear_bits = model_size_breakdown(loaded)["linear_bits"]
    assert stored["linear_bytes"] * 8 == linear_bits
    assert config.bits < stored["bits_per_linear_weight"] < config.bits + 1.5


def test_quantized_checkpoint_in_fp16_generates(tmp_path):
    model, tokenizer = quantized_copy(QuantConfig(bits=4, group_size=64))
    path = save_checkpoint(model, tmp_path / "q16", tokenizer=tokenizer, dtype=torch.float16)
    loaded = load_checkpoint(path, dtype=torch.float16)
    assert loaded.get_submodule("model.layers.0.mlp.up_proj").scales.dtype == torch.float16
    tokens = torch.randint(0, model.config.vocab_size, (1, 9))
    torch.testing.assert_close(loaded(tokens).float(), model(tokens), rtol=0.05, atol=0.05)


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    model, _, _ = trained_float_lm()
    root = tmp_path_factory.mktemp("quant_cli")
    (root / "calib.txt").write_text(hamlet(20_000))
    return save_checkpoint(model, root / "float", tokenizer=model.tokenizer), root / "calib.txt"


def test_cli_quantize_then_generate_and_info(float_checkpoint, tmp_path, capsys):
    source, calib = float_checkpoint
    out = tmp_path / "gptq4"
    assert main(["quantize", str(source), "--bits", "4", "--group-size", "32", "--calib", str(calib),
                 "--samples", "8", "--seq-len", "64", "--act-order", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GPTQ: mean relative layer output error" in printed and "RTN" in printed
    report = json.loads((out / "quantization.json").read_text())
    assert report["config"]["bits"] == 4 and len(report["layers"]) == 14
    assert (out / "tokenizer.json").is_file()
    assert main(["generate", str(out), "--prompt", "HAMLET:", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("HAMLET:")
    assert main(["info", str(out)]) == 0
    assert "weight kind quant" in capsys.readouterr().out
    # RTN needs no calibration data.
    assert main(["quantize", str(source), "--bits", "8", "--method", "rtn", "--out", str(tmp_path / "rtn8")]) == 0


def test_cli_quantize_bad_input_is_one_clear_error(float_checkpoint, tmp_path, capsys):
    source, calib = float_checkpoint
    cases = [
        (["--bits", "5", "--calib", str(calib)], "bits must be one of"),
        ([], "GPTQ needs calibration data"),
        (["--calib", str(tmp_path / "missing.txt")], "does not exist"),
        (["--calib", str(calib), "--seq-len", "4096"], "max_seq_len"),
    ]
    for extra, message in cases:
        assert main(["quantize", str(source), "--out", str(tmp_path / "x"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    rtn = tmp_path / "rtn"
    assert main(["quantize", str(source), "--method", "rtn", "--out", str(rtn)]) == 0
    assert main(["quantize", str(rtn), "--method", "rtn", "--out", str(tmp_path / "again")]) == 2
    assert "quantize the FloatLM checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_rtn_without_calibration_matches_rtn_quantize():
    model, _, _ = trained_float_lm()
    quantized = copy.deepcopy(model)
    report = quantize_model(quantized, QuantConfig(bits=3, group_size=32, method="rtn"), None, progress=False)
    assert report.layers == {}
    name = "model.layers.1.self_attn.o_proj"
    expected = rtn_quantize(model.get_submodule(name).weight, 3, 32).dequantize()
    assert torch.equal(quantized.get_submodule(name).dense_weight(), expected)


def test_calibration_from_prepared_shards_uses_the_training_split(float_checkpoint, tmp_path):
    from spectra.data import TokenDataset, prepare_data
    from spectra.quant import calibration_tokens
    from spectra.tokenizer import train_tokenizer

    _, calib = float_checkpoint
    tokenizer = trained_float_lm()[0].tokenizer
    data = prepare_data([calib], tmp_path / "shards", tokenizer=tokenizer, val_fraction=0.2, shard_tokens=700,
                        progress=False)
    windows = calibration_tokens(data.path, tokenizer, samples=12, seq_len=40, seed=5)
    assert windows.shape == (12, 40)
    train = [torch.as_tensor(s.astype("int64")) for s in TokenDataset(data.path).shards("train")]
    for row in windows:  # every window is a contiguous stretch of one training shard
        assert any(torch.equal(s[i:i + 40], row) for s in train for i in range(len(s) - 39) if s[i] == row[0])
    with pytest.raises(DataError, match="another tokenizer"):
        calibration_tokens(data.path, train_tokenizer([hamlet(5000)], 300), samples=2, seq_len=40)
