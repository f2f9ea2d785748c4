"""Quantize a FloatLM into a QuantLM, block by block (the sequential procedure of GPTQ, Sec. 4).

Calibration sequences are embedded once; each transformer block then sees the outputs of the blocks before
it *after* they were quantized, so every layer corrects for the error already made upstream. Within a block
the layers go in four steps (q/k/v, o, gate/up, down), re-running the block before each step so that, e.g.,
the output projection's Hessian is built from the outputs of the already quantized q/k/v projections.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..block import INPUT_GROUPS
from ..errors import ConfigError, DataError
from ..linear import replace_layers
from ..progress import progress_bar
from .gptq import HessianAccumulator, gptq_quantize, output_error
from .grid import QuantConfig
from .linear import QuantizedWeight, QuantLinear
from .rtn import rtn_quantize

if TYPE_CHECKING:  # only for annotations: the model sits above its weight kinds
    from ..model import SpectraLM

# q/k/v, o, gate/up, down: the layers that read the same input are quantized together (spectra.block)
SEQUENTIAL_GROUPS = tuple(tuple(spec.path for spec in group) for group in INPUT_GROUPS)


@dataclass
class QuantReport:
    """What a quantization run did; `layers` maps each linear layer to its relative output error
    ||WX - QX|| / ||WX|| on the calibration inputs, for GPTQ and for RTN on the same inputs."""

    config: QuantConfig
    calibration_tokens: int = 0
    layers: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "calibration_tokens": self.calibration_tokens,
                "layers": self.layers}


def quantize_layer(weight: torch.Tensor, hessian: torch.Tensor | None, config: QuantConfig) -> QuantizedWeight:
    """Codes of one weight matrix by `config.method`; GPTQ needs the layer's input Hessian."""
    if config.method == "rtn":
        return rtn_quantize(weight, config.bits, config.group_size, config.sym)
    if hessian is None:
        raise DataError("GPTQ needs calibration data; pass calibration tokens or use method='rtn'")
    return gptq_quantize(weight, hessian, config.bits, config.group_size, config.sym, config.act_order,
                         config.damp, config.block_size)


@torch.no_grad()
def quantize_layers(model: SpectraLM, config: QuantConfig, calibration: torch.Tensor | None = None,
                    batch_size: int = 8, progress: bool = True) -> QuantReport:
    """Replace every block linear layer of the FloatLM `model` by a QuantLinear, in place (the handler of
    spectra.convert.convert_ with a Quantized spec, which also records the new weight kind in the config).

    `calibration` holds token ids [samples, seq_len]; GPTQ requires it, RTN only uses it to report errors.
    Embeddings, norms and the lm head stay in floating point, as in the Spectra papers' QuantLMs.
    """
    if model.config.weight_kind != "float":
        raise ConfigError(f"quantization starts from a FloatLM, but this model's weight kind is "
                          f"{model.config.weight_kind!r}; load dense checkpoints with kind='float'")
    if calibration is None and config.method != "rtn":
        raise DataError("GPTQ needs calibration data; pass calibration tokens or use method='rtn'")
    tokens = None if calibration is None else _check_tokens(model, calibration)
    model.eval()
    report = QuantReport(config)
    with progress_bar(total=len(model.linear_layers()), desc=f"{config.method.upper()} {config.bits}-bit", unit="layer",
              disable=not progress) as bar:
        if tokens is None:
            for name, module in model.linear_layers().items():
                bar.set_postfix_str(name, refresh=False)  # drawn at the next update (quiet in logs)
                _replace(model, name, module, quantize_layer(module.dense_weight(), None, config), config)
                bar.update()
        else:
            _quantize_sequentially(model, config, tokens, batch_size, report, bar)
    return report


def _check_tokens(model: SpectraLM, tokens: torch.Tensor) -> torch.Tensor:
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise DataError(f"calibration tokens must be a non-empty [samples, seq_len] tensor, got {tuple(tokens.shape)}")
    if tokens.shape[1] > model.config.max_seq_len:
        raise DataError(f"calibration sequences of {tokens.shape[1]} tokens exceed the model's max_seq_len "
                        f"{model.config.max_seq_len}; use --seq-len {model.config.max_seq_len} or less")
    if int(tokens.min()) < 0 or int(tokens.max()) >= model.config.vocab_size:
        raise DataError(f"calibration token ids must lie in [0, {model.config.vocab_size}); was the data "
                        f"tokenized with this checkpoint's tokenizer?")
    return tokens.to(model.model.embed_tokens.weight.device, torch.long)


def _quantize_sequentially(model: SpectraLM, config: QuantConfig, tokens: torch.Tensor, batch_size: int,
                           report: QuantReport, bar) -> None:
    report.calibration_tokens = tokens.numel()
    hidden = [model.model.embed_tokens(batch) for batch in tokens.split(batch_size)]
    dtype = hidden[0].dtype
    length = tokens.shape[1]
    cos, sin = model.rope_cos[:length].to(dtype), model.rope_sin[:length].to(dtype)
    for index, block in enumerate(model.model.layers):
        for group in SEQUENTIAL_GROUPS:
            hessians = _capture_hessians(block, group, hidden, cos, sin)
            for sub in group:
                name = f"model.layers.{index}.{sub}"
                bar.set_postfix_str(name, refresh=False)  # drawn at the next update (quiet in logs)
                module = block.get_submodule(sub)
                weight, hessian = module.dense_weight().float(), hessians[sub]
                quantized = quantize_layer(weight, hessian, config)
                report.layers[name] = _relative_errors(weight, hessian, quantized, config)
                _replace(model, name, module, quantized, config)
                bar.update()
        hidden = [torch.add(*block(x, cos, sin, None, None)) for x in hidden]  # stream + the block's MLP output


def _capture_hessians(block: nn.Module, names: tuple[str, ...], hidden: list[torch.Tensor],
                      cos: torch.Tensor, sin: torch.Tensor) -> dict[str, torch.Tensor]:
    accumulators, handles = {}, []
    for sub in names:
        module = block.get_submodule(sub)
        acc = accumulators[sub] = HessianAccumulator(module.in_features, hidden[0].device)
        handles.append(module.register_forward_hook(lambda mod, args, out, acc=acc: acc.add(args[0])))
    try:
        for x in hidden:
            block(x, cos, sin, None, None)
    finally:
        for handle in handles:
            handle.remove()
    return {sub: acc.hessian for sub, acc in accumulators.items()}


def _relative_errors(weight: torch.Tensor, hessian: torch.Tensor, quantized: QuantizedWeight,
                     config: QuantConfig) -> dict[str, float]:
    reference = output_error(weight, torch.zeros_like(weight), hessian)
    errors = {config.method: output_error(weight, quantized.dequantize(), hessian)}
    if config.method != "rtn":
        rtn = rtn_quantize(weight, config.bits, config.group_size, config.sym)
        errors["rtn"] = output_error(weight, rtn.dequantize(), hessian)
    return {k: math.sqrt(max(v, 0.0) / max(reference, 1e-30)) for k, v in errors.items()}


def _replace(model: SpectraLM, name: str, module: nn.Module, quantized: QuantizedWeight, config: QuantConfig) -> None:
    layer = QuantLinear.from_quantized(quantized, config.sym, config.method, module.shard_axis, module.parts)
    replace_layers(model, {name: layer})
