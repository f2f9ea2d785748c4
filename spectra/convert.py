"""One verb that changes how a model holds its linear weights: ``convert_(model, spec)``, in place.

A spec is a small dataclass naming the target layout (as torchao's ``quantize_(model, config)``):

    convert_(model, FrozenTernary())            latent TriLM weights -> exact int8 trits + per-shard scales
    convert_(model, Packed("tq1"))              any ternary weights -> TQ2/TQ1 packed (lossless)
    convert_(model, Quantized(QuantConfig()))   FloatLM -> QuantLM by GPTQ or round-to-nearest
    convert_(model, FusedProjections())         q/k/v and gate/up joined for inference (same weights)

and :func:`convert_checkpoint` does the same from one checkpoint directory to another (``spectra pack``,
``spectra quantize``). Each spec's handler builds the new layers and swaps them in with the one helper
:func:`spectra.linear.replace_layers`; :func:`convert_` then records the new weight kind in ``model.config``, here
and nowhere else. Nothing here trains: turning a FloatLM into a TriLM (``spectra convert --to ternary``,
:mod:`spectra.finetune.convert`) is training, and lives with fine-tuning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .block import is_block_linear_tensor
from .checkpoint import load_checkpoint, read_config, save_checkpoint, stored_tensor_bytes, weight_files
from .config import DENSE_KINDS
from .errors import CheckpointError, ConfigError, DataError
from .formats import FORMAT_VERSION, check_format_version, get_format
from .io import check_output, output_lock
from .kinds import PACKED_KINDS
from .linear import frozen_layers, replace_layers
from .packed import packed_layers
from .quant.calib import calibration_tokens
from .quant.grid import QuantConfig
from .quant.linear import KIND as QUANT_KIND
from .quant.pipeline import QuantReport, quantize_layers
from .size import count_parameters
from .tensor_table import read_headers
from .tokenizer import TOKENIZER_FILE, load_tokenizer

PACK_OWNER = "pack"  # the marker of directories `spectra pack` wrote (spectra.io)
QUANTIZE_OWNER = "quantize"  # the marker of directories `spectra quantize` wrote (spectra.io)
REPORT_FILE = "quantization.json"  # what a quantization run did, written beside the QuantLM checkpoint


# --- specs ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FrozenTernary:
    """Latent TriLM weights (TernaryLinear) to their exact trits and scales (FrozenTernaryLinear)."""


@dataclass(frozen=True)
class Packed:
    """Every linear layer packed in `format` ("tq2", "tq1"; spectra.formats) at layout `format_version`."""

    format: str = "tq2"
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", get_format(self.format).name)
        check_format_version(self.format_version)


@dataclass(frozen=True, eq=False)
class Quantized:
    """A FloatLM's linear layers quantized as `config` says (GPTQ or RTN). `calibration` holds token ids
    [samples, seq_len]: GPTQ needs it, RTN uses it only to report errors."""

    config: QuantConfig
    calibration: torch.Tensor | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size (calibration sequences per forward pass) must be at least 1, "
                              f"got {self.batch_size}")


@dataclass(frozen=True)
class FusedProjections:
    """Inference only: each block's layers that read the same input joined into one (SpectraLM.fuse_projections)."""


ConvertSpec = FrozenTernary | Packed | Quantized | FusedProjections


@dataclass(frozen=True)
class _Converted:
    kind: str | None            # the model's new weight kind (None: unchanged)
    options: dict | None = None  # its new weight_options (None: unchanged)
    report: Any = None


def _freeze(model: nn.Module, spec: FrozenTernary, progress: bool) -> _Converted:
    replace_layers(model, frozen_layers(model))
    return _Converted("ternary_frozen")


def _pack(model: nn.Module, spec: Packed, progress: bool) -> _Converted:
    replace_layers(model, packed_layers(model, spec.format, progress=progress))
    return _Converted(spec.format, {"format_version": spec.format_version})


def _quantize(model: nn.Module, spec: Quantized, progress: bool) -> _Converted:
    report = quantize_layers(model, spec.config, spec.calibration, spec.batch_size, progress)
    return _Converted(QUANT_KIND, spec.config.weight_options(), report)


def _fuse(model: nn.Module, spec: FusedProjections, progress: bool) -> _Converted:
    return _Converted(None, report=model.fuse_projections())


_HANDLERS = {FrozenTernary: _freeze, Packed: _pack, Quantized: _quantize, FusedProjections: _fuse}


