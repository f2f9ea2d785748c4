"""A LoRA adapter records the fingerprint of its base and refuses another base of the same shape (spectra.lora,
spectra.fingerprint); the fingerprint is that of the weights, not of how a model holds them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import spectra
from spectra.cli.main import main
from spectra.errors import CheckpointError, SpectraWarning
from spectra.fingerprint import weight_fingerprint
from spectra.lora import ADAPTER_BASE, LoRAConfig, LoRALinear, apply_lora, load_adapter, save_adapter
from spectra.packed import PackedTernaryLinear, ternary_values

SHAPE = dict(vocab_size=300, hidden_size=32, intermediate_size=72, num_heads=2, num_layers=2, max_seq_len=64)
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 10


def _trained_like(kind: str, seed: int) -> spectra.SpectraLM:
    torch.manual_seed(seed)
    model = spectra.SpectraLM(spectra.get_config("tiny", weight_kind=kind, **SHAPE))
    with torch.no_grad():  # a trained model's spread, so ternarization keeps something of every weight
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Two TriLMs and two FloatLMs of the same shape (A and B differ in their weights only)."""
    root = tmp_path_factory.mktemp("bases")
    tokenizer = spectra.train_tokenizer([TEXT], vocab_size=300)
    return {f"{kind}-{name}": spectra.save_checkpoint(_trained_like(kind, seed), root / f"{kind}-{name}",
                                                      tokenizer=tokenizer)
            for kind in ("ternary", "float") for name, seed in (("A", 1), ("B", 2))}


def _adapter(base: Path, out: Path, pack: str | None = "tq2") -> torch.Tensor:
    """An adapter trained (here: B drawn at random) on checkpoint `base`, packed as a LoRA run packs it; returns
    the adapted model's logits on fixed tokens."""
    model = spectra.load_checkpoint(base)
    if pack:
        model = spectra.pack_model(model, pack)
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "down_proj")))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_()
        logits = model(TOKENS)
    save_adapter(model, out, base=str(base))
    return logits


TOKENS = torch.tensor([[5, 17, 250, 3, 99, 42, 7]])


def _no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def test_same_base_from_its_checkpoint_loads_silently(bases, tmp_path):
    """Trained on the TQ2-packed base, applied to the same checkpoint loaded as int8 trits: the same base."""
    expected = _adapter(bases["ternary-A"], tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / ADAPTER_BASE).read_text())
    assert record["checkpoint"] == str(bases["ternary-A"]) and record["config"]["weights"] == "ternary"
    assert set(record["fingerprint"]) == {"float32", "bfloat16", "float16"}
    model = _no_warnings(load_adapter, spectra.load_checkpoint(bases["ternary-A"]), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), expected, rtol=0, atol=1e-5)


def test_another_base_of_the_same_shape_is_refused_and_left_as_it_was(bases, tmp_path):
    _adapter(bases["ternary-A"], tmp_path / "adapter")
    other = spectra.load_checkpoint(bases["ternary-B"])
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_adapter(other, tmp_path / "adapter", base=str(bases["ternary-B"]))
    message = str(err.value)
    assert "\n" not in message
    assert str(bases["ternary-A"]) in message and str(bases["ternary-B"]) in message
    assert "--force-base" in message and "same shape, other weights" in message
    assert not any(isinstance(m, LoRALinear) for m in other.modules())
    after = other.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_force_loads_another_base_with_one_warning(bases, tmp_path):
    _adapter(bases["ternary-A"], tmp_path / "adapter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_adapter(spectra.load_checkpoint(bases["ternary-B"]), tmp_path / "adapter", force=True)
    assert len(caught) == 1 and issubclass(caught[0].category, SpectraWarning)
    assert "\n" not in str(caught[0].message) and "forced" in str(caught[0].message)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * SHAPE["num_layers"]


def test_adapter_saved_without_a_fingerprint_loads_with_one_warning(bases, tmp_path):
    expected = _adapter(bases["ternary-A"], tmp_path / "adapter")
    (tmp_path / "adapter" / ADAPTER_BASE).unlink()  # what spectra wrote before fingerprints
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_adapter(spectra.load_checkpoint(bases["ternary-A"]), tmp_path / "adapter")
    assert len(caught) == 1 and issubclass(caught[0].category, SpectraWarning)
    assert "cannot be checked" in str(caught[0].message)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["float", "ternary_frozen", "tq2", "tq1"])
