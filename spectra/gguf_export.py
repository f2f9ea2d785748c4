"""GGUF export for llama.cpp: architecture `llama`, byte-level BPE tokenizer, TQ1_0 / TQ2_0 / F16 weights.

llama.cpp's TQ1_0 and TQ2_0 hold one fp16 scale per 256-weight block along a row (the `ne0` axis, our
in_features). A TriLM matrix with one scale, or with per-shard scales split along its output rows
(column-parallel q, k, v, gate, up), therefore maps exactly: every block lies inside one scale's shard.
Row-parallel matrices (o, down) with P > 1 scales split each row; they map only when every shard boundary
is a multiple of 256 columns, otherwise that matrix is written as F16 (exact trits times the fp16-rounded
scale) and the export warns, naming the matrix and the reason. The block quantization itself is the `gguf`
package's (gguf.quants), applied to trits * scale, which it recovers exactly (d = max|block| = scale).

llama.cpp applies RoPE to interleaved pairs where Hugging Face LLaMA uses the rotate-half layout, so the
rows of the query and key projections are permuted within each head, as llama.cpp's own converter does.
See docs/formats.md for the full mapping.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .block import spec_of
from .checkpoint import load_checkpoint, read_config
from .errors import CheckpointError, FormatError, SpectraError
from .io import atomic_file, check_output, output_lock
from .model import SpectraLM
from .packed import ternary_values
from .progress import progress_bar
from .ternary import shard_bounds, ternary_dense_weight
from .tokenizer import EOS_TOKEN, load_tokenizer

GGUF_TYPES = ("tq1_0", "tq2_0", "f16")
GGUF_OWNER = "export gguf"
QK_K = 256  # weights per TQ1_0 / TQ2_0 block


class GGUFFallbackWarning(UserWarning):
    """Some ternary matrices could not use the requested TQ type and were written as F16."""


@dataclass
class GGUFExportReport:
    path: Path
    type: str
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF tensor name -> GGML type name
    fallbacks: dict[str, str] = field(default_factory=dict)     # GGUF tensor name -> why it is F16
    bytes: int = 0
    weight_kind: str = ""  # of the exported model; a QuantLM's matrices are written dequantized (F16 only)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise SpectraError("GGUF export needs the `gguf` package: pip install gguf (or, in a clone of spectra, "
                           "pip install -e \".[gguf]\")") from None
    return gguf


def tq_block_misfit(in_features: int, shard_axis: int, parts: int) -> str | None:
    """Why a ternary [*, in_features] matrix cannot be TQ1_0/TQ2_0 exactly, or None when it can."""
    if in_features % QK_K:
        return f"rows of {in_features} weights, not a multiple of the {QK_K}-weight TQ block"
    if shard_axis == 1 and parts > 1:
        inside = [start for start, _ in shard_bounds(in_features, parts) if start % QK_K]
        if inside:
            return (f"{parts} per-shard scales that split each row at column {inside[0]}, inside a {QK_K}-weight "
                    f"block that holds only one scale")
    return None


def fallback_message(fallbacks: dict[str, str], qtype: str) -> str:
    """One warning line for the matrices written as F16: how many, then each reason with the matrices it names."""
    def matrices(n: int) -> str:
        return f"{n} matrix" if n == 1 else f"{n} matrices"

    by_reason: dict[str, list[str]] = {}
    for name, why in fallbacks.items():
        by_reason.setdefault(why, []).append(name)
    parts = [f"{matrices(len(names))} with {why} ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})"
             for why, names in by_reason.items()]
    return f"{matrices(len(fallbacks))} written as F16 instead of {qtype.upper()}: {'; '.join(parts)}"


def permute_for_llama_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of the query/key projections from the rotate-half RoPE layout to llama.cpp's interleaved pairs, per head."""
    out, cols = weight.shape
    return weight.reshape(num_heads, 2, out // num_heads // 2, cols).transpose(1, 2).reshape(out, cols)


# --- tokenizer ---------------------------------------------------------------------------------------

@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    eos_id: int | None


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """Tokens, token types, merges and pre-tokenizer name of a byte-level BPE `tokenizers.Tokenizer`,
    as llama.cpp's `gpt2` tokenizer model reads them (ids past the tokenizer's vocabulary become [PADi])."""
    gguf = _gguf()
    data = json.loads(tokenizer.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise FormatError("GGUF export supports byte-level BPE tokenizers (GPT-2/GPT-NeoX style) only; this "
                          f"tokenizer is {model.get('type')!r} with a {(data.get('decoder') or {}).get('type')!r} "
                          "decoder")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise FormatError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                          f"{vocab_size}; the tokenizer does not belong to this checkpoint")
    added = tokenizer.get_added_tokens_decoder()
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocab(tokens, types, merges, _pre_tokenizer_name(data.get("pre_tokenizer")),
                     tokenizer.token_to_id(EOS_TOKEN))


def _pre_tokenizer_name(pre: dict | None) -> str:
    # ByteLevel with its built-in regex is GPT-2's pre-tokenization, which llama.cpp calls "gpt-2".
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    warnings.warn("the tokenizer's pre-tokenizer is not plain GPT-2 ByteLevel; the GGUF says 'default' and "
                  "llama.cpp may split text differently from the tokenizer", GGUFFallbackWarning, stacklevel=3)
    return "default"


def _add_vocab(writer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    if vocab.eos_id is not None:
        # GPT-NeoX style: one end-of-text token serves as BOS and EOS; no BOS is prepended (spectra never does).
        writer.add_bos_token_id(vocab.eos_id)
        writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


# --- weights -----------------------------------------------------------------------------------------

def _linear_tensor(name: str, module, config, qtype: str):
    """(numpy data, GGML type) for one linear layer, and the fallback reason (or None)."""
    gguf = _gguf()
    ggml = gguf.GGMLQuantizationType
    if qtype == "f16":
        # every kind's exact weight: float as it is, trits times scales, a QuantLM's codes dequantized
        weight, misfit = module.dense_weight().detach().float(), None
    else:
        try:
            trits, scales = ternary_values(name, module)
        except FormatError as err:
            raise FormatError(f"{err}; a FloatLM or QuantLM exports with --type f16 (QuantLM weights "
                              f"dequantized)") from None
        weight = ternary_dense_weight(trits, scales.float(), module.shard_axis, torch.float32)
        misfit = tq_block_misfit(module.in_features, module.shard_axis, module.parts)
    if spec_of(name).rotary:
        weight = permute_for_llama_rope(weight, config.num_heads)
    array = weight.cpu().numpy()
    if qtype == "f16" or misfit is not None:
        return array.astype(np.float16), ggml.F16, misfit
    kind = ggml.TQ1_0 if qtype == "tq1_0" else ggml.TQ2_0
    return gguf.quants.quantize(array, kind), kind, None


def write_gguf(model: SpectraLM, tokenizer, path: str | Path, qtype: str = "tq2_0", name: str = "spectra",
               progress: bool = False, force: bool = False) -> GGUFExportReport:
    """Write `model` and its byte-level BPE `tokenizer` to the GGUF file `path` (atomically). An existing
    `path` that is not a GGUF file is refused unless `force`."""
    gguf = _gguf()
    check_output(path, GGUF_OWNER, force=force, kind="file", recognize=is_gguf_file)
    qtype = qtype.lower()
    if qtype not in GGUF_TYPES:
        raise FormatError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(GGUF_TYPES)}")
    if tokenizer is None:
        raise CheckpointError("GGUF export needs the tokenizer (llama.cpp reads the vocabulary from the GGUF); "
                              "use a checkpoint directory with tokenizer.json")
    config, path = model.config, Path(path)
    vocab = gguf_vocab(tokenizer, config.vocab_size)
    report = GGUFExportReport(path=path, type=qtype, weight_kind=config.weight_kind)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_layers)
    linear = model.separate_linear_layers()  # llama.cpp reads q/k/v and gate/up separately, fused or not

    tensors: list[tuple[str, np.ndarray, object]] = []
    for hf_name, module in progress_bar(linear.items(), desc=f"GGUF {qtype}", disable=not progress, leave=False):
        data, kind, misfit = _linear_tensor(hf_name, module, config, qtype)
        gname = names.get_name(f"{hf_name}.weight", try_suffixes=(".weight",))
        tensors.append((gname, data, kind))
        if misfit is not None:
            report.fallbacks[gname] = misfit
    fused_or_not = model.linear_layers()
    for hf_name, tensor in model.state_dict().items():
        if hf_name.rsplit(".", 1)[0] in fused_or_not:
            continue
        array = tensor.detach().float().cpu().numpy()
        # llama.cpp keeps 1-D tensors (norm gains) in F32; embeddings and lm head go F16.
        kind = gguf.GGMLQuantizationType.F32 if array.ndim == 1 else gguf.GGMLQuantizationType.F16
        array = array if array.ndim == 1 else array.astype(np.float16)
        tensors.append((names.get_name(hf_name, try_suffixes=(".weight",)), array, kind))

    if report.fallbacks:
        warnings.warn(fallback_message(report.fallbacks, qtype), GGUFFallbackWarning, stacklevel=2)

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _add_hparams(writer, config, qtype, name)
        _add_vocab(writer, vocab)
        for gname, data, kind in tensors:
            writer.add_tensor(gname, data, raw_dtype=kind)
            report.tensor_types[gname] = kind.name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    report.bytes = path.stat().st_size
    return report


