"""Packed ternary weights: the TQ2/TQ1 linear layer, in-place model packing and packed checkpoints.

``PackedTernaryLinear`` holds the trits of a [out, in] matrix packed in the kernel layout of
:mod:`spectra.formats` (16-byte rows) plus its per-shard scales, and multiplies through
:func:`spectra.kernels.ternary_matmul` (Triton on CUDA where available, the unpack-then-matmul reference
elsewhere). In ``state_dict`` — hence in packed checkpoints — ``qweight`` is held in the storage layout
(ceil(k/G)-byte rows) so a checkpoint costs the format's true 2 or 1.6 bits per weight; loading converts back.

The weight kinds "tq2" and "tq1" are registered with :func:`spectra.linear.register_linear_kind`, so a
config with ``weight_kind="tq2"`` builds this layer and packed checkpoints load through
:func:`spectra.checkpoint.load_checkpoint`. ``weight_options["format_version"]`` records the layout version.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError, FormatError
from .formats import (
    FORMAT_VERSION,
    STORAGE_ALIGN_BYTES,
    check_format_version,
    from_storage,
    get_format,
    to_storage,
)
from .io import check_output, output_lock
from .kernels import KERNEL_DTYPES, scale_columns_reference, ternary_matmul, ternary_matmul_op
from .linear import (
    FloatLinear,
    FrozenTernaryLinear,
    ShardAxis,
    TernaryLinear,
    register_linear_kind,
    shard_bounds,
    ternary_dense_weight,
)
from .progress import progress_bar

PACKED_KINDS = ("tq2", "tq1")
PACK_OWNER = "pack"  # the marker of directories `spectra pack` wrote (spectra.io)


class PackedTernaryLinear(nn.Module):
    """y = x @ (trits * per-shard scales)^T with the trits packed in TQ2 (2 bits) or TQ1 (1.6 bits)."""

    def __init__(self, in_features: int, out_features: int, shard_axis: ShardAxis = 0, parts: int = 1,
                 device=None, dtype=None, *, format: str = "tq2", format_version: int = FORMAT_VERSION,
                 **unknown) -> None:
        super().__init__()
        if unknown:
            raise FormatError(f"unknown packed weight options {sorted(unknown)}; a packed layer takes only "
                              f"'format_version' (the checkpoint's config.json is corrupt or from a newer spectra)")
        fmt = get_format(format)
        check_format_version(format_version)
        shard_bounds((out_features, in_features)[shard_axis], parts)  # validates the split
        self.format, self.format_version = fmt.name, format_version
        self.in_features, self.out_features = in_features, out_features
        self.shard_axis, self.parts = shard_axis, parts
        # Start from packed all-zero trits (a valid encoding) rather than zero bytes (all -1 in TQ2). The
        # pattern is packed on CPU explicitly so meta-device models (size accounting) build too.
        zero_row = fmt.pack(torch.zeros(1, in_features, dtype=torch.int8, device="cpu"))
        qweight = torch.empty(out_features, zero_row.shape[1], dtype=torch.uint8, device=device)
        self.register_buffer("qweight", qweight.copy_(zero_row.expand(out_features, -1)))
        # Scales stay fp32 whatever the activation dtype: the dense weight is built in fp32 (exact trits * s).
        self.register_buffer("scales", torch.ones(parts, dtype=torch.float32, device=device))
        # the unit scale the compiled path passes once x carries the column-shard scales (a buffer, so a
        # compiled step does not launch a kernel per layer to create it)
        self.register_buffer("unit_scale", torch.ones(1, dtype=torch.float32, device=device), persistent=False)

    @classmethod
    def from_trits(cls, trits: torch.Tensor, scales: torch.Tensor, shard_axis: ShardAxis = 0,
                   format: str = "tq2") -> PackedTernaryLinear:
        """Pack int8 trits [out, in] in {-1, 0, 1} with their per-shard scales [P]."""
        scales = scales.reshape(-1)
        layer = cls(trits.shape[1], trits.shape[0], shard_axis, scales.numel(), device=trits.device, format=format)
        layer.qweight = get_format(format).pack(trits)
        layer.scales = scales.detach().to(torch.float32).clone()
        return layer

    def trits(self) -> torch.Tensor:
        """The int8 trit matrix [out, in] (unpacked)."""
        return get_format(self.format).unpack(self.qweight, self.in_features)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return ternary_dense_weight(self.trits(), self.scales, self.shard_axis, dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # an opaque op for torch.compile: the graph keeps our kernel, inductor fuses what surrounds it
            if self.shard_axis == 1 and self.parts > 1 and x.is_cuda and x.dtype in KERNEL_DTYPES:
                # Column-shard scales: the GPU path multiplies x by them (fp32 product, cast back) before the
                # kernel; written here as a pointwise op, inductor fuses it into x's producer instead of the op
                # launching a kernel for it. Bitwise the same x, then a unit scale.
                x = scale_columns_reference(x, self.scales, self.in_features)
                return ternary_matmul_op(x, self.qweight, self.format, self.in_features, self.unit_scale, 0)
            return ternary_matmul_op(x, self.qweight, self.format, self.in_features, self.scales, self.shard_axis)
        return ternary_matmul(x, self.qweight, self.format, self.in_features, self.scales, self.shard_axis)

    # --- storage layout in state_dict --------------------------------------------------------------
    def storage_row_bytes(self) -> int:
        return get_format(self.format).row_bytes(self.in_features, STORAGE_ALIGN_BYTES)

    def storage_bits(self) -> float:
        """Bits this layer takes in a packed checkpoint: packed rows (with padding) plus fp32 scales."""
        return 8.0 * self.out_features * self.storage_row_bytes() + 8.0 * self.scales.element_size() * self.parts

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight.is_meta:  # shapes only (size accounting on meta-device models)
            stored = torch.empty(self.out_features, self.storage_row_bytes(), dtype=torch.uint8, device="meta")
        else:
            stored = to_storage(self.qweight, self.format, self.in_features)
        destination[prefix + "qweight"] = stored

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "qweight"
        stored = state_dict.get(key)
        if stored is not None and tuple(stored.shape) == (self.out_features, self.storage_row_bytes()):
            try:
                kernel_rows = from_storage(stored, self.format, self.in_features)
            except FormatError as err:
                raise FormatError(f"{key}: {err}") from None
            state_dict = {**state_dict, key: kernel_rows}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"parts={self.parts}, shard_axis={self.shard_axis}")


for _kind in PACKED_KINDS:
    register_linear_kind(_kind, functools.partial(PackedTernaryLinear, format=_kind))


def concat_output_rows(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing ``cat([layer(x) for layer in layers], -1)`` exactly, or None where that is not
    possible. Float layers join freely; frozen-ternary and packed layers must share kind, format, sizes and
    shard count P, with their P scales on the output rows (or P = 1), and n % P == 0: then the k * P scales of
    the joined layer cover exactly the rows they covered before (torch.tensor_split of k * n rows)."""
    first = layers[0]
    kind = type(first)
    if any(type(layer) is not kind or layer.in_features != first.in_features for layer in layers):
        return None
    out_features = sum(layer.out_features for layer in layers)
    if kind is FloatLinear:
        fused = FloatLinear(first.in_features, out_features, device=first.weight.device, dtype=first.weight.dtype)
        fused.weight.copy_(torch.cat([layer.weight for layer in layers]))
        return fused
    if kind not in (FrozenTernaryLinear, PackedTernaryLinear):
        return None
    same = all(layer.out_features == first.out_features and layer.parts == first.parts
               and getattr(layer, "format", None) == getattr(first, "format", None) for layer in layers)
    if not same or (first.parts > 1 and (first.shard_axis != 0 or first.out_features % first.parts)):
        return None
    scales = torch.cat([layer.scales.reshape(-1) for layer in layers])
    if kind is FrozenTernaryLinear:
        return FrozenTernaryLinear.from_trits(torch.cat([layer.trits for layer in layers]), scales, 0,
                                              dtype=first.scales.dtype)
    fused = PackedTernaryLinear(first.in_features, out_features, 0, scales.numel(), device=first.qweight.device,
                                format=first.format)
    fused.qweight = torch.cat([layer.qweight for layer in layers])
    fused.scales = scales.to(torch.float32)
    return fused


