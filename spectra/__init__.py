"""spectra: ternary language models (TriLM), their float (FloatLM) and quantized (QuantLM) peers."""

from . import (
    finetune,  # spectra.finetune.finetune(...): SFT, LoRA, float -> ternary conversion
    train,  # a callable module: spectra.train(...) runs spectra.train.loop.train
)
from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .config import PRESETS, SUITE, ModelConfig, get_config
from .convert import (
    FrozenTernary,
    FusedProjections,
    Packed,
    Quantized,
    convert_,
    convert_checkpoint,
    freeze_ternary,
    pack_checkpoint,
    pack_model,
    quantize_model,
)
from .data import TokenDataset, WindowLoader, prepare_data
from .demo import run_demo
from .distributed import init_parallel, parallelize
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    FormatError,
    SpectraError,
    TrainingError,
)
from .eval import ScalingLaw, analyze_weights, fit_scaling_law, perplexity, plot_comparison
from .formats import FORMATS, get_format, pack_tq1, pack_tq2, unpack_tq1, unpack_tq2
from .generate import generate, generate_stream, release_decode_step
from .gguf_export import export_gguf, write_gguf
from .kinds import make_linear, register_linear_kind
from .linear import FloatLinear, FrozenTernaryLinear, TernaryLinear
from .lora import LoRAConfig, apply_lora, load_adapter, save_adapter
from .model import SpectraLM
from .packed import PackedTernaryLinear
from .plot import plot_runs
from .quant import QuantConfig, QuantLinear
from .size import count_parameters, model_size_bits, size_in_bits
from .ternary import ternarize
from .tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from .train import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "SUITE", "ModelConfig", "get_config",
    "CheckpointError", "ConfigError", "DataError", "DeviceError", "FormatError", "SpectraError",
    "convert_", "convert_checkpoint", "FrozenTernary", "Packed", "Quantized", "FusedProjections",
    "FORMATS", "get_format", "pack_tq1", "pack_tq2", "unpack_tq1", "unpack_tq2",
    "FloatLinear", "FrozenTernaryLinear", "TernaryLinear", "freeze_ternary", "make_linear",
    "register_linear_kind", "ternarize",
    "SpectraLM", "count_parameters", "size_in_bits",
    "load_checkpoint", "load_model", "save_checkpoint", "generate", "generate_stream", "release_decode_step",
    "load_tokenizer", "save_tokenizer", "train_tokenizer",
    "PackedTernaryLinear", "pack_checkpoint", "pack_model", "export_gguf", "write_gguf",
    "QuantConfig", "QuantLinear", "quantize_model",
    "ScalingLaw", "analyze_weights", "fit_scaling_law", "perplexity", "plot_comparison",
    "model_size_bits",
    "TokenDataset", "WindowLoader", "prepare_data", "TrainConfig", "train", "TrainingError", "plot_runs",
    "run_demo",
    "init_parallel", "parallelize",
    "finetune", "LoRAConfig", "apply_lora", "load_adapter", "save_adapter",
]
