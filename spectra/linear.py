"""Weight kinds: interchangeable linear layers (no bias), and the one helper that swaps them in a model.

Every kind exposes the same interface: ``forward(x)``, ``in_features``, ``out_features``,
``shard_axis`` and ``dense_weight()`` (the exact weight it multiplies by, used for Hugging Face export).
The model asks :func:`spectra.kinds.make_linear` for its layers and never learns which kind it holds. The
ternary math itself lives in :mod:`spectra.ternary`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .kernels import triton_available
from .ternary import (
    ShardAxis,
    check_ternary,
    shard_bounds,
    shard_scales,
    ternarize,
    ternary_dense_weight,
)


def _fused_ternarize_available(weight: torch.Tensor) -> bool:
    # Under torch.compile the plain torch form is traced instead: inductor fuses it into the surrounding graph.
    if not weight.is_cuda or torch.compiler.is_compiling():
        return False
    return triton_available()


def ternary_weight(weight: torch.Tensor, parts: int, axis: int, out_dtype: torch.dtype) -> torch.Tensor:
    """scale * round(clamp(W/scale, -1, 1)) in `out_dtype`, without autograd (the forward of the STE)."""
    if _fused_ternarize_available(weight):
        from .kernels.ternarize import ternary_weight_fused  # needs triton, an optional dependency
        return ternary_weight_fused(weight.detach(), shard_scales(weight, parts, axis), axis, out_dtype)
    trits, scales = ternarize(weight, parts, axis)
    return ternary_dense_weight(trits, scales, axis, out_dtype)


class _TernarySTE(torch.autograd.Function):
    """Forward: scale * ternary(W) in `out_dtype`; backward: identity to the latent weights (straight-through)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, parts: int, axis: int, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.weight_dtype = weight.dtype
        return ternary_weight(weight, parts, axis, out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.weight_dtype), None, None, None


