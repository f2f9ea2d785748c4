"""Parameter counts and model size in bits, counted the way the Spectra papers compare models.

Linear layers of the transformer blocks carry the weight kind's bits; embeddings, lm head and norms
stay 16-bit floating point; every ternary matrix adds its per-shard scales (16 bits each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig

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


def linear_shapes(config: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of the linear layers of one block."""
    d, h = config.hidden_size, config.intermediate_size
    return [("q_proj", d, d), ("k_proj", d, d), ("v_proj", d, d), ("o_proj", d, d),
            ("gate_proj", h, d), ("up_proj", h, d), ("down_proj", d, h)]


def count_parameters(config: ModelConfig) -> ParameterCount:
    per_block = sum(o * i for _, o, i in linear_shapes(config))
    d, v, n = config.hidden_size, config.vocab_size, config.num_layers
    return ParameterCount(linear=per_block * n, embedding=v * d, lm_head=v * d, norms=(2 * n + 1) * d,
                          linear_matrices=7 * n)


# Bits per linear weight of each kind (packed formats include their padding in `size_in_bits`).
KIND_BITS: dict[str, float] = {"float16": 16.0, "ternary": LOG2_3, "tq2": 2.0, "tq1": 1.6}


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
    if kind in ("tq2", "tq1"):
        trits_per_byte = 4 if kind == "tq2" else 5
        packed = sum(out * _padded(inp, trits_per_byte) // trits_per_byte for _, out, inp in linear_shapes(config))
        return fp_bits + 8 * packed * config.num_layers + scale_bits
    from .errors import ConfigError
    raise ConfigError(f"unknown size kind {kind!r}; known: {', '.join(KIND_BITS)}")
