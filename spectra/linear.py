"""Weight kinds: interchangeable linear layers (no bias) chosen by one factory.

Every kind exposes the same interface: ``forward(x)``, ``in_features``, ``out_features``,
``shard_axis`` and ``dense_weight()`` (the exact weight it multiplies by, used for Hugging Face export).
The model asks :func:`make_linear` for its layers and never learns which kind it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError, FormatError

ShardAxis = Literal[0, 1]
# Megatron-style tensor parallelism: column-parallel layers (q, k, v, gate, up) split output features
# (axis 0 of the [out, in] weight); row-parallel layers (o, down) split input features (axis 1).
COLUMN_PARALLEL: ShardAxis = 0
ROW_PARALLEL: ShardAxis = 1
SCALE_EPS = 1e-5


def shard_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of each of `parts` contiguous shards of `size` (torch.tensor_split sizes)."""
    if parts < 1 or parts > size:
        raise ConfigError(f"cannot split {size} features into {parts} model-parallel shards")
    base, extra = divmod(size, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def expand_scales(scales: torch.Tensor, shape: tuple[int, int], axis: int) -> torch.Tensor:
    """Broadcastable per-element scale tensor for per-shard `scales` (length P) of a [out, in] weight."""
    size, parts = shape[axis], scales.numel()
    shard_bounds(size, parts)  # validates the split
    if parts == 1:
        per_feature = scales.reshape(1).expand(size)
    else:
        # Shard of each feature for torch.tensor_split sizes (the first `extra` shards one longer), computed on
        # the scales' device: no host-to-device copy, so no stall per layer and safe inside CUDA-graph capture.
        base, extra = divmod(size, parts)
        head = extra * (base + 1)
        feature = torch.arange(size, device=scales.device)
        shard = torch.where(feature < head, feature // (base + 1), extra + (feature - head) // base)
        per_feature = scales[shard]
    return per_feature[:, None] if axis == 0 else per_feature[None, :]


def ternary_dense_weight(trits: torch.Tensor, scales: torch.Tensor, shard_axis: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """trits * per-shard scales as a dense [out, in] weight (computed in fp32, then cast)."""
    scale = expand_scales(scales.float(), tuple(trits.shape), shard_axis)
    return (trits.float() * scale).to(dtype)


def shard_scales(weight: torch.Tensor, parts: int = 1, axis: int = 0) -> torch.Tensor:
    """Per-shard scales mean|W| + eps (float32, length `parts`); shards split `axis` like torch.tensor_split.

    Every path that ternarizes (training forward, freezing, packing, analysis) uses this one function, so
    they agree to the bit. ``vector_norm(ord=1)`` reads each shard once without materialising |W|.
    """
    if parts == 1:  # the common case, without the split and stack
        return (torch.linalg.vector_norm(weight.detach(), 1, dtype=torch.float32) / weight.numel() + SCALE_EPS)[None]
    pieces = torch.tensor_split(weight.detach(), parts, dim=axis)
    return torch.stack([torch.linalg.vector_norm(p, 1, dtype=torch.float32) / p.numel() for p in pieces]) + SCALE_EPS


def ternarize(weight: torch.Tensor, parts: int = 1, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ternary values and per-shard scales: scale = mean|W| + eps, trit = round(clamp(W/scale, -1, 1)).

    Returns (trits as int8 with the weight's shape, scales as float32 of length `parts`).
    """
    w = weight.detach().float()
    scales = shard_scales(w, parts, axis)
    scale_full = expand_scales(scales, tuple(w.shape), axis)
    trits = torch.round(torch.clamp(w / scale_full, -1.0, 1.0)).to(torch.int8)
    return trits, scales


def latent_from_ternary(trits: torch.Tensor, scales: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Latent weights whose ternarization gives back `trits` and `scales` (to fp32 rounding of the mean).

    Copying trits * s into the latent weights would not do: their mean |W| is s times the shard's nonzero
    fraction, so training would resume with smaller scales. Each shard is stretched by 1 / (nonzero
    fraction) and the eps that :func:`shard_scales` adds is taken off.
    """
    parts = scales.numel()
    out = torch.empty(trits.shape, dtype=torch.float32, device=trits.device)
    for t, o, s in zip(torch.tensor_split(trits, parts, dim=axis), torch.tensor_split(out, parts, dim=axis),
                       scales.float().tolist()):
        nonzero = float(t.count_nonzero()) / max(t.numel(), 1)
        o.copy_(t.float() * (max(s - SCALE_EPS, 0.0) / nonzero if nonzero else 0.0))
    return out


def _fused_ternarize_available(weight: torch.Tensor) -> bool:
    # Under torch.compile the plain torch form is traced instead: inductor fuses it into the surrounding graph.
    if not weight.is_cuda or torch.compiler.is_compiling():
        return False
    from .kernels import triton_available
    return triton_available()


def ternary_weight(weight: torch.Tensor, parts: int, axis: int, out_dtype: torch.dtype) -> torch.Tensor:
    """scale * round(clamp(W/scale, -1, 1)) in `out_dtype`, without autograd (the forward of the STE)."""
    if _fused_ternarize_available(weight):
        from .kernels.ternarize import ternary_weight_fused
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
        # A tensor-parallel DTensor: each rank ternarizes its own shard with its own scale (spectra.distributed).
        from .distributed.plans import sharded_ternary_weight_ste
        return sharded_ternary_weight_ste(weight, parts, axis, out_dtype)
    return _TernarySTE.apply(weight, parts, axis, out_dtype)


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

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, parts={self.parts}, "
                f"shard_axis={self.shard_axis}")


def check_ternary(trits: torch.Tensor) -> None:
    if trits.dtype != torch.int8:
        raise FormatError(f"trits must be int8, got {trits.dtype}")
    if trits.numel() and (trits.min() < -1 or trits.max() > 1):
        raise FormatError("trits must lie in {-1, 0, 1}; got values outside that range "
                          "(ternarize the weights first with spectra.ternarize)")


LinearBuilder = Callable[..., nn.Module]
LINEAR_KINDS: dict[str, LinearBuilder] = {
    "float": FloatLinear,
    "ternary": TernaryLinear,
    "ternary_frozen": FrozenTernaryLinear,
}


def register_linear_kind(name: str, builder: LinearBuilder) -> None:
    """Make a weight kind available to the model factory: builder(in, out, shard_axis, parts, **options)."""
    LINEAR_KINDS[name] = builder


def make_linear(kind: str, in_features: int, out_features: int, shard_axis: ShardAxis, parts: int = 1,
                options: dict | None = None, device=None, dtype=None) -> nn.Module:
    """The one factory the model uses for every linear layer."""
    try:
        builder = LINEAR_KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown weight kind {kind!r}; known kinds: {', '.join(LINEAR_KINDS)}") from None
    return builder(in_features, out_features, shard_axis=shard_axis, parts=parts, device=device, dtype=dtype,
                   **(options or {}))


@torch.no_grad()
def freeze_ternary(model: nn.Module) -> nn.Module:
    """Replace every TernaryLinear in `model` by a FrozenTernaryLinear holding its exact trits and scales."""
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, TernaryLinear):
                trits, scales = child.freeze()
                frozen = FrozenTernaryLinear.from_trits(trits, scales.to(child.weight.dtype), child.shard_axis)
                setattr(module, child_name, frozen)
    if hasattr(model, "config"):
        model.config = model.config.replace(weight_kind="ternary_frozen")
    return model
