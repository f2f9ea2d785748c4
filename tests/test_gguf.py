"""GGUF export: the file reads back with gguf.GGUFReader, dequantizes to the model's weights within fp16
rounding of the scale, carries the llama hparams and tokenizer, and falls back to F16 (with a warning)
exactly where per-shard scales split a 256-weight block."""

import warnings

import numpy as np
import pytest
import torch

import spectra
from spectra.checkpoint import load_checkpoint, save_checkpoint
from spectra.cli.main import main
from spectra.convert import pack_checkpoint
from spectra.errors import FormatError
from spectra.gguf_export import GGUFFallbackWarning, export_gguf, permute_for_llama_rope, tq_block_misfit
from spectra.tokenizer import train_tokenizer

gguf = pytest.importorskip("gguf")

# hidden 512 and GLU 768 with two shard scales: o_proj's rows split at column 256 (a block boundary, fits),
# down_proj's at column 384 (inside a block: F16 fallback); column-parallel matrices always fit.
CONFIG = dict(vocab_size=320, hidden_size=512, num_heads=4, intermediate_size=768, num_layers=1,
              model_parallel_size=2)
LINEAR = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog; ünïcode 123.", "ternary LMs"] * 20, 300)
    torch.manual_seed(0)
    model = spectra.freeze_ternary(spectra.SpectraLM(spectra.get_config("tiny", **CONFIG)))
    # Scales that fp16 cannot hold exactly, so the test sees the scale rounding it allows for.
    for layer in model.linear_layers().values():
        layer.scales = torch.rand(layer.parts) * 0.1 + 0.01
    save_checkpoint(model, root / "tri", tokenizer=tok)  # fp32: keeps the unrounded scales
    return root, model, tok


def export(src, out, qtype):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_gguf(src, out, qtype)
    return report, [w for w in caught if issubclass(w.category, GGUFFallbackWarning)]


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0", "f16"])
def test_gguf_reads_back_and_dequantizes_to_the_weights(checkpoint, qtype):
    root, model, tok = checkpoint
    report, fallback_warnings = export(root / "tri", root / f"{qtype}.gguf", qtype)
    reader = gguf.GGUFReader(root / f"{qtype}.gguf")
    tensors = {t.name: t for t in reader.tensors}
    layers = model.linear_layers()
    for short, hf in LINEAR.items():
        t = tensors[f"blk.0.{short}.weight"]
        module = layers[f"model.layers.0.{hf}"]
        expected_type = "F16" if qtype == "f16" or short == "ffn_down" else qtype.upper()
        assert t.tensor_type.name == expected_type
        # gguf stores ne reversed: ne0 = in_features.
        assert [int(n) for n in t.shape] == [module.in_features, module.out_features]
        weight = module.dense_weight(torch.float32)
        if short in ("attn_q", "attn_k"):
            weight = permute_for_llama_rope(weight, CONFIG["num_heads"])
        deq = gguf.quants.dequantize(t.data, t.tensor_type)
        fp16_rounding = (module.scales - module.scales.half().float()).abs().max().item()
        assert np.abs(deq - weight.numpy()).max() <= fp16_rounding + 1e-12
        assert np.array_equal(np.sign(deq), weight.sign().numpy())
    if qtype == "f16":
        assert not report.fallbacks and not fallback_warnings
    else:
        assert list(report.fallbacks) == ["blk.0.ffn_down.weight"]
        assert "column 384" in report.fallbacks["blk.0.ffn_down.weight"]
        assert len(fallback_warnings) == 1 and "blk.0.ffn_down.weight" in str(fallback_warnings[0].message)


def test_gguf_metadata_and_vocabulary(checkpoint):
    root, model, tok = checkpoint
    export(root / "tri", root / "meta.gguf", "tq2_0")
    fields = gguf.GGUFReader(root / "meta.gguf").fields

    def value(key):
        f = fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]][0]

    assert value("general.architecture") == "llama"
    assert value("llama.embedding_length") == 512 and value("llama.block_count") == 1
    assert value("llama.feed_forward_length") == 768 and value("llama.attention.head_count") == 4
    assert value("llama.attention.head_count_kv") == 4 and value("llama.rope.dimension_count") == 128
    assert value("llama.context_length") == model.config.max_seq_len
    assert value("general.file_type") == int(gguf.LlamaFileType.MOSTLY_TQ2_0)
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == 320 and tokens[tok.get_vocab_size():] == [f"[PAD{i}]" for i in range(300, 320)]
    assert tokens[:300] == [tok.id_to_token(i) for i in range(300)]
    types = value("tokenizer.ggml.token_type")
    assert types[0] == int(gguf.TokenType.CONTROL) and types[-1] == int(gguf.TokenType.UNUSED)
    assert value("tokenizer.ggml.eos_token_id") == tok.token_to_id("<|endoftext|>")
    assert len(value("tokenizer.ggml.merges")) == 300 - 257


def test_transformers_reads_our_gguf_as_the_same_model(checkpoint):
    """An independent GGUF reader (transformers, which undoes llama.cpp's q/k permutation) gets our logits
    and our tokenization."""
    ggml = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root, model, tok = checkpoint
    export(root / "tri", root / "hf.gguf", "tq1_0")
    parsed = ggml.load_gguf_checkpoint(str(root / "hf.gguf"))["config"]
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in parsed.items() if not k.startswith(("_", "model_type"))}))
    tensors = ggml.load_gguf_checkpoint(str(root / "hf.gguf"), return_tensors=True, model_to_load=hf)["tensors"]
    hf.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()})
    tokens = torch.randint(0, 300, (2, 13))
    ours, theirs = model(tokens), hf.eval()(tokens).logits
    # Only fp16 rounding of the embedding, lm head and scales separates the two.
    assert (ours - theirs).abs().max() < 2e-2 * ours.abs().max()
    assert ours.argmax(-1).eq(theirs.argmax(-1)).float().mean() > 0.9
    text = "the quick brown fox, ünïcode 123  and\n\nmore"
    hf_tok = AutoTokenizer.from_pretrained(str(root), gguf_file="hf.gguf")
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids


