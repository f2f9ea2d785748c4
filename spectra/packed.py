"""Packed ternary weights: the TQ2/TQ1 linear layer, and the packed layers of a model.

``PackedTernaryLinear`` holds the trits of a [out, in] matrix packed in the kernel layout of
:mod:`spectra.formats` (16-byte rows) plus its per-shard scales, and multiplies through
:func:`spectra.kernels.ternary_matmul` (Triton on CUDA where available, the unpack-then-matmul reference
elsewhere). In ``state_dict`` — hence in packed checkpoints — ``qweight`` is held in the storage layout
(ceil(k/G)-byte rows) so a checkpoint costs the format's true 2 or 1.6 bits per weight; loading converts back.

Each format of :data:`spectra.formats.FORMATS` is a weight kind of the same name (:mod:`spectra.kinds`), so a
config with ``weight_kind="tq2"`` builds this layer and packed checkpoints load through
:func:`spectra.checkpoint.load_checkpoint`. ``weight_options["format_version"]`` records the layout version.
Packing a model or a checkpoint directory is :func:`spectra.convert.convert_` with a ``Packed`` spec.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import FormatError
from .formats import (
    FORMAT_VERSION,
    STORAGE_ALIGN_BYTES,
    check_format_version,
    from_storage,
    get_format,
    to_storage,
)
from .kernels import (
    KERNEL_DTYPES,
    fused_matmul_applies,
    scale_columns_reference,
    ternary_matmul,
    ternary_matmul_fused,
    ternary_matmul_op,
)
from .linear import FloatLinear, FrozenTernaryLinear, TernaryLinear, joined_scales
from .progress import progress_bar
from .ternary import ShardAxis, detect_ternary, expand_scales, shard_bounds, ternary_dense_weight


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
        # Output-row scales the kernel multiplies by instead of `scales` once fold_column_scales moved a
        # consumer's column-shard scales here (inference only; never saved: `scales` stay the true ones).
        self.register_buffer("kernel_scales", None, persistent=False)

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
        scales, axis = self._kernel_scales()
        if torch.compiler.is_compiling():
            # an opaque op for torch.compile: the graph keeps our kernel, inductor fuses what surrounds it
            if axis == 1 and self.parts > 1 and x.is_cuda and x.dtype in KERNEL_DTYPES:
                # Column-shard scales: the GPU path multiplies x by them (fp32 product, cast back) before the
                # kernel; written here as a pointwise op, inductor fuses it into x's producer instead of the op
                # launching a kernel for it. Bitwise the same x, then a unit scale.
                x = scale_columns_reference(x, scales, self.in_features)
                return ternary_matmul_op(x, self.qweight, self.format, self.in_features, self.unit_scale, 0)
            return ternary_matmul_op(x, self.qweight, self.format, self.in_features, scales, axis)
        return ternary_matmul(x, self.qweight, self.format, self.in_features, scales, axis)

    def _kernel_scales(self) -> tuple[torch.Tensor, int]:
        """(scales, shard axis) the kernels multiply by: the folded output-row scales where fold_column_scales
        moved them, else the true ones."""
        return (self.scales, self.shard_axis) if self.kernel_scales is None else (self.kernel_scales, 0)

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether :meth:`fused_forward` on `x` is one kernel (a decode-sized product on a GPU, in inference)."""
        scales, axis = self._kernel_scales()
        return not torch.is_grad_enabled() and fused_matmul_applies(x, self.qweight, self.format, self.in_features,
                                                                    scales, axis)

    def fused_forward(self, x: torch.Tensor, *, norm_of: torch.Tensor | None = None, eps: float = 0.0,
                      swiglu: bool = False, residual: torch.Tensor | None = None,
                      gain: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """This layer's product with a decode step's norm, SwiGLU and residual add taken into it
        (:func:`spectra.kernels.ternary_matmul_fused` explains the arguments)."""
        scales, axis = self._kernel_scales()
        return ternary_matmul_fused(x, self.qweight, self.format, self.in_features, scales, axis, norm_of=norm_of,
                                    eps=eps, swiglu=swiglu, residual=residual, gain=gain)

    @torch.no_grad()
    def fold_column_scales(self, producer: nn.Module, first_row: int) -> bool:
        """Inference only: move this layer's column-shard scales onto the output rows ``first_row ..
        first_row + in_features - 1`` of `producer`, whose outputs become this layer's inputs through an op
        that is linear in each channel (attention's weighted sum of v for o_proj; SwiGLU's product with up
        for down_proj). On a GPU the product then needs no pass over x to scale its columns: one kernel launch
        less per call. The true `scales` of both layers stay as they are (checkpoints, dense weights,
        :meth:`unfold_scales`); only what the kernels multiply by changes, so outputs differ by rounding only.
        Returns False (nothing changed) where the move does not apply: one scale, or either layer already
        folded, or a producer that is not packed, or whose scales are not on its output rows."""
        if (self.shard_axis != 1 or self.parts == 1 or self.kernel_scales is not None
                or not isinstance(producer, PackedTernaryLinear) or producer.kernel_scales is not None
                or (producer.shard_axis != 0 and producer.parts > 1)
                or first_row < 0 or first_row + self.in_features > producer.out_features):
            return False
        # in fp32 whatever the scales' dtype: two fp16 scales of ~1e-3 would multiply into fp16's subnormals
        rows = expand_scales(producer.scales.float(), (producer.out_features, 1), 0).flatten().clone()
        rows[first_row:first_row + self.in_features] *= expand_scales(self.scales.float(), (1, self.in_features),
                                                                      1).flatten()
        producer.kernel_scales = fewest_shard_scales(rows)
        self.kernel_scales = self.unit_scale
        return True

    def unfold_scales(self) -> None:
        """Undo :meth:`fold_column_scales` on this layer (either side): the kernels multiply by `scales` again."""
        self.kernel_scales = None

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

    @classmethod
    def join_output_rows(cls, layers: list[PackedTernaryLinear]) -> PackedTernaryLinear | None:
        scales = joined_scales(layers)
        if scales is None:
            return None
        first = layers[0]
        fused = cls(first.in_features, sum(layer.out_features for layer in layers), 0, scales.numel(),
                    device=first.qweight.device, format=first.format)
        fused.qweight = torch.cat([layer.qweight for layer in layers])
        fused.scales = scales.to(torch.float32)
        return fused

    def split_output_rows(self, pieces: int, parts: int) -> list[PackedTernaryLinear]:
        """The inverse of :meth:`join_output_rows`: `pieces` layers of equal rows, the scales shared out equally."""
        layers = []
        for rows, scales in zip(self.qweight.chunk(pieces), self.scales.chunk(pieces), strict=True):
            layer = PackedTernaryLinear(self.in_features, rows.shape[0], 0, scales.numel(), device="meta",
                                        format=self.format, format_version=self.format_version)
            layer.qweight, layer.scales = rows, scales
            layer.unit_scale = self.unit_scale
            layers.append(layer)
        return layers

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"parts={self.parts}, shard_axis={self.shard_axis}")


