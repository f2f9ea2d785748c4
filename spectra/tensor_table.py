"""The tensors a checkpoint holds (read from safetensors headers) against the tensors its config.json implies.

Loading checks this table before allocating anything: a config that disagrees with the files (a missing
tensor, a shape or dtype the config does not imply, an absurd size such as vocab_size 1e11 on a 600 KB file)
or a tensor the model would not consume (biases of a transformers checkpoint with `attention_bias` /
`mlp_bias`, anything else) is one CheckpointError naming the tensors and the fix. Only each file's JSON
header is read (its length checked against the file size first), never the tensor data.
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .block import BLOCK_LINEARS
from .config import ModelConfig
from .errors import CheckpointError, SpectraWarning
from .kinds import make_linear
from .size import count_parameters

# safetensors' own limit on the JSON header; a larger one is junk, not a checkpoint.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
          "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
          "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# Tensors transformers has saved that spectra recomputes: ignored with a warning that names them.
HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)
# Layer index of a per-layer tensor name (the layer count is checked before the full table is built).
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class IgnoredTensorWarning(SpectraWarning):
    """A checkpoint tensor spectra does not need (a rotary cache) was skipped."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * (torch.finfo(self.dtype).bits if self.dtype.is_floating_point else
                    torch.iinfo(self.dtype).bits if self.dtype != torch.bool else 8) // 8


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Name -> shape, dtype of every tensor of one safetensors file, from its header only.

    The header length and every tensor's byte range are checked against the file size, so a truncated or junk
    file is one CheckpointError here instead of an error (or a huge allocation) later.
    """
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file} is {size} bytes, too short for a safetensors file; it is truncated "
                                      f"or not safetensors — re-download or re-save the checkpoint")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{file}: its header claims {length} bytes but the file holds {size}; the "
                                      f"file is truncated or not safetensors — re-download or re-save the checkpoint")
            raw = f.read(length)
    except OSError as err:
        raise CheckpointError(f"cannot read {file} ({err.strerror or err})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: the safetensors header is not valid JSON ({err}); the file is corrupt — "
                              f"re-download or re-save the checkpoint") from None
    data_bytes = size - 8 - length
    table: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        table[name] = info = _entry(file, name, entry)
        begin, end = entry["data_offsets"]
        if end - begin != info.nbytes or end > data_bytes:
            raise CheckpointError(f"{file}: tensor {name} ({list(info.shape)} {entry['dtype']}) needs bytes "
                                  f"[{begin}, {begin + info.nbytes}) but the file's data holds {data_bytes}; the "
                                  f"file is truncated or corrupt — re-download or re-save the checkpoint")
    return table


def _entry(file: Path, name: str, entry) -> TensorInfo:
    try:
        shape, offsets, dtype = entry["shape"], entry["data_offsets"], DTYPES[entry["dtype"]]
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError
        if len(offsets) != 2 or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[1] < offsets[0]:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{file}: the header entry of tensor {name} is malformed ({str(entry)[:80]}); the file "
                              f"is corrupt — re-download or re-save the checkpoint") from None
    return TensorInfo(tuple(shape), dtype, file.name)


def read_headers(files: Iterable[Path]) -> dict[str, TensorInfo]:
    """The tensor table of a checkpoint's weight files (a name held by two files is an error)."""
    table: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"weight file {file.name} is missing from {file.parent}")
        for name, info in read_header(file).items():
            if name in table:
                raise CheckpointError(f"tensor {name} is stored twice ({table[name].file} and {file.name}); "
                                      f"the checkpoint is inconsistent")
            table[name] = info
    return table


