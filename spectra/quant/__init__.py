"""QuantLM: post-training quantization of FloatLMs with GPTQ or round-to-nearest, to 2/3/4/6/8 bits.

    from spectra import QuantConfig, Quantized, convert_
    from spectra.quant import calibration_tokens
    report = convert_(model, Quantized(QuantConfig(bits=4, group_size=128), calibration_tokens(text, tok)))

The weight kind "quant" (QuantLinear) is listed in spectra.kinds, so QuantLM checkpoints load like any other.
"""

from .calib import calibration_tokens, calibration_windows
from .gptq import HessianAccumulator, gptq_quantize, gptq_quantize_reference, output_error
from .grid import QuantConfig, grid_params
from .linear import QuantizedWeight, QuantLinear
from .packing import SUPPORTED_BITS, pack_codes, pack_codes_reference, packed_length, unpack_codes
from .pipeline import QuantReport, quantize_layer, quantize_layers
from .rtn import rtn_quantize

__all__ = [
    "calibration_tokens", "calibration_windows",
    "HessianAccumulator", "gptq_quantize", "gptq_quantize_reference", "output_error",
    "QuantConfig", "grid_params", "QuantizedWeight", "QuantLinear",
    "SUPPORTED_BITS", "pack_codes", "pack_codes_reference", "packed_length", "unpack_codes",
    "QuantReport", "quantize_layer", "quantize_layers", "rtn_quantize",
]