def convert_(model: nn.Module, spec: ConvertSpec, *, progress: bool = False) -> Any:
    """Convert `model`'s linear layers in place as `spec` says; returns the spec's report (a QuantReport for
    Quantized, the number of fused groups for FusedProjections, else None). On an error (e.g. packing a
    FloatLM) the model is left as it was, except that GPTQ stops midway through the layers."""
    try:
        handler = _HANDLERS[type(spec)]
    except KeyError:
        raise ConfigError(f"unknown conversion {spec!r}; use one of {', '.join(t.__name__ for t in _HANDLERS)}") \
            from None
    done = handler(model, spec, progress)
    if done.kind is not None and hasattr(model, "config"):
        options = {} if done.options is None else {"weight_options": done.options}
        model.config = model.config.replace(weight_kind=done.kind, **options)
    return done.report


# --- the old verbs, one line each ------------------------------------------------------------------------

def freeze_ternary(model: nn.Module) -> nn.Module:
    """Replace every TernaryLinear in `model` by a FrozenTernaryLinear holding its exact trits and scales."""
    convert_(model, FrozenTernary())
    return model


def pack_model(model: nn.Module, fmt: str, progress: bool = False) -> nn.Module:
    """Replace every linear layer of `model` by a PackedTernaryLinear in format `fmt` (convert_ with Packed)."""
    convert_(model, Packed(fmt), progress=progress)
    return model


def quantize_model(model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None = None,
                   batch_size: int = 8, progress: bool = True) -> QuantReport:
    """Replace every block linear layer of the FloatLM `model` by a QuantLinear (convert_ with Quantized)."""
    return convert_(model, Quantized(config, calibration, batch_size), progress=progress)


