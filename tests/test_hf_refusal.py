"""Packed and QuantLM checkpoints are refused by the installed transformers (they would load with random linear
layers), and still load in spectra, as do those written before they carried the refusal."""

import json

import pytest
import torch

from spectra import SpectraLM, freeze_ternary, get_config
from spectra.checkpoint import load_checkpoint, save_checkpoint
from spectra.convert import pack_model, quantize_model
from spectra.quant import QuantConfig

transformers = pytest.importorskip("transformers")


def _model(kind: str) -> SpectraLM:
    torch.manual_seed(11)
    if kind in ("tq2", "tq1"):
        return pack_model(freeze_ternary(SpectraLM(get_config("tiny", weight_kind="ternary")).eval()), kind)
    model = SpectraLM(get_config("tiny", weight_kind="float")).eval()
    method = kind.split("-")[1]
    calib = torch.randint(0, 1024, (2, 17)) if method == "gptq" else None
    quantize_model(model, QuantConfig(bits=4, group_size=32, method=method), calib, progress=False)
    return model


@pytest.mark.parametrize("kind,arch", [("tq2", "SpectraTQ2ForCausalLM"), ("tq1", "SpectraTQ1ForCausalLM"),
                                       ("quant-gptq", "SpectraGPTQForCausalLM"),
                                       ("quant-rtn", "SpectraRTNForCausalLM")])
def test_transformers_refuses_packed_and_quant_checkpoints_spectra_loads_them(tmp_path, kind, arch):
    model = _model(kind)
    path = save_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [arch] and "quant_method" not in config["quantization_config"]
    with pytest.raises(ValueError, match="quant_method"):
        transformers.LlamaForCausalLM.from_pretrained(str(path))
    with pytest.raises(ValueError, match=f"model type `{config['model_type']}`"):
        transformers.AutoModelForCausalLM.from_pretrained(str(path))
    tokens = torch.randint(0, 1024, (2, 9))
    with torch.no_grad():
        expected = model(tokens)
        assert torch.equal(load_checkpoint(path)(tokens), expected)
        # a checkpoint written before the refusal fields (plain LlamaForCausalLM / llama) still loads
        old = {k: v for k, v in config.items() if k != "quantization_config"}
        old.update(architectures=["LlamaForCausalLM"], model_type="llama")
        (path / "config.json").write_text(json.dumps(old))
        assert torch.equal(load_checkpoint(path)(tokens), expected)


def test_dense_checkpoints_keep_plain_llama_configs(tmp_path):
    for kind in ("float", "ternary"):
        path = save_checkpoint(SpectraLM(get_config("tiny", weight_kind=kind)), tmp_path / kind)
        config = json.loads((path / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
        assert "quantization_config" not in config
        transformers.AutoModelForCausalLM.from_pretrained(str(path))
