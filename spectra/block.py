"""The layout of one transformer block's linear layers: the one table every part of spectra reads.

Each row names a layer as transformers' LlamaForCausalLM names it (so checkpoints move between the two
unchanged), its owner module in the block, its in/out sizes as fields of :class:`~spectra.config.ModelConfig`,
its tensor-parallel axis (Megatron: column-parallel layers split output rows, row-parallel ones input columns)
and the group it joins when :meth:`SpectraLM.fuse_projections` fuses layers that read the same input.
The model builds its layers from this table; size accounting, the checkpoint mapping and its header checks,
GPTQ's sequential order, LoRA targets, tensor-parallel plans and the kernels' model shapes read it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .ternary import COLUMN_PARALLEL, ROW_PARALLEL, ShardAxis


@dataclass(frozen=True)
class LinearSpec:
    name: str          # attribute name, as in transformers' LLaMA
    owner: str         # the block submodule holding it
    in_size: str       # ModelConfig field giving in_features
    out_size: str      # ModelConfig field giving out_features
    axis: ShardAxis    # tensor-parallel axis of the [out, in] weight (and the axis of per-shard scales)
    fused: str | None = None  # the layer it joins in fuse_projections (same input, rows concatenated)
    rotary: bool = False      # its outputs get the rotary embedding (q and k)
    # The layer whose output rows are this layer's input columns through an op linear in each channel (o_proj:
    # v_proj, through attention's weighted sum over positions; down_proj: up_proj, through SwiGLU's
    # silu(gate) * up): fuse_projections moves this layer's column-shard scales onto those rows.
    input_from: str | None = None

    @property
    def path(self) -> str:
        """Name inside a block, e.g. "self_attn.q_proj"."""
        return f"{self.owner}.{self.name}"

    def features(self, config: ModelConfig) -> tuple[int, int]:
        """(in_features, out_features) for `config`."""
        return getattr(config, self.in_size), getattr(config, self.out_size)


QKV, GATE_UP = "qkv_proj", "gate_up_proj"  # the fused layers (inference only)
BLOCK_LINEARS: tuple[LinearSpec, ...] = (
    LinearSpec("q_proj", "self_attn", "hidden_size", "hidden_size", COLUMN_PARALLEL, QKV, rotary=True),
    LinearSpec("k_proj", "self_attn", "hidden_size", "hidden_size", COLUMN_PARALLEL, QKV, rotary=True),
    LinearSpec("v_proj", "self_attn", "hidden_size", "hidden_size", COLUMN_PARALLEL, QKV),
    LinearSpec("o_proj", "self_attn", "hidden_size", "hidden_size", ROW_PARALLEL, input_from="v_proj"),
    LinearSpec("gate_proj", "mlp", "hidden_size", "intermediate_size", COLUMN_PARALLEL, GATE_UP),
    LinearSpec("up_proj", "mlp", "hidden_size", "intermediate_size", COLUMN_PARALLEL, GATE_UP),
    LinearSpec("down_proj", "mlp", "intermediate_size", "hidden_size", ROW_PARALLEL, input_from="up_proj"),
)
LINEAR_NAMES: tuple[str, ...] = tuple(spec.name for spec in BLOCK_LINEARS)
SPECS: dict[str, LinearSpec] = {spec.name: spec for spec in BLOCK_LINEARS}


def linears_of(owner: str) -> tuple[LinearSpec, ...]:
    """The rows of one block submodule ("self_attn" or "mlp"), in order."""
    return tuple(spec for spec in BLOCK_LINEARS if spec.owner == owner)


def _input_groups() -> tuple[tuple[LinearSpec, ...], ...]:
    groups: list[tuple[LinearSpec, ...]] = []
    for spec in BLOCK_LINEARS:
        if groups and spec.fused and groups[-1][-1].fused == spec.fused:
            groups[-1] = (*groups[-1], spec)
        else:
            groups.append((spec,))
    return tuple(groups)


# The block's layers in order, those that read the same input together: (q, k, v), (o), (gate, up), (down).
# GPTQ quantizes group by group; each group of several layers is one fused layer in fuse_projections.
INPUT_GROUPS: tuple[tuple[LinearSpec, ...], ...] = _input_groups()
# Fused layer name -> the rows it joins, in order (qkv_proj: q, k, v; gate_up_proj: gate, up).
FUSION_GROUPS: dict[str, tuple[LinearSpec, ...]] = {group[0].fused: group for group in INPUT_GROUPS
                                                    if group[0].fused}


def spec_of(name: str) -> LinearSpec:
    """The row of a layer given by any dotted name ending in its attribute name (model.layers.3.mlp.up_proj)."""
    return SPECS[name.rsplit(".", 1)[-1]]


def is_block_linear(name: str) -> bool:
    """Whether a module name (dotted) is one of the block's linear layers, separate or fused."""
    last = name.rsplit(".", 1)[-1]
    return last in SPECS or last in FUSION_GROUPS


def is_block_linear_tensor(name: str) -> bool:
    """Whether a checkpoint tensor name (model.layers.0.mlp.up_proj.qweight) belongs to a block linear layer."""
    return is_block_linear(name.rsplit(".", 1)[0])


def block_linear_shapes(config: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of the linear layers of one block."""
    return [(spec.name, *reversed(spec.features(config))) for spec in BLOCK_LINEARS]


def model_linear_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(out_features, in_features) of every distinct linear product of a model with this config: the fused
    decode shapes and the separate ones (what `spectra bench tune` tunes the kernels for)."""
    separate = [(out, inp) for _, out, inp in block_linear_shapes(config)]
    return list(dict.fromkeys(fused_shapes(config) + separate))


def fused_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(out_features, in_features) of one block's products after fuse_projections, in order (qkv, o, gate_up,
    down): the shapes a decode step multiplies by."""
    return [(sum(s.features(config)[1] for s in group), group[0].features(config)[0]) for group in INPUT_GROUPS]