# --- checkpoint directories --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """Calibration data for GPTQ from `path` (prepared shards, .npy, .jsonl, a text file or folder);
    `seq_len` defaults to min(2048, the model's max_seq_len)."""

    path: str | Path
    samples: int = 128
    seq_len: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1 or (self.seq_len is not None and self.seq_len < 1):  # 0 is not "the default"
            raise ConfigError(f"calibration samples and seq_len must be at least 1, got {self.samples} and "
                              f"{self.seq_len}")


@dataclass(frozen=True)
class PackReport:
    format: str
    linear_weights: int      # weights of the block linear layers
    fp16_linear_bytes: int   # those weights in fp16
    packed_linear_bytes: int  # bytes stored for them: packed rows (with padding) + scales
    fp16_total_bytes: int    # the whole model in fp16
    stored_total_bytes: int  # all tensors of the written checkpoint

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.packed_linear_bytes / self.linear_weights

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_weight": self.bits_per_weight}


def convert_checkpoint(source: str | Path, out: str | Path, spec: Packed | Quantized, *,
                       dtype: torch.dtype | None = None, calibration: Calibration | None = None,
                       device: str = "cpu", progress: bool = False, force: bool = False,
                       allow_nonfinite: bool = False) -> PackReport | QuantReport:
    """Convert the checkpoint directory `source` as `spec` says and write the result to `out`, with the
    tokenizer when `source` has one.

    Packed: a TriLM checkpoint (spectra, or a SpectraSuite-style unpacked one); embeddings, norms and lm head
    keep the source's stored dtype unless `dtype`, so the packed model's logits equal the unpacked model's.
    Quantized: a FloatLM checkpoint, quantized on `device` with `calibration` data (GPTQ needs it), written with
    a quantization.json report; the float tensors in `dtype` (None: as loaded). `out` is locked while converting
    and replaced atomically; an existing `out` that is not an earlier output of the same command needs `force`.
    """
    source, out = Path(source), Path(out)
    if isinstance(spec, Packed):
        owner, sources = PACK_OWNER, [source]
    elif isinstance(spec, Quantized):
        owner, sources = QUANTIZE_OWNER, [source] + ([Path(calibration.path)] if calibration else [])
    else:
        raise ConfigError(f"{type(spec).__name__} converts models in memory only; checkpoints convert to Packed "
                          f"or Quantized (a frozen TriLM saves as its dense ternary checkpoint)")
    with output_lock(out, owner):
        check_output(out, owner, force=force, sources=sources)
        tokenizer = load_tokenizer(source) if (source / TOKENIZER_FILE).is_file() else None
        if isinstance(spec, Packed):
            model, dtype, extra, report = _packed_model(source, spec, dtype, progress, allow_nonfinite)
        else:
            model, extra, report = _quantized_model(source, spec, tokenizer, calibration, device, progress,
                                                    allow_nonfinite)
        save_checkpoint(model, out, tokenizer=tokenizer, dtype=dtype, extra_files=extra, owner=owner, force=force)
    return pack_report(out) if isinstance(spec, Packed) else report


def _packed_model(source: Path, spec: Packed, dtype: torch.dtype | None, progress: bool, allow_nonfinite: bool):
    config = read_config(source)
    if config.weight_kind == spec.format:
        raise CheckpointError(f"{source} is already a {spec.format} checkpoint; nothing to pack")
    store_dtype = dtype or _stored_float_dtype(source)
    model = load_checkpoint(source, device="cpu", dtype=torch.float32, allow_nonfinite=allow_nonfinite)
    convert_(model, spec, progress=progress)
    return model, store_dtype, None, None


def _quantized_model(source: Path, spec: Quantized, tokenizer, calibration: Calibration | None, device: str,
                     progress: bool, allow_nonfinite: bool):
    stored_kind = read_config(source).weight_kind
    if stored_kind not in DENSE_KINDS:
        raise ConfigError(f"{source} holds {stored_kind!r} weights; quantize the FloatLM checkpoint it came from")
    model = load_checkpoint(source, device=device, kind="float", allow_nonfinite=allow_nonfinite)
    tokens, seq_len = None, None
    if calibration is not None:
        seq_len = calibration.seq_len or min(2048, model.config.max_seq_len)
        tokens = calibration_tokens(calibration.path, tokenizer, calibration.samples, seq_len, calibration.seed)
    elif spec.config.method == "gptq":
        raise DataError("GPTQ needs calibration data: pass --calib (text, a folder of text or prepared shards), "
                        "or use --method rtn")
    report = convert_(model, Quantized(spec.config, tokens, spec.batch_size), progress=progress)
    text = json.dumps({"source": str(source), "calibration": str(calibration.path) if calibration else None,
                       "samples": calibration.samples if calibration else 0, "seq_len": seq_len or 0,
                       "seed": calibration.seed if calibration else 0, **report.to_dict()}, indent=2)
    return model, {REPORT_FILE: text + "\n"}, report


def _stored_float_dtype(path: Path) -> torch.dtype:
    """dtype of the checkpoint's embedding as stored, so re-saving other tensors loses nothing."""
    embedding = read_headers(weight_files(path)).get("model.embed_tokens.weight")
    if embedding is None:
        raise CheckpointError(f"{path} has no model.embed_tokens.weight; is it a LLaMA-style checkpoint?")
    return embedding.dtype if embedding.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def pack_report(path: str | Path) -> PackReport:
    """Sizes of a packed checkpoint directory, from the bytes it actually stores."""
    path = Path(path)
    config = read_config(path)
    if config.weight_kind not in PACKED_KINDS:
        raise CheckpointError(f"{path} holds {config.weight_kind} weights, not a packed format "
                              f"({', '.join(PACKED_KINDS)}); pack it first with `spectra pack`")
    sizes = stored_tensor_bytes(path)
    counts = count_parameters(config)
    linear = sum(n for name, n in sizes.items() if is_block_linear_tensor(name))
    return PackReport(format=config.weight_kind, linear_weights=counts.linear, fp16_linear_bytes=2 * counts.linear,
                      packed_linear_bytes=linear, fp16_total_bytes=2 * counts.total,
                      stored_total_bytes=sum(sizes.values()))


def pack_checkpoint(source: str | Path, out: str | Path, fmt: str, dtype: torch.dtype | None = None,
                    progress: bool = False, force: bool = False, allow_nonfinite: bool = False) -> PackReport:
    """Pack a TriLM checkpoint directory into `out` (convert_checkpoint with Packed)."""
    return convert_checkpoint(source, out, Packed(fmt), dtype=dtype, progress=progress, force=force,
                              allow_nonfinite=allow_nonfinite)


def quantize_checkpoint(source: str | Path, out: str | Path, config: QuantConfig, calib: str | Path | None = None,
                        samples: int = 128, seq_len: int | None = None, seed: int = 0, device: str = "cpu",
                        save_dtype: torch.dtype | None = torch.float16, batch_size: int = 8,
                        progress: bool = True, force: bool = False, allow_nonfinite: bool = False) -> QuantReport:
    """Quantize the FloatLM checkpoint `source` into the QuantLM checkpoint `out` (convert_checkpoint with
    Quantized)."""
    calibration = Calibration(calib, samples, seq_len, seed) if calib is not None else None
    return convert_checkpoint(source, out, Quantized(config, batch_size=batch_size), dtype=save_dtype,
                              calibration=calibration, device=device, progress=progress, force=force,
                              allow_nonfinite=allow_nonfinite)
