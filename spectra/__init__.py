"""spectra: ternary language models (TriLM), their float (FloatLM) and quantized (QuantLM) peers."""

from .config import PRESETS, SUITE, ModelConfig, get_config
from .errors import CheckpointError, ConfigError, DataError, DeviceError, FormatError, SpectraError
from .eval import ScalingLaw, analyze_weights, fit_scaling_law, perplexity, plot_comparison
from .formats import FORMATS, get_format, pack_tq1, pack_tq2, unpack_tq1, unpack_tq2
from .gguf_export import export_gguf, write_gguf
from .linear import (
    FloatLinear,
    FrozenTernaryLinear,
    TernaryLinear,
    freeze_ternary,
    make_linear,
    register_linear_kind,
    ternarize,
)
from .model import SpectraLM
from .packed import PackedTernaryLinear, pack_checkpoint, pack_model
from .quant import QuantConfig, QuantLinear, quantize_model
from .size import count_parameters, model_size_bits, size_in_bits

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "SUITE", "ModelConfig", "get_config",
    "CheckpointError", "ConfigError", "DataError", "DeviceError", "FormatError", "SpectraError",
    "FORMATS", "get_format", "pack_tq1", "pack_tq2", "unpack_tq1", "unpack_tq2",
    "FloatLinear", "FrozenTernaryLinear", "TernaryLinear", "freeze_ternary", "make_linear",
    "register_linear_kind", "ternarize",
    "SpectraLM", "count_parameters", "size_in_bits",
    "PackedTernaryLinear", "pack_checkpoint", "pack_model", "export_gguf", "write_gguf",
    "QuantConfig", "QuantLinear", "quantize_model",
    "ScalingLaw", "analyze_weights", "fit_scaling_law", "perplexity", "plot_comparison",
    "model_size_bits",
]