def test_fingerprint_is_that_of_the_weights_not_of_how_they_are_held(kind, bases, tmp_path):
    source = bases["float-A"] if kind == "float" else bases["ternary-A"]
    model = spectra.load_checkpoint(source)
    if kind in ("tq2", "tq1"):
        model = spectra.pack_model(model, kind)
    reference = weight_fingerprint(model)
    if kind != "float":  # a ternary base is its trits and scales, whatever holds them
        assert reference == weight_fingerprint(spectra.load_checkpoint(source))
    # the same base: reloaded from its own checkpoint directory, fused for inference, adapted
    reloaded = spectra.load_checkpoint(spectra.save_checkpoint(model, tmp_path / "copy"))
    assert weight_fingerprint(reloaded) == reference
    assert model.fuse_projections() > 0 and model.projections_fused
    assert weight_fingerprint(model) == reference
    model.unfuse_projections()
    apply_lora(model, LoRAConfig(rank=2))
    assert weight_fingerprint(model) == reference
    # one weight of one layer changed: another base
    layer = model.separate_linear_layers()["model.layers.1.mlp.up_proj"].base
    with torch.no_grad():
        if kind == "float":
            layer.weight[3, 5] += 1e-3
        else:
            trits = ternary_values("up_proj", layer)[0].clone()
            trits[3, 5] = 0 if trits[3, 5] else 1
            if kind == "ternary_frozen":
                layer.trits.copy_(trits)
            else:
                layer.qweight = PackedTernaryLinear.from_trits(trits, layer.scales, layer.shard_axis, kind).qweight
    assert weight_fingerprint(model)["float32"] != reference["float32"]


def test_float_base_loaded_in_bfloat16_is_the_same_base(bases, tmp_path):
    _adapter(bases["float-A"], tmp_path / "adapter", pack=None)  # trained in float32, as LoRA runs are
    same = spectra.load_checkpoint(bases["float-A"], dtype=torch.bfloat16)
    _no_warnings(load_adapter, same, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="another base"):
        load_adapter(spectra.load_checkpoint(bases["float-B"], dtype=torch.bfloat16), tmp_path / "adapter")


def test_cli_generate_refuses_another_base_and_force_base_warns_once(bases, tmp_path, capsys):
    _adapter(bases["ternary-A"], tmp_path / "adapter")
    args = ["generate", str(bases["ternary-B"]), "--adapter", str(tmp_path / "adapter"), "--prompt", "To be",
            "--max-new-tokens", "2", "--temperature", "0", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force-base" in err and str(bases["ternary-A"]) in err
    assert main([*args, "--force-base"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "forced" in lines[0]


def test_a_corrupt_base_record_is_one_clear_error(bases, tmp_path):
    _adapter(bases["ternary-A"], tmp_path / "adapter")
    (tmp_path / "adapter" / ADAPTER_BASE).write_text('{"version": 1, "fingerprint": "trunc')
    model = spectra.load_checkpoint(bases["ternary-A"])
    with pytest.raises(CheckpointError, match="corrupt") as err:
        load_adapter(model, tmp_path / "adapter")
    assert "\n" not in str(err.value) and not any(isinstance(m, LoRALinear) for m in model.modules())


def test_an_adapter_whose_tensors_do_not_fit_leaves_the_model_as_it_was(bases, tmp_path):
    """The right base, but the adapter's tensors disagree with its config (rank edited): refused after the
    adapters were put on, so they are taken off again and the trainable flags restored."""
    _adapter(bases["ternary-A"], tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["r"] = 3
    config_file.write_text(json.dumps(config))
    model = spectra.load_checkpoint(bases["ternary-A"])
    model.model.norm.weight.requires_grad_(True)
    model.lm_head.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(CheckpointError, match="has shape"):
        load_adapter(model, tmp_path / "adapter")
    assert {name: type(m) for name, m in model.named_modules()} == modules
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.model.norm.weight.requires_grad and not model.lm_head.weight.requires_grad