def ternary_weight_ste(weight: torch.Tensor, parts: int = 1, axis: int = 0,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """scale * round(clamp(W/scale, -1, 1)) in `out_dtype` (default: W's), gradients passed straight to W."""
    out_dtype = out_dtype or weight.dtype
    if hasattr(weight, "device_mesh"):
        # A tensor-parallel DTensor (spectra.distributed): each rank ternarizes its own shard with its own scale.
        return sharded_ternary_weight_ste(weight, parts, axis, out_dtype)
    return _TernarySTE.apply(weight, parts, axis, out_dtype)


def sharded_ternary_weight_ste(weight: torch.Tensor, parts: int, axis: int,
                               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """STE ternarization of a tensor-parallel DTensor weight: each rank scales its own shard(s).

    `parts` is the model's model-parallel size; a rank holding 1/n of the matrix along `axis` ternarizes
    its local tensor in parts/n pieces, with no communication (as the released TriLMs were trained).
    """
    # torch.distributed is optional in torch builds; a DTensor weight means it is there
    from torch.distributed.tensor import Replicate, Shard

    sharded = 1
    for mesh_dim, placement in enumerate(weight.placements):
        if isinstance(placement, Shard) and placement.dim == axis:
            sharded *= weight.device_mesh.size(mesh_dim)
        elif not isinstance(placement, Replicate):
            # A partial or cross-axis shard would compute a scale over the wrong elements.
            raise ConfigError(f"ternary weight sharded as {weight.placements} cannot be ternarized locally; "
                              f"only Shard({axis}) (tensor parallel) or Replicate placements are supported")
    if parts % sharded:
        raise ConfigError(f"weight split {sharded} ways cannot hold {parts} per-shard scales; "
                          f"use a model-parallel size that is a multiple of the tensor-parallel size")
    return _ShardedTernarySTE.apply(weight, parts // sharded, axis, out_dtype or weight.dtype)


class _ShardedTernarySTE(torch.autograd.Function):
    """The local ternarization as one autograd node: to_local / from_local inside it are not recorded, which
    saves two DTensor autograd nodes per linear layer and step (eager TP is bound by that CPU work)."""

    @staticmethod
    def forward(ctx, weight, local_parts: int, axis: int, out_dtype: torch.dtype):
        from torch.distributed.tensor import DTensor  # optional in torch builds (see above)

        ctx.mesh, ctx.placements, ctx.weight_dtype = weight.device_mesh, weight.placements, weight.dtype
        local = ternary_weight(weight.to_local(), local_parts, axis, out_dtype)
        return DTensor.from_local(local, weight.device_mesh, weight.placements, run_check=False,
                                  shape=weight.shape, stride=weight.stride())

    @staticmethod
    def backward(ctx, grad):
        # Straight through, on the weight's own placements (the matmul's gradient may come out otherwise).
        if tuple(grad.placements) != tuple(ctx.placements):
            grad = grad.redistribute(ctx.mesh, ctx.placements)
        return grad.to(ctx.weight_dtype), None, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer multiplies in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class FloatLinear(nn.Linear):
    """FloatLM layer: a plain bias-free linear layer."""

    def __init__(self, in_features: int, out_features: int, shard_axis: ShardAxis = 0, parts: int = 1,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.shard_axis, self.parts = shard_axis, parts

    def dense_weight(self) -> torch.Tensor:
        return self.weight.detach()

    @classmethod
    def join_output_rows(cls, layers: list[FloatLinear]) -> FloatLinear:
        first = layers[0]
        out_features = sum(layer.out_features for layer in layers)
        fused = cls(first.in_features, out_features, device=first.weight.device, dtype=first.weight.dtype)
        fused.weight.copy_(torch.cat([layer.weight for layer in layers]))
        return fused

    def split_output_rows(self, pieces: int, parts: int) -> list[FloatLinear]:
        """The inverse of :meth:`join_output_rows`: `pieces` layers of equal rows (`parts`: their shard count)."""
        layers = []
        for rows in self.weight.detach().chunk(pieces):
            layer = FloatLinear(self.in_features, rows.shape[0], 0, parts, device=rows.device, dtype=rows.dtype)
            layer.weight.data = rows
            layers.append(layer)
        return layers


class TernaryLinear(nn.Linear):
    """TriLM layer: latent floating-point weights, ternarized on every forward, trained with the STE.

    With `parts` = P > 1 each model-parallel shard (split along `shard_axis`) has its own scale,
    as in the released TriLMs (arXiv 2407.12327, Sec. 2).
    """

    def __init__(self, in_features: int, out_features: int, shard_axis: ShardAxis = 0, parts: int = 1,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        shard_bounds((out_features, in_features)[shard_axis], parts)  # validates the split
        self.shard_axis, self.parts = shard_axis, parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = ternary_weight_ste(self.weight, self.parts, self.shard_axis, compute_dtype(x))
        return F.linear(x, w)  # w is already in the compute dtype

    def freeze(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 trits, float32 per-shard scales) of the current latent weights."""
        return ternarize(self.weight, self.parts, self.shard_axis)

    def dense_weight(self) -> torch.Tensor:
        trits, scales = self.freeze()
        return ternary_dense_weight(trits, scales, self.shard_axis, self.weight.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", parts={self.parts}, shard_axis={self.shard_axis}"


class FrozenTernaryLinear(nn.Module):
    """Exact ternary weights for inference: int8 trits in {-1, 0, 1} and per-shard scales.

    This is the reference every packed format and GPU kernel is compared against.
    """

    def __init__(self, in_features: int, out_features: int, shard_axis: ShardAxis = 0, parts: int = 1,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.shard_axis, self.parts = shard_axis, parts
        self.register_buffer("trits", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(parts, dtype=dtype or torch.float32, device=device))

    @classmethod
    def from_trits(cls, trits: torch.Tensor, scales: torch.Tensor, shard_axis: ShardAxis = 0,
                   dtype: torch.dtype | None = None) -> FrozenTernaryLinear:
        check_ternary(trits)
        layer = cls(trits.shape[1], trits.shape[0], shard_axis, scales.numel(), device=trits.device,
                    dtype=dtype or scales.dtype)
        layer.trits.copy_(trits)
        layer.scales.copy_(scales.reshape(-1))
        return layer

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return ternary_dense_weight(self.trits, self.scales, self.shard_axis, dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(x.dtype))

    @classmethod
    def join_output_rows(cls, layers: list[FrozenTernaryLinear]) -> FrozenTernaryLinear | None:
        scales = joined_scales(layers)
        if scales is None:
            return None
        return cls.from_trits(torch.cat([layer.trits for layer in layers]), scales, 0, dtype=layers[0].scales.dtype)

    def split_output_rows(self, pieces: int, parts: int) -> list[FrozenTernaryLinear]:
        """The inverse of :meth:`join_output_rows`: `pieces` layers of equal rows, the scales shared out equally."""
        return [FrozenTernaryLinear.from_trits(trits, scales, 0, dtype=self.scales.dtype)
                for trits, scales in zip(self.trits.chunk(pieces), self.scales.chunk(pieces), strict=True)]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, parts={self.parts}, "
                f"shard_axis={self.shard_axis}")


# --- swapping layers --------------------------------------------------------------------------------

def replace_layers(model: nn.Module, layers: dict[str, nn.Module | None]) -> None:
    """Put each module of `layers` at its dotted name in `model`, or remove the module there for None.

    The one place layers are swapped: freezing, packing, quantizing, fusing and LoRA adapters all go through it.
    """
    for name, module in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if module is None:
            delattr(parent, child)
        else:
            setattr(parent, child, module)


@torch.no_grad()
def frozen_layers(model: nn.Module) -> dict[str, FrozenTernaryLinear]:
    """A FrozenTernaryLinear with the exact trits and scales of every TernaryLinear of `model`, by name."""
    frozen = {}
    for name, module in model.named_modules():
        if isinstance(module, TernaryLinear):
            trits, scales = module.freeze()
            frozen[name] = FrozenTernaryLinear.from_trits(trits, scales.to(module.weight.dtype), module.shard_axis)
    return frozen


def concat_output_rows(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing ``cat([layer(x) for layer in layers], -1)`` exactly, or None where that is not
    possible: the layers must share their class and in_features, and the class must join rows
    (a ``join_output_rows`` classmethod: float, frozen-ternary and packed layers do)."""
    first = layers[0]
    kind = type(first)
    if any(type(layer) is not kind or layer.in_features != first.in_features for layer in layers):
        return None
    join = getattr(kind, "join_output_rows", None)
    return None if join is None else join(layers)


def joined_scales(layers: list[nn.Module]) -> torch.Tensor | None:
    """The per-shard scales of ternary layers joined along output rows, or None where they cannot be.

    The layers must share sizes, shard count P and format, with their P scales on the output rows (or P = 1),
    and n % P == 0: then the k * P scales of the joined layer cover exactly the rows they covered before
    (torch.tensor_split of k * n rows)."""
    first = layers[0]
    same = all(layer.out_features == first.out_features and layer.parts == first.parts
               and getattr(layer, "format", None) == getattr(first, "format", None) for layer in layers)
    if not same or (first.parts > 1 and (first.shard_axis != 0 or first.out_features % first.parts)):
        return None
    return torch.cat([layer.scales.reshape(-1) for layer in layers])