def _add_hparams(writer, config, qtype: str, name: str) -> None:
    gguf = _gguf()
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
                  "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0}
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_file_type(file_types[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(checkpoint: str | Path, path: str | Path, qtype: str = "tq2_0", progress: bool = False,
                force: bool = False, allow_nonfinite: bool = False) -> GGUFExportReport:
    """Export a checkpoint directory (dense, ternary or packed, with tokenizer.json) to a GGUF file."""
    checkpoint = Path(checkpoint)
    if qtype.lower() not in GGUF_TYPES:
        raise FormatError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(GGUF_TYPES)}")
    with output_lock(path, GGUF_OWNER):
        check_output(path, GGUF_OWNER, force=force, kind="file", recognize=is_gguf_file, sources=[checkpoint])
        read_config(checkpoint)  # a missing or foreign directory fails here, before the tokenizer is looked for
        tokenizer = load_tokenizer(checkpoint)
        model = load_checkpoint(checkpoint, device="cpu", dtype=torch.float32, allow_nonfinite=allow_nonfinite)
        return write_gguf(model, tokenizer, path, qtype, name=checkpoint.name, progress=progress, force=force)


def is_gguf_file(path: Path) -> bool:
    """A file that starts with the GGUF magic (a previous export, safe to replace)."""
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"
