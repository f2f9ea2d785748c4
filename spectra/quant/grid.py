"""The quantization grid shared by GPTQ and RTN: settings, per-group scales and zero points, codes.

A group of weights w is stored as unsigned codes c in [0, 2**bits - 1] with w ≈ scale * (c - zero).
Asymmetric grids fit [min(w, 0), max(w, 0)] and store an integer zero point per group; symmetric grids fit
[-max|w|, max|w|] with the fixed zero point 2**(bits-1), so no zeros are stored. Scales are stored as
float16 and rounded to float16 *before* any code is chosen, so the codes GPTQ optimises against are exactly
the ones the checkpoint reproduces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError
from .packing import SUPPORTED_BITS

SCALE_DTYPE = torch.float16
# The smallest normal float16: a group of (near) zero weights still gets a scale float16 can hold exactly.
MIN_SCALE = torch.finfo(SCALE_DTYPE).tiny
METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize the linear layers of a FloatLM (GPTQ, Frantar et al. 2022; or round-to-nearest)."""

    bits: int = 4
    group_size: int = 128      # input features per scale/zero; -1 = one group per output row
    sym: bool = False          # symmetric grid (no stored zeros) or asymmetric (integer zero points)
    act_order: bool = False    # GPTQ: quantize columns in order of decreasing Hessian diagonal
    damp: float = 0.01         # GPTQ: fraction of the mean Hessian diagonal added to it
    block_size: int = 128      # GPTQ: columns per lazy batched update
    method: str = "gptq"       # "gptq" or "rtn"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"group_size must be -1 (one group per row) or positive, got {self.group_size}")
        if not 0 <= self.damp < 1:
            raise ConfigError(f"damp must lie in [0, 1) (a fraction of the mean Hessian diagonal), got {self.damp}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown quantization method {self.method!r}; choose one of {METHODS}")
        if self.act_order and self.method != "gptq":
            raise ConfigError("act_order only applies to GPTQ; drop it or use method='gptq'")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def weight_options(self) -> dict:
        """The options the "quant" weight kind is rebuilt from (stored in config.json)."""
        keep = ("bits", "group_size", "sym", "act_order", "method")
        return {k: v for k, v in asdict(self).items() if k in keep}


def effective_group_size(group_size: int, in_features: int) -> int:
    return in_features if group_size == -1 else min(group_size, in_features)


def num_groups(group_size: int, in_features: int) -> int:
    return -(-in_features // effective_group_size(group_size, in_features))


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) as float32 for the group of columns `w` [rows, n]; scale is float16-exact."""
    maxq = 2**bits - 1
    w = w.float()
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        scale = 2 * hi / maxq
    else:
        scale = (hi - lo) / maxq
    scale = scale.clamp(min=MIN_SCALE).to(SCALE_DTYPE).float()
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest codes (int64) of `w` [rows] or [rows, n] on the grid of per-row `scale`, `zero`."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq).to(torch.int64)


def from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale * (codes - zero) in float32; per-row `scale`, `zero` broadcast over columns of 2-D codes."""
    if codes.dim() == 2 and scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return scale * (codes.float() - zero)
