"""Weight kinds by name: the one registry the model factory reads.

A kind is a drop-in linear layer class (same interface: ``forward``, ``in_features``, ``out_features``,
``shard_axis``, ``parts``, ``dense_weight()``). Every built-in kind is listed here, once, so that a config
naming a kind builds its layers whatever modules were imported before: no kind registers itself as a side
effect of an import. :func:`register_linear_kind` adds a user's own kind explicitly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch.nn as nn

from .errors import ConfigError
from .formats import FORMATS
from .linear import FloatLinear, FrozenTernaryLinear, TernaryLinear
from .packed import PackedTernaryLinear
from .quant.linear import KIND as QUANT_KIND
from .quant.linear import QuantLinear
from .ternary import ShardAxis

LinearBuilder = Callable[..., nn.Module]
# Each packed format of spectra.formats is a weight kind of the same name.
PACKED_KINDS: tuple[str, ...] = tuple(FORMATS)
LINEAR_KINDS: dict[str, LinearBuilder] = {
    "float": FloatLinear,
    "ternary": TernaryLinear,
    "ternary_frozen": FrozenTernaryLinear,
    **{name: functools.partial(PackedTernaryLinear, format=name) for name in PACKED_KINDS},
    QUANT_KIND: QuantLinear,
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