def test_packed_checkpoint_exports_the_same_tensors(checkpoint):
    root, model, tok = checkpoint
    pack_checkpoint(root / "tri", root / "tq1", "tq1")
    export(root / "tri", root / "a.gguf", "tq1_0")
    export(root / "tq1", root / "b.gguf", "tq1_0")
    a, b = gguf.GGUFReader(root / "a.gguf").tensors, gguf.GGUFReader(root / "b.gguf").tensors
    assert [t.name for t in a] == [t.name for t in b]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a, b))


def test_block_fit_rules():
    assert tq_block_misfit(3072, 0, 6) is None                         # 3.9B column-parallel
    assert tq_block_misfit(3072, 1, 6) is None and tq_block_misfit(9216, 1, 6) is None  # 3.9B o, down
    assert "not a multiple" in tq_block_misfit(176, 0, 1)
    assert "column 384" in tq_block_misfit(768, 1, 2)
    assert tq_block_misfit(768, 0, 2) is None


def test_float_checkpoint_cannot_be_ternary_gguf(tmp_path):
    torch.manual_seed(0)
    tok = train_tokenizer(["some text for a tokenizer"] * 10, 270)
    floatlm = spectra.SpectraLM(spectra.get_config("tiny", weight_kind="float", vocab_size=300))
    save_checkpoint(floatlm, tmp_path / "float", tokenizer=tok)
    with pytest.raises(FormatError, match="not ternary.*--type f16"):
        export_gguf(tmp_path / "float", tmp_path / "x.gguf", "tq2_0")
    assert not (tmp_path / "x.gguf").exists()
    assert main(["export", "gguf", str(tmp_path / "float"), "--type", "f16", "--out", str(tmp_path / "f.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "f.gguf")
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    w = load_checkpoint(tmp_path / "float").model.layers[0].self_attn.v_proj.weight.detach()
    assert np.array_equal(gguf.quants.dequantize(q.data, q.tensor_type), w.half().float().numpy())
    assert main(["export", "gguf", str(tmp_path / "float"), "--type", "tq1_0", "--out", str(tmp_path / "y.gguf")]) == 2


def test_fallback_warning_counts_and_names_in_plain_grammar():
    from spectra.gguf_export import fallback_message

    one = fallback_message({"blk.0.ffn_down.weight": tq_block_misfit(768, 1, 2)}, "tq2_0")
    assert one.startswith("1 matrix written as F16 instead of TQ2_0: 1 matrix with 2 per-shard scales that split")
    many = {f"blk.{i}.{n}.weight": tq_block_misfit(96, 0, 1) for i in range(3) for n in ("attn_q", "attn_k")}
    many["blk.0.ffn_down.weight"] = tq_block_misfit(768, 1, 2)
    text = fallback_message(many, "tq1_0")
    assert text.startswith("7 matrices written as F16 instead of TQ1_0: 6 matrices with rows of 96 weights, not a "
                           "multiple of the 256-weight TQ block (blk.0.attn_q.weight, blk.0.attn_k.weight, ...); "
                           "1 matrix with 2 per-shard scales")
    assert " its " not in text


def test_quantlm_exports_dequantized_f16_and_refuses_tq_types_saying_so(tmp_path):
    from spectra.convert import quantize_model
    from spectra.quant import QuantConfig

    torch.manual_seed(1)
    tok = train_tokenizer(["some text for a tokenizer"] * 10, 270)
    model = spectra.SpectraLM(spectra.get_config("tiny", weight_kind="float", vocab_size=300)).eval()
    quantize_model(model, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    save_checkpoint(model, tmp_path / "quant", tokenizer=tok)
    with pytest.raises(FormatError, match="QuantLinear.*exports with --type f16 \\(QuantLM weights dequantized\\)"):
        export_gguf(tmp_path / "quant", tmp_path / "x.gguf", "tq2_0")
    report = export_gguf(tmp_path / "quant", tmp_path / "q.gguf", "f16")
    assert report.weight_kind == "quant" and not report.fallbacks
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    for short, hf in (("attn_v", "self_attn.v_proj"), ("ffn_down", "mlp.down_proj")):
        t = tensors[f"blk.1.{short}.weight"]
        expected = model.get_submodule(f"model.layers.1.{hf}").dense_weight().half().float().numpy()
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), expected)


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_a_fused_model_exports_the_same_gguf_as_the_unfused_one(checkpoint, tmp_path, qtype):
    """spectra.generate fuses a GPU model in place; llama.cpp reads q/k/v and gate/up separately, so the
    export writes the layers the fused ones joined: the same file, byte for byte."""
    import copy

    from spectra.convert import pack_model
    from spectra.gguf_export import write_gguf

    _, frozen, tok = checkpoint
    for name, model in (("frozen", frozen), ("packed", pack_model(copy.deepcopy(frozen), qtype[:3]))):
        fused = copy.deepcopy(model)
        assert fused.fuse_projections() > 0
        write_gguf(model, tok, tmp_path / f"{name}.gguf", qtype)
        write_gguf(fused, tok, tmp_path / f"{name}_fused.gguf", qtype)
        assert (tmp_path / f"{name}_fused.gguf").read_bytes() == (tmp_path / f"{name}.gguf").read_bytes()