def expected_tensors(config: ModelConfig, dense: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a checkpoint of `config` holds.

    `dense`: float and ternary checkpoints store every linear layer as one dense `weight`; other kinds (packed,
    quant) store their own module tensors, taken from one meta-device module per distinct layer shape. No model
    is built (initialising one, even on the meta device, costs seconds). Call only once the config's sizes are
    known to be bounded by the files.
    """
    d, v = config.hidden_size, config.vocab_size
    table: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"model.embed_tokens.weight": ((v, d), torch.float32)}
    per_shape: dict[tuple[int, int, int], dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            table[f"{prefix}{norm}.weight"] = ((d,), torch.float32)
        for linear in BLOCK_LINEARS:
            in_features, out_features = linear.features(config)
            key = (out_features, in_features, linear.axis)
            if key not in per_shape:
                per_shape[key] = _linear_tensors(config, dense, in_features, out_features, linear.axis)
            for tensor, spec in per_shape[key].items():
                table[f"{prefix}{linear.path}.{tensor}"] = spec
    table["model.norm.weight"] = ((d,), torch.float32)
    table["lm_head.weight"] = ((v, d), torch.float32)
    return table


def _linear_tensors(config: ModelConfig, dense: bool, in_features: int, out_features: int,
                    axis: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if dense:
        return {"weight": ((out_features, in_features), torch.float32)}
    module = make_linear(config.weight_kind, in_features, out_features, axis, config.model_parallel_size,
                         config.weight_options, device="meta")
    return {name: (tuple(t.shape), t.dtype) for name, t in module.state_dict().items()}


def check_tensors(path: Path, config: ModelConfig, files: Iterable[Path], dense: bool) -> dict[str, TensorInfo]:
    """Compare the checkpoint's tensor table with what `config` implies; CheckpointError on any disagreement.

    Runs before anything is allocated: cheap checks bound the config's sizes by the files (embedding shape,
    parameter count against stored bytes, layer count), then every expected tensor's name, shape and dtype
    is compared. Known-harmless extras (a saved rotary cache) are dropped with an IgnoredTensorWarning.
    """
    table = read_headers(files)
    _check_sizes(path, config, table)
    _check_biases(path, table)
    expected = expected_tensors(config, dense)
    missing = [n for n in expected if n not in table]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensor(s) config.json implies ({_names(missing)}); "
                              f"config.json does not describe these weights — fix config.json or re-save the "
                              f"checkpoint")
    for name, (shape, dtype) in expected.items():
        info = table[name]
        if info.shape != shape:
            raise CheckpointError(f"{path}: {name} has shape {list(info.shape)} but config.json implies "
                                  f"{list(shape)}{_field_hint(name, config)}; config.json and the weights disagree "
                                  f"— fix config.json")
        if info.dtype.is_floating_point != dtype.is_floating_point or (
                not dtype.is_floating_point and info.dtype != dtype):
            raise CheckpointError(f"{path}: {name} is stored as {info.dtype} but a {config.weight_kind} checkpoint "
                                  f"holds {dtype if not dtype.is_floating_point else 'floating point'} there; the "
                                  f"file is not a spectra {config.weight_kind} checkpoint or is corrupt")
    extra = sorted(set(table) - set(expected))
    harmless = [n for n in extra if n.endswith(HARMLESS_SUFFIXES)]
    unused = [n for n in extra if n not in harmless]
    if unused:
        raise CheckpointError(f"{path} holds {len(unused)} tensor(s) the model would not use ({_names(unused)}); "
                              f"loading would silently drop them — remove them from the checkpoint if they are not "
                              f"part of the model, or load it with the library that wrote it")
    if harmless:
        warnings.warn(f"{path}: ignoring {len(harmless)} saved rotary-embedding cache tensor(s) "
                      f"({_names(harmless)}); spectra computes them from rope_theta", IgnoredTensorWarning,
                      stacklevel=3)
    return table


def _check_sizes(path: Path, config: ModelConfig, table: dict[str, TensorInfo]) -> None:
    """Cheap checks that bound the config's sizes by the files, before any model (even on meta) is built."""
    embed = table.get("model.embed_tokens.weight")
    want = (config.vocab_size, config.hidden_size)
    if embed is not None and embed.shape != want:
        raise CheckpointError(f"{path}: model.embed_tokens.weight has shape {list(embed.shape)} but config.json "
                              f"implies {list(want)} (vocab_size, hidden_size); fix config.json to match the weights")
    # The fewest bytes any weight kind stores: 1.6 bits per linear weight (TQ1), 16 per other parameter.
    counts = count_parameters(config)
    least = counts.linear * 1.6 / 8 + 2 * (counts.total - counts.linear)
    stored = sum(info.nbytes for info in table.values())
    if least > 1.01 * stored + 4096:
        raise CheckpointError(f"{path}: config.json implies {counts.total:,} parameters (at least "
                              f"{least / 1e6:,.1f} MB in any weight kind) but the weight files hold {stored / 1e6:,.1f}"
                              f" MB; config.json does not describe these weights (check vocab_size, hidden_size, "
                              f"intermediate_size, num_hidden_layers)")
    layers = {int(m.group(1)) for name in table if (m := _LAYER.match(name))}
    contiguous = not layers or (min(layers) == 0 and max(layers) == len(layers) - 1)
    if len(layers) != config.num_layers or not contiguous:
        held = f"layers 0..{max(layers)}" if contiguous and layers else f"{len(layers)} layer indices"
        raise CheckpointError(f"{path}: config.json says num_hidden_layers = {config.num_layers} but the weights "
                              f"hold {held}; fix num_hidden_layers in config.json")


def _check_biases(path: Path, table: dict[str, TensorInfo]) -> None:
    biases = sorted(n for n in table if n.endswith(".bias"))
    if biases:
        raise CheckpointError(f"{path} holds {len(biases)} bias tensor(s) ({_names(biases)}): a LLaMA with "
                              f"attention_bias or mlp_bias, which spectra's bias-free model cannot represent; "
                              f"loading would drop them and change the outputs (use transformers for this model)")


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "")


def _field_hint(name: str, config: ModelConfig) -> str:
    if "mlp." in name:
        return f" (hidden_size {config.hidden_size}, intermediate_size {config.intermediate_size})"
    if "self_attn." in name:
        return f" (hidden_size {config.hidden_size}, num_attention_heads {config.num_heads})"
    if "embed_tokens" in name or "lm_head" in name:
        return f" (vocab_size {config.vocab_size}, hidden_size {config.hidden_size})"
    return f" (hidden_size {config.hidden_size})"
