"""Parameter counts and model size in bits, counted the way the Spectra papers compare models.

Linear layers of the transformer blocks carry the weight kind's bits; embeddings, lm head and norms
stay 16-bit floating point; every ternary matrix adds its per-shard scales (16 bits each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .block import BLOCK_LINEARS, block_linear_shapes
from .config import ModelConfig
from .errors import ConfigError
from .formats import FORMATS
from .linear import FloatLinear, FrozenTernaryLinear, TernaryLinear

LOG2_3 = math.log2(3)
FLOAT_BITS = 16
SCALE_BITS = 16


@dataclass(frozen=True)
class ParameterCount:
    linear: int      # the seven projections of every block (the weights a kind quantizes)
    embedding: int   # input embedding
    lm_head: int     # output projection (untied)
    norms: int       # RMSNorm gains
    linear_matrices: int

    @property
    def total(self) -> int:
        return self.linear + self.embedding + self.lm_head + self.norms


def count_parameters(config: ModelConfig) -> ParameterCount:
    per_block = sum(o * i for _, o, i in block_linear_shapes(config))
    d, v, n = config.hidden_size, config.vocab_size, config.num_layers
    return ParameterCount(linear=per_block * n, embedding=v * d, lm_head=v * d, norms=(2 * n + 1) * d,
                          linear_matrices=len(BLOCK_LINEARS) * n)


# Bits per linear weight of each kind (packed formats include their padding in `size_in_bits`).
KIND_BITS: dict[str, float] = {"float16": 16.0, "ternary": LOG2_3,
                                **{name: 8 / fmt.trits_per_byte for name, fmt in FORMATS.items()}}


def kv_cache_bytes(config: ModelConfig, positions: int, dtype: torch.dtype = torch.float16, batch: int = 1) -> int:
    """Bytes of the KV cache that ``SpectraLM.setup_cache(batch, positions, dtype)`` allocates: a key row and a
    value row per layer, head and position, and for an int8 cache one fp32 scale per row."""
    rows = 2 * config.num_layers * batch * config.num_heads * positions
    if dtype == torch.int8:
        return rows * (config.head_dim + 4)
    return rows * config.head_dim * torch.empty(0, dtype=dtype).element_size()


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def size_in_bits(config: ModelConfig, kind: str = "ternary") -> float:
    """Model size in bits for weight kind `kind` (float16, ternary = log2(3) bits/weight, tq2, tq1)."""
    counts = count_parameters(config)
    fp_bits = FLOAT_BITS * (counts.embedding + counts.lm_head + counts.norms)
    if kind == "float16":
        return fp_bits + FLOAT_BITS * counts.linear
    scale_bits = SCALE_BITS * config.model_parallel_size * counts.linear_matrices
    if kind == "ternary":
        return fp_bits + LOG2_3 * counts.linear + scale_bits
    if kind in FORMATS:
        trits_per_byte = FORMATS[kind].trits_per_byte
        packed = sum(out * _padded(inp, trits_per_byte) // trits_per_byte
                     for _, out, inp in block_linear_shapes(config))
        return fp_bits + 8 * packed * config.num_layers + scale_bits
    raise ConfigError(f"unknown size kind {kind!r}; known: {', '.join(KIND_BITS)}")


# --- size of a built model, whatever its weight kinds ---------------------------------------------
#
# Storage-bits protocol. A linear module of any weight kind reports the bits it holds in deployable form
# through one of two methods (the first one found wins):
#   storage_bits() -> float     total bits of the module: weights, scales, zero points and padding;
#   bits_per_weight() -> float  bits per weight *including* those overheads (total = bpw * out * in).
# Packed ternary modules report their real format bits (TQ2/TQ1 with padding), QuantLM modules their
# code bits plus scales/zeros. The built-in kinds are counted as the papers count them: FloatLM at 16 bits,
# TriLM at log2(3) bits per weight plus one 16-bit scale per model-parallel shard.


def linear_storage_bits(module: Any) -> float:
    """Bits one linear layer holds in deployable form (see the storage-bits protocol above)."""
    if hasattr(module, "storage_bits"):
        return float(module.storage_bits())
    numel = module.out_features * module.in_features
    if hasattr(module, "bits_per_weight"):
        return float(module.bits_per_weight()) * numel
    if isinstance(module, (TernaryLinear, FrozenTernaryLinear)):
        return LOG2_3 * numel + SCALE_BITS * module.parts
    if isinstance(module, FloatLinear):
        return FLOAT_BITS * numel
    raise ConfigError(f"cannot size linear layer of type {type(module).__name__}: give it a storage_bits() "
                      f"or bits_per_weight() method (the storage-bits protocol in spectra/size.py)")


def model_size_breakdown(model: torch.nn.Module) -> dict[str, float]:
    """Bits held by the linear layers, by everything else (fp16 embeddings, lm head, norms), and in total."""
    linear = model.linear_layers()
    linear_bits = sum(linear_storage_bits(m) for m in linear.values())
    # Everything outside the block linear layers is kept in 16-bit float, as the papers count it.
    other = sum(t.numel() for name, t in model.state_dict().items() if name.rsplit(".", 1)[0] not in linear)
    other_bits = float(FLOAT_BITS * other)
    return {"linear_bits": linear_bits, "other_bits": other_bits, "total_bits": linear_bits + other_bits}


def model_size_bits(model: torch.nn.Module) -> float:
    """A model's size in bits the way the Spectra papers count it, from the layers it actually holds.

    Works on meta-device models too (only shapes are read), so suite sizes are cheap to measure.
    """
    return model_size_breakdown(model)["total_bits"]