def fewest_shard_scales(per_row: torch.Tensor) -> torch.Tensor:
    """The shortest scale vector whose torch.tensor_split shards expand to `per_row` exactly (the kernels'
    per-shard form), or `per_row` itself where no shorter one does."""
    size = per_row.numel()
    runs = 1 + int((per_row[1:] != per_row[:-1]).sum())  # the only shard count that can work
    starts = torch.tensor([start for start, _ in shard_bounds(size, runs)], device=per_row.device)
    candidate = per_row[starts]
    return candidate if torch.equal(expand_scales(candidate, (size, 1), 0).flatten(), per_row) else per_row


# --- packing a model in place ------------------------------------------------------------------------

def ternary_values(name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 trits, per-shard scales) of any ternary linear layer; FormatError for float weights."""
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
def packed_layers(model: nn.Module, fmt: str, progress: bool = False) -> dict[str, PackedTernaryLinear]:
    """A PackedTernaryLinear in format `fmt` for every linear layer of `model` (TernaryLinear,
    FrozenTernaryLinear, a ternary FloatLinear or another packed format), by name; FormatError (before any
    layer is packed) if one of them is not ternary."""
    fmt = get_format(fmt).name
    layers = model.linear_layers()
    values = {name: ternary_values(name, m) for name, m in layers.items()}  # all checks before any packing
    packed = {}
    for name, module in progress_bar(layers.items(), desc=f"packing {fmt}", disable=not progress, leave=False):
        trits, scales = values[name]
        packed[name] = PackedTernaryLinear.from_trits(trits, scales.float(), module.shard_axis, fmt)
    return packed
