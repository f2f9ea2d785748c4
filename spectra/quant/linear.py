"""QuantLM weight kind "quant": integer codes + float16 scales (+ integer zero points) per group of inputs.

Tensors of one layer (saved by name in checkpoints, packed by :mod:`spectra.quant.packing`):

    qweight  uint8  [out, packed_length(in, bits)]     codes of every row, in *stored* column order
    scales   fp16   [out, groups]                       one scale per row and group of `group_size` columns
    qzeros   uint8  [out, packed_length(groups, bits)]  asymmetric grids only: integer zero points
    perm     int32  [in]                                act_order only: stored column j is input perm[j]

With act_order, GPTQ quantizes columns by decreasing Hessian diagonal; the codes are kept in that order so
every group stays contiguous, and the forward pass permutes the activations instead of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FormatError
from ..ternary import ShardAxis
from .grid import SCALE_DTYPE, QuantConfig, effective_group_size, from_codes, num_groups
from .packing import pack_codes, packed_length, unpack_codes

KIND = "quant"


@dataclass
class QuantizedWeight:
    """One quantized [out, in] matrix, unpacked: what GPTQ and RTN return and QuantLinear stores."""

    codes: torch.Tensor            # int [out, in], stored column order
    scales: torch.Tensor           # float32 (float16-exact) [out, groups]
    zeros: torch.Tensor            # float32 integer values [out, groups]
    perm: torch.Tensor | None      # int64 [in] or None
    bits: int
    group_size: int

    def column_groups(self) -> torch.Tensor:
        """Group index of every stored column."""
        n = self.codes.shape[1]
        return torch.arange(n, device=self.codes.device) // effective_group_size(self.group_size, n)

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in] weight in the original input order."""
        g = self.column_groups()
        stored = from_codes(self.codes, self.scales[:, g], self.zeros[:, g])
        return unpermute_columns(stored, self.perm)


def unpermute_columns(stored: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    if perm is None:
        return stored
    dense = torch.empty_like(stored)
    dense[:, perm.long()] = stored
    return dense


class QuantLinear(nn.Module):
    """Weight-only quantized linear layer; the reference forward dequantizes, then multiplies in x's dtype."""

    def __init__(self, in_features: int, out_features: int, shard_axis: ShardAxis = 0, parts: int = 1,
                 device=None, dtype=None, bits: int = 4, group_size: int = 128, sym: bool = False,
                 act_order: bool = False, method: str = "gptq") -> None:
        super().__init__()
        # Model-parallel shards need no scales of their own here: every group already lies within one row.
        self.in_features, self.out_features = in_features, out_features
        self.shard_axis, self.parts = shard_axis, parts
        self.quant = QuantConfig(bits=bits, group_size=group_size, sym=sym, act_order=act_order, method=method)
        groups = num_groups(group_size, in_features)
        self.register_buffer("qweight", torch.zeros(out_features, packed_length(in_features, bits),
                                                     dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=SCALE_DTYPE, device=device))
        if not sym:
            self.register_buffer("qzeros", torch.zeros(out_features, packed_length(groups, bits),
                                                      dtype=torch.uint8, device=device))
        if act_order:
            self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device))

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, sym: bool, method: str = "gptq",
                       shard_axis: ShardAxis = 0, parts: int = 1) -> QuantLinear:
        out_features, in_features = q.codes.shape
        layer = cls(in_features, out_features, shard_axis, parts, device=q.codes.device, bits=q.bits,
                    group_size=q.group_size, sym=sym, act_order=q.perm is not None, method=method)
        layer.qweight.copy_(pack_codes(q.codes, q.bits))
        scales = q.scales.to(SCALE_DTYPE)
        if not torch.equal(scales.float(), q.scales.float()):
            raise FormatError("scales are not exactly representable in float16; compute them with grid_params")
        layer.scales.copy_(scales)
        if not sym:
            layer.qzeros.copy_(pack_codes(q.zeros.to(torch.int64), q.bits))
        if q.perm is not None:
            layer.perm.copy_(q.perm.to(torch.int32))
        return layer

    @property
    def bits(self) -> int:
        return self.quant.bits

    def unpacked(self) -> QuantizedWeight:
        """Codes, scales and zeros of this layer as a :class:`QuantizedWeight`."""
        groups = self.scales.shape[1]
        codes = unpack_codes(self.qweight, self.bits, self.in_features)
        if self.quant.sym:
            zeros = torch.full(self.scales.shape, float(2 ** (self.bits - 1)), device=self.scales.device)
        else:
            zeros = unpack_codes(self.qzeros, self.bits, groups).float()
        perm = self.perm.long() if self.quant.act_order else None
        return QuantizedWeight(codes, self.scales.float(), zeros, perm, self.bits, self.quant.group_size)

    def stored_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dequantized weight with columns in stored order (the order the forward pass multiplies in)."""
        q = self.unpacked()
        g = q.column_groups()
        return from_codes(q.codes, q.scales[:, g], q.zeros[:, g]).to(dtype or torch.float32)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The exact [out, in] weight this layer multiplies by, in the original input order."""
        return self.unpacked().dequantize().to(dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant.act_order:
            x = x.index_select(-1, self.perm)
        return F.linear(x, self.stored_weight(x.dtype))

    def storage_bits(self) -> int:
        """Bits this layer stores: packed codes (with row padding), float16 scales, packed zeros and the
        act_order permutation (the storage-bits protocol of spectra.size)."""
        return sum(8 * t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        q = self.quant
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={q.bits}, "
                f"group_size={q.group_size}, sym={q.sym}, act_order={q.act_order}, method={q.method}")

