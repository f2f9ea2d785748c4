import json

import pytest
import torch

import spectra
from spectra import CheckpointError, ConfigError, DataError, FrozenTernaryLinear, SpectraLM, get_config, perplexity
from spectra.checkpoint import load_checkpoint, load_tensors, save_checkpoint
from spectra.linear import TernaryLinear
from spectra.ternary import detect_ternary, ternarize

transformers = pytest.importorskip("transformers")


def _tiny(kind: str, parts: int = 1, seed: int = 0) -> SpectraLM:
    torch.manual_seed(seed)
    return SpectraLM(get_config("tiny", weight_kind=kind, model_parallel_size=parts)).eval()


def _hf_logits(path, tokens):
    hf = transformers.LlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize("kind,parts", [("float", 1), ("ternary", 1), ("ternary", 2)])
def test_spectra_checkpoint_loads_in_transformers(tmp_path, kind, parts):
    model = _tiny(kind, parts)
    tokens = torch.randint(0, 1024, (2, 13))
    save_checkpoint(model, tmp_path / "ckpt")
    with torch.no_grad():
        ours = model(tokens)
    assert (ours - _hf_logits(tmp_path / "ckpt", tokens)).abs().max() < 1e-4


def test_transformers_checkpoint_loads_in_spectra_with_ternary_detection(tmp_path):
    torch.manual_seed(5)
    cfg = get_config("tiny", weight_kind="float", model_parallel_size=2)
    hf_config = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "spectra"})
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    expected = {}
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if name.endswith("_proj"):
                axis = 1 if name.endswith(("o_proj", "down_proj")) else 0
                mod.weight.normal_()
                trits, scales = ternarize(mod.weight, 2, axis)
                layer = FrozenTernaryLinear.from_trits(trits, scales, axis)
                mod.weight.copy_(layer.dense_weight(torch.float32))
                expected[name] = (trits, scales)
    hf.save_pretrained(str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config.get("pretraining_model_parallel") == 2
    model = load_checkpoint(tmp_path / "hf")
    assert model.config.weight_kind == "ternary_frozen" and model.config.model_parallel_size == 2
    for name, layer in model.linear_layers().items():
        assert isinstance(layer, FrozenTernaryLinear)
        assert torch.equal(layer.trits, expected[name][0])
        torch.testing.assert_close(layer.scales, expected[name][1].float(), rtol=0, atol=0)
    tokens = torch.randint(0, 1024, (2, 9))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() < 1e-4


def test_parts_inferred_when_config_lacks_key(tmp_path):
    model = _tiny("ternary", parts=2)
    save_checkpoint(model, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    del cfg["pretraining_model_parallel"]
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded.config.model_parallel_size == 2
    tokens = torch.randint(0, 1024, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=1e-5)


def test_float_checkpoint_is_not_ternary(tmp_path):
    save_checkpoint(_tiny("float"), tmp_path / "f")
    assert load_checkpoint(tmp_path / "f").config.weight_kind == "float"
    with pytest.raises(CheckpointError, match="is not ternary"):
        load_checkpoint(tmp_path / "f", kind="ternary_frozen")


def test_trainable_reload_and_sharded_save(tmp_path):
    model = _tiny("ternary")
    save_checkpoint(model, tmp_path / "s", max_shard_bytes=100_000)
    assert (tmp_path / "s" / "model.safetensors.index.json").exists()
    loaded = load_checkpoint(tmp_path / "s", kind="ternary")
    assert all(isinstance(m, TernaryLinear) for m in loaded.linear_layers().values())
    assert len(load_tensors(tmp_path / "s")) == len(model.state_dict())


def test_trainable_reload_keeps_trits_and_scales(tmp_path):
    # Continuing to train a ternary checkpoint must start from the same ternary model: same trits, same
    # per-shard scales, same logits (a plain copy of trits * scale into the latent weights would shrink them).
    torch.manual_seed(4)
    save_checkpoint(SpectraLM(get_config("tiny", weight_kind="ternary", model_parallel_size=2)), tmp_path / "s")
    frozen = load_checkpoint(tmp_path / "s")  # the exact trits and (fp16-rounded) scales stored
    loaded = load_checkpoint(tmp_path / "s", kind="ternary")
    for name, layer in frozen.linear_layers().items():
        got_trits, got_scales = loaded.linear_layers()[name].freeze()
        assert torch.equal(got_trits, layer.trits), name
        torch.testing.assert_close(got_scales, layer.scales, rtol=5e-5, atol=0)  # fp32 mean of ~2k values
    tokens = torch.randint(0, 1024, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), frozen(tokens), rtol=1e-4, atol=1e-4)


def test_detect_ternary_rejects_float_matrix():
    w = torch.randn(8, 12)
    assert detect_ternary(w, 1, 0) is None
    trits, scales = ternarize(w, 3, 1)
    dense = trits.float() * torch.repeat_interleave(scales, torch.tensor([4, 4, 4]))[None, :]
    found = detect_ternary(dense, 3, 1)
    assert found is not None and torch.equal(found[0], trits)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "empty")
    save_checkpoint(_tiny("float"), tmp_path / "t")
    (tmp_path / "t" / "model.safetensors").rename(tmp_path / "t" / "x")
    with pytest.raises(CheckpointError, match="lacks its weights"):
        load_checkpoint(tmp_path / "t")
    data = (tmp_path / "t" / "x").read_bytes()
    (tmp_path / "t" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "t")
    # Shape mismatch between config and weights.
    save_checkpoint(_tiny("float"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json and the weights disagree"):
        load_checkpoint(tmp_path / "m")


def test_api_misuse_gets_a_spectra_error(tmp_path):
    save_checkpoint(_tiny("float"), tmp_path / "c")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):  # was "does not exist"
        load_checkpoint(tmp_path / "f.txt")
    with pytest.raises(CheckpointError, match="holds dense weights"):  # was an AttributeError deep in the load
        load_checkpoint(tmp_path / "c", kind="tq2")
    # A dtype by name, as the command line takes it, was taken for a device string (RuntimeError).
    assert load_checkpoint(tmp_path / "c", dtype="bf16").model.norm.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown config fields"):  # was a TypeError
        get_config("tiny", hidden=64)
    with pytest.raises(DataError, match="at least 2 tokens"):  # was a RuntimeError inside torch
        perplexity(load_checkpoint(tmp_path / "c"), [], progress=False)


def test_a_training_run_given_as_checkpoint_names_its_checkpoints(tmp_path):
    # "has no config.json; is it a checkpoint directory?" / "no tokenizer found" did not say what to give.
    run = tmp_path / "run"
    save_checkpoint(_tiny("float"), run / "checkpoints" / "step-0000003")
    (run / "run.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"training run: give one of its checkpoints \(e.g. .*step-0000003\)"):
        load_checkpoint(run)
    with pytest.raises(CheckpointError, match="is a training run, not a checkpoint"):
        spectra.load_tokenizer(run)


def test_save_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "a"
    save_checkpoint(_tiny("float", seed=1), path)
    save_checkpoint(_tiny("float", seed=2), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp or old directories left