# --- packing a model in place ------------------------------------------------------------------------

def ternary_values(name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 trits, per-shard scales) of any ternary linear layer; FormatError for float weights."""
    from .checkpoint import detect_ternary

    if isinstance(module, PackedTernaryLinear):
        return module.trits(), module.scales
    if isinstance(module, FrozenTernaryLinear):
        return module.trits, module.scales
    if isinstance(module, TernaryLinear):
        return module.freeze()
    if isinstance(module, FloatLinear):
        w = module.weight.detach()
        found = detect_ternary(w, module.parts, module.shard_axis)
        if found is not None:
            return found
        distinct = torch.unique(w.abs().flatten()[:1_000_000]).numel()
        raise FormatError(f"{name} is not ternary: it holds {distinct}{'+' if w.numel() > 1_000_000 else ''} "
                          f"distinct magnitudes where a ternary matrix with {module.parts} shard scale(s) has at "
                          f"most {module.parts + 1}; only TriLM checkpoints can be packed (a FloatLM cannot be "
                          f"made ternary without loss)")
    raise FormatError(f"{name} is a {type(module).__name__}, which has no ternary values to pack")


@torch.no_grad()
def pack_model(model: nn.Module, fmt: str, progress: bool = False) -> nn.Module:
    """Replace every linear layer of `model` (TernaryLinear, FrozenTernaryLinear, a ternary FloatLinear or
    another packed format) by a PackedTernaryLinear in format `fmt`; the model is left unchanged on error."""
    fmt = get_format(fmt).name
    layers = model.linear_layers()
    values = {name: ternary_values(name, m) for name, m in layers.items()}  # all checks before any change
    for name, module in progress_bar(layers.items(), desc=f"packing {fmt}", disable=not progress, leave=False):
        trits, scales = values[name]
        packed = PackedTernaryLinear.from_trits(trits, scales.float(), module.shard_axis, fmt)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, packed)
    model.config = model.config.replace(weight_kind=fmt, weight_options={"format_version": FORMAT_VERSION})
    return model


# --- packed checkpoints ------------------------------------------------------------------------------

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


def stored_tensor_bytes(path: str | Path) -> dict[str, int]:
    """Name -> bytes of every tensor of a checkpoint directory, read from the safetensors headers."""
    from .checkpoint import weight_files
    from .tensor_table import read_headers

    return {name: info.nbytes for name, info in read_headers(weight_files(Path(path))).items()}


def _stored_float_dtype(path: Path) -> torch.dtype:
    """dtype of the checkpoint's embedding as stored, so re-saving other tensors loses nothing."""
    from .checkpoint import weight_files
    from .tensor_table import read_headers

    embedding = read_headers(weight_files(path)).get("model.embed_tokens.weight")
    if embedding is None:
        raise CheckpointError(f"{path} has no model.embed_tokens.weight; is it a LLaMA-style checkpoint?")
    return embedding.dtype if embedding.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def pack_checkpoint(source: str | Path, out: str | Path, fmt: str, dtype: torch.dtype | None = None,
                    progress: bool = False, force: bool = False, allow_nonfinite: bool = False) -> PackReport:
    """Pack a TriLM checkpoint directory (spectra, or a SpectraSuite-style unpacked one) into `out`.

    Embeddings, norms and lm head keep the source's stored dtype (or `dtype`), so the packed model's logits
    equal the unpacked model's. The tokenizer is carried over when the source has one. `out` is locked while
    packing and replaced atomically; an existing `out` that is not an earlier `pack` output needs `force`.
    """
    from .checkpoint import load_checkpoint, read_config, save_checkpoint
    from .tokenizer import TOKENIZER_FILE, load_tokenizer

    source, out = Path(source), Path(out)
    get_format(fmt)
    with output_lock(out, PACK_OWNER):
        check_output(out, PACK_OWNER, force=force, sources=[source])
        config = read_config(source)
        if config.weight_kind in PACKED_KINDS and config.weight_kind == fmt.lower():
            raise CheckpointError(f"{source} is already a {fmt} checkpoint; nothing to pack")
        store_dtype = dtype or _stored_float_dtype(source)
        model = load_checkpoint(source, device="cpu", dtype=torch.float32, allow_nonfinite=allow_nonfinite)
        pack_model(model, fmt, progress=progress)
        tokenizer = load_tokenizer(source) if (source / TOKENIZER_FILE).is_file() else None
        save_checkpoint(model, out, tokenizer=tokenizer, dtype=store_dtype, owner=PACK_OWNER, force=force)
    return pack_report(out)


def pack_report(path: str | Path) -> PackReport:
    """Sizes of a packed checkpoint directory, from the bytes it actually stores."""
    from .checkpoint import read_config
    from .size import count_parameters

    path = Path(path)
    config = read_config(path)
    if config.weight_kind not in PACKED_KINDS:
        raise CheckpointError(f"{path} holds {config.weight_kind} weights, not a packed format "
                              f"({', '.join(PACKED_KINDS)}); pack it first with `spectra pack`")
    sizes = stored_tensor_bytes(path)
    counts = count_parameters(config)
    linear = sum(n for name, n in sizes.items() if "_proj." in name)
    return PackReport(format=config.weight_kind, linear_weights=counts.linear, fp16_linear_bytes=2 * counts.linear,
                      packed_linear_bytes=linear, fp16_total_bytes=2 * counts.total,
                      stored_total_bytes=sum(sizes.values()))

