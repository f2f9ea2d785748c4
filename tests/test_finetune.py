"""Fine-tuning: response-only loss, packing without cross-attention, the ternarization phase-in, distillation,
LoRA on a packed base, adapters on disk, resume, and the one-line errors on bad data."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import spectra
from spectra.cli.main import main
from spectra.errors import DataError
from spectra.finetune import (
    IGNORE,
    ChatFormat,
    FinetuneConfig,
    FinetuneDataset,
    distillation_loss,
    finetune,
    phase_in,
    set_phase,
)
from spectra.finetune.data import Example, fit_example
from spectra.lora import LoRAConfig, LoRALinear, apply_lora, load_adapter, save_adapter
from spectra.packed import PackedTernaryLinear

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles. ") * 20
SHAPE = dict(vocab_size=320, hidden_size=32, intermediate_size=72, num_heads=2, num_layers=2, max_seq_len=64)


@pytest.fixture(scope="module")
def tokenizer():
    return spectra.train_tokenizer([TEXT], vocab_size=320)


def _model(kind: str, seed: int = 0) -> spectra.SpectraLM:
    torch.manual_seed(seed)
    return spectra.SpectraLM(spectra.get_config("tiny", weight_kind=kind, **SHAPE))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for kind in ("float", "ternary"):
        model = _model(kind, seed=3)
        with torch.no_grad():  # weights of a trained model's spread, so ternarization changes something
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.1)
        out[kind] = spectra.save_checkpoint(model, root / kind, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    words = TEXT.split()
    lines = []
    for i in range(40):
        lines.append({"prompt": " ".join(words[i % 20:i % 20 + 3 + i % 4]),
                      "response": " ".join(words[i:i + 2 + i % 3])})
    lines.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"},
                               {"role": "assistant", "content": "or not"}, {"role": "user", "content": "Then?"},
                               {"role": "assistant", "content": "the question"}]})
    lines.append({"text": "whether 'tis nobler in the mind"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


# --- data: loss mask and packing -------------------------------------------------------------------

def test_prompt_tokens_contribute_exactly_zero_gradient(tokenizer, pairs_file):
    data = FinetuneDataset(pairs_file, tokenizer, seq_len=48, val_fraction=0)
    inputs, targets, documents = data.splits["train"].batch(torch.arange(3).numpy())
    assert (targets == IGNORE).any() and (targets != IGNORE).any()
    model = _model("ternary")
    seen = {}

    def keep_logits(module, args, output):
        output.retain_grad()
        seen["logits"] = output

    model.lm_head.register_forward_hook(keep_logits)
    _, loss = model(inputs, targets, document_ids=documents)
    loss.backward()
    grad = seen["logits"].grad
    prompt = targets == IGNORE
    assert torch.count_nonzero(grad[prompt]) == 0          # exactly zero, not small
    assert (grad[~prompt].abs().sum(-1) > 0).all()


def test_response_mask_covers_exactly_the_responses(tokenizer):
    chat = ChatFormat()
    segments = chat.segments(Example(turns=[{"role": "user", "content": "To be?"},
                                            {"role": "assistant", "content": "or not"}]))
    assert [loss for _, loss in segments] == [False, False, True, False]
    assert segments[2][0] == "or not<|endoftext|>"
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    segments = ChatFormat(template, "</s>").segments(Example(turns=[{"role": "user", "content": "a"},
                                                                   {"role": "assistant", "content": "b"}]))
    assert segments == [("<user>a</s><assistant>", False), ("b</s>", True)]


def test_packed_example_sees_exactly_what_it_sees_alone():
    model = _model("ternary").eval()
    torch.manual_seed(1)
    lengths = (7, 12, 5)
    docs = [torch.randint(0, 320, (n,)) for n in lengths]
    row = torch.cat(docs + [torch.zeros(3, dtype=torch.long)])[None]
    ids = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)] + [torch.full((3,), -1)])[None]
    with torch.no_grad():
        packed = model(row, document_ids=ids)
        at = 0
        for doc in docs:
            alone = model(doc[None])
            torch.testing.assert_close(packed[0, at:at + doc.numel()], alone[0], atol=1e-5, rtol=1e-5)
            at += doc.numel()
        # without document ids the second example would see the first: the logits differ
        assert not torch.allclose(model(row)[0, 7:19], model(docs[1][None])[0], atol=1e-3)


def test_over_long_examples_are_truncated_and_counted(tokenizer, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": TEXT[:400], "response": "to be"}) + "\n"
                    + json.dumps({"prompt": "a", "response": "b"}) + "\n")
    data = FinetuneDataset(path, tokenizer, seq_len=32, val_fraction=0)
    assert data.truncated == 1 and data.examples["train"] == 2
    assert "1 example(s) longer than 33 tokens were truncated" in data.describe()
    import numpy as np
    ids, flags, cut = fit_example(np.arange(50), np.array([False] * 45 + [True] * 5), 20)
    assert cut and ids.size == 20 and flags[-5:].all() and ids[-1] == 49  # prompt cut from the left


@pytest.mark.parametrize("line, message", [
    ({"prompt": "a"}, "lacks a string 'response'"),
    ({"prompt": "a", "response": "  "}, "empty response"),
    ({"question": "a"}, "none of the keys"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
])
def test_bad_data_gets_one_clear_line_and_exit_2(line, message, checkpoints, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message):
        spectra.finetune.read_examples(path)
    code = main(["finetune", str(checkpoints["float"]), "--data", str(path), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{path}:2" in err
    assert not (tmp_path / "run").exists()


def test_two_examples_with_a_byte_order_mark_train_without_held_out_loss(checkpoints, tmp_path, capsys):
    # A Notepad BOM made line 1 "not valid JSON"; with no held-out example the empty held-out row divided by
    # zero (exit 1).
    path = tmp_path / "two.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"prompt": p, "response": r}) + "\n"
                                              for p, r in (("a", "b"), ("c", "d"))).encode())
    code = main(["finetune", str(checkpoints["float"]), "--data", str(path), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--no-progress", "--device", "cpu"])
    assert code == 0 and "held-out loss n/a" in capsys.readouterr().out


# --- conversion ------------------------------------------------------------------------------------

def test_phase_zero_is_the_float_model_and_phase_one_the_frozen_trilm():
    float_model = _model("float", seed=5).eval()
    tokens = torch.randint(0, 320, (2, 19))
    phased = spectra.SpectraLM(float_model.config.replace(weight_kind="ternary", model_parallel_size=2))
    phased.load_state_dict(float_model.state_dict())
    phase_in(phased)
    phased.eval()
    with torch.no_grad():
        set_phase(phased, 0.0)
        assert torch.equal(phased(tokens), float_model(tokens))
        set_phase(phased, 0.5)
        halfway = phased(tokens)
        set_phase(phased, 1.0)
        ternary = phased(tokens)
        frozen = spectra.freeze_ternary(copy.deepcopy(phased))
        assert torch.equal(ternary, frozen(tokens))
        assert frozen.model.layers[0].mlp.down_proj.scales.numel() == 2  # per-shard scales
        assert not torch.allclose(halfway, ternary) and not torch.allclose(halfway, float_model(tokens))


def test_phase_schedule():
    from spectra.finetune import phase_at
    assert [phase_at(s, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert phase_at(0, 0) == 1.0


def test_distillation_loss_matches_a_hand_computed_case():
    student = torch.tensor([[[0.0, math.log(3.0)]]])   # softmax at T=1: (1/4, 3/4)
    teacher = torch.tensor([[[math.log(3.0), 0.0]]])   # (3/4, 1/4)
    kl = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)  # = 0.5 ln 3
    assert distillation_loss(student, teacher, 1.0).item() == pytest.approx(kl, rel=1e-6)
    # T = 2: logits halved -> (1, sqrt 3) proportions, and the T^2 factor
    p, q = 1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))
    kl2 = q * math.log(q / p) + p * math.log(p / q)
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(4 * kl2, rel=1e-6)
    # masked tokens do not count: the second token (student = teacher otherwise) is left out
    two = torch.cat([student, student], 1), torch.cat([teacher, student], 1)
    assert distillation_loss(*two, 1.0, torch.tensor([[True, False]])).item() == pytest.approx(kl, rel=1e-6)
    assert distillation_loss(*two, 1.0).item() == pytest.approx(kl / 2, rel=1e-6)


def test_convert_with_teacher_gives_a_frozen_trilm(checkpoints, pairs_file, tmp_path):
    task = FinetuneConfig(checkpoint=str(checkpoints["float"]), method="convert", ternary_warmup=2, teacher=True,
                          model_parallel_size=2)
    result = finetune(task, data=str(pairs_file), out_dir=str(tmp_path / "run"), steps=4, batch_size=2,
                      seq_len=48, eval_every=0, progress=False, echo=lambda s: None)
    loaded = spectra.load_checkpoint(result.product)
    assert loaded.config.weight_kind == "ternary_frozen" and loaded.config.model_parallel_size == 2
    assert result.val_loss_before is not None and math.isfinite(result.train.val_loss)


# --- LoRA ------------------------------------------------------------------------------------------

def test_lora_trains_only_adapters_and_keeps_the_packed_base_bytes(checkpoints, pairs_file, tmp_path):
    base = spectra.pack_model(spectra.load_checkpoint(checkpoints["ternary"]), "tq1")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    task = FinetuneConfig(checkpoint=str(checkpoints["ternary"]), method="lora", base_format="tq1",
                          lora={"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj", "down_proj"]})
    result = finetune(task, data=str(pairs_file), out_dir=str(tmp_path / "run"), steps=3, batch_size=2, seq_len=48,
                      eval_every=0, progress=False, echo=lambda s: None)
    model = result.train.model
    trained = model.state_dict()
    adapters = {k for k in trained if ".lora_" in k}
    assert len(adapters) == 2 * 3 * SHAPE["num_layers"]
    for key, value in before.items():
        mapped = key.replace("q_proj.", "q_proj.base.").replace("v_proj.", "v_proj.base.").replace(
            "down_proj.", "down_proj.base.")
        assert torch.equal(trained[mapped], value), key  # packed bytes (storage layout), scales, norms, embeddings
    assert isinstance(model.model.layers[0].self_attn.q_proj.base, PackedTernaryLinear)
    assert any(trained[k].abs().sum() > 0 for k in adapters if "lora_B" in k)  # B moved away from zero


def test_adapter_save_load_round_trip_gives_identical_logits(checkpoints, tmp_path):
    model = spectra.pack_model(spectra.load_checkpoint(checkpoints["ternary"]), "tq2")
    apply_lora(model, LoRAConfig(rank=3, alpha=6.0, targets=("k_proj", "gate_proj")))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_()
    tokens = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        expected = model(tokens)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["peft_type"] == "LORA" and config["target_modules"] == ["k_proj", "gate_proj"]
    fresh = load_adapter(spectra.load_checkpoint(checkpoints["ternary"]), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(tokens), expected) or torch.allclose(fresh(tokens), expected, atol=1e-6)
        plain = spectra.load_checkpoint(checkpoints["ternary"])(tokens)
    assert not torch.allclose(plain, expected, atol=1e-3)


# --- resume ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, base, extra", [("full", "ternary", {}), ("lora", "ternary", {}),
                                                ("convert", "float", {"ternary_warmup": 3, "teacher": True})])
def test_resume_mid_finetune_is_bit_identical(method, base, extra, checkpoints, pairs_file, tmp_path):
    task = FinetuneConfig(checkpoint=str(checkpoints[base]), method=method, **extra)
    options = dict(data=str(pairs_file), steps=4, batch_size=2, seq_len=48, eval_every=0, save_every=2,
                   keep_last=3, progress=False, echo=lambda s: None)
    full = finetune(task, out_dir=str(tmp_path / "full"), **options)
    shutil.copytree(tmp_path / "full", tmp_path / "cut", ignore=shutil.ignore_patterns("model", "adapter"))
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000004")
    resumed = finetune(resume=tmp_path / "cut", echo=lambda s: None)
    assert resumed.train.step == 4
    for (name, a), (_, b) in zip(full.train.model.state_dict().items(), resumed.train.model.state_dict().items()):
        assert torch.equal(a, b), name
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "final"] == [4]


def test_cli_finetune_generate_with_adapter(checkpoints, pairs_file, tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(["finetune", str(checkpoints["ternary"]), "--method", "lora", "--data", str(pairs_file), "--out",
                 str(out), "--steps", "2", "--batch-size", "2", "--seq-len", "48", "--no-progress"]) == 0
    assert "adapter:" in capsys.readouterr().out
    assert main(["generate", str(checkpoints["ternary"]), "--adapter", str(out / "adapter"), "--prompt", "To be",
                 "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu"]) == 0
    assert main(["finetune", str(checkpoints["ternary"]), "--data", str(pairs_file), "--out", str(out)]) == 2


def test_a_packed_trilm_fine_tunes_from_its_exact_trits(checkpoints, tmp_path):
    from spectra.finetune.run import latent_model
    packed = spectra.pack_model(spectra.load_checkpoint(checkpoints["ternary"]), "tq1")
    latent = latent_model(packed)
    tokens = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert torch.allclose(latent(tokens), packed(tokens), atol=1e-4)  # scales to fp32 rounding
    frozen = spectra.freeze_ternary(latent)
    for name, layer in frozen.linear_layers().items():
        assert torch.equal(layer.trits, packed.linear_layers()[name].trits()), name


def test_lora_refuses_a_model_fused_for_inference():
    """After spectra.generate fused q/k/v and gate/up, their adapters would silently be missing."""
    from spectra.errors import ConfigError

    model = spectra.SpectraLM(spectra.get_config("tiny", weight_kind="float"))
    model.fuse_projections()
    with pytest.raises(ConfigError, match="fused for inference"):
        apply_lora(model, LoRAConfig(rank=2, alpha=4.0))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    model.unfuse_projections()  # the way the message names
    assert len(apply_lora(model, LoRAConfig(rank=2, alpha=4.0))) == 7 * model.config.num_layers
