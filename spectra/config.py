"""Model configuration (a dataclass) and the registry of named sizes.

The Spectra suite sizes follow arXiv 2407.12327, Table 1: hidden / GLU / heads / layers, plus the
model-parallel size the released TriLMs used when computing per-shard ternary scales.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import write_text_atomic

# GPT-NeoX tokenizer vocabulary (50277) padded to a multiple of 128, as in the released checkpoints.
SUITE_VOCAB_SIZE = 50304
# Weight kinds saved as dense LLaMA matrices, which transformers' LlamaForCausalLM loads as they are.
DENSE_KINDS = ("float", "ternary", "ternary_frozen")
# Weight kinds with trainable weights (pretraining, full fine-tuning, tensor parallelism); the others are frozen.
TRAINABLE_KINDS = ("float", "ternary")


def dataclass_from_dict(cls: type, data: dict[str, Any], what: str) -> Any:
    """`cls(**data)`, with one clear error naming the keys `cls` does not have (e.g. from a newer version)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown {what} keys {sorted(unknown)}; known keys: {sorted(known)}")
    return cls(**data)


@dataclass
class ModelConfig:
    vocab_size: int = SUITE_VOCAB_SIZE
    hidden_size: int = 512
    intermediate_size: int = 1280
    num_heads: int = 8
    num_layers: int = 16
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # "float" (FloatLM), "ternary" (TriLM, latent weights + STE), "ternary_frozen" (exact trits + scales),
    # and kinds registered by other modules (packed formats, GPTQ).
    weight_kind: str = "ternary"
    # Number of model-parallel shards each ternary matrix computes its own scale over.
    model_parallel_size: int = 1
    # Options of the weight kind (e.g. the packed format or GPTQ bits); plain JSON data.
    weight_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_layers",
                     "max_seq_len", "model_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps"):  # NaN or a negative eps loads and then gives NaN logits
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a finite positive number, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size}); "
                f"choose e.g. num_heads={_nearest_divisor(self.hidden_size, self.num_heads)}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim = hidden_size/num_heads = {self.head_dim} must be even for RoPE")
        if not isinstance(self.weight_options, dict) or not isinstance(self.weight_kind, str):
            raise ConfigError(f"weight_kind must be a string and weight_options an object, got "
                              f"{self.weight_kind!r} and {self.weight_options!r}")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return dataclass_from_dict(cls, data, "config")

    # --- Hugging Face LlamaConfig interop -------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers.LlamaForCausalLM loads, with spectra's fields alongside."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float16",
            "pretraining_model_parallel": self.model_parallel_size,
            "spectra": {"weight_kind": self.weight_kind, "weight_options": self.weight_options},
            **self._hf_refusal(),
        }

    def _hf_refusal(self) -> dict[str, Any]:
        """config.json fields that make transformers refuse a packed or QuantLM checkpoint instead of loading it
        with randomly initialised linear layers (their tensors are not LLaMA's `weight` matrices).

        `model_type` names the format, so AutoConfig / AutoModel (and lm-eval's `hf` model) stop with "model type
        `spectra_tq2` ... not recognise[d]"; `architectures` says what it is. LlamaForCausalLM.from_pretrained
        ignores both, so `quantization_config` carries no `quant_method`: transformers skips an unknown
        quant_method with a warning and loads garbage, but refuses a quantization_config without one.
        """
        if self.weight_kind in DENSE_KINDS:
            return {}
        name = {"tq2": "TQ2", "tq1": "TQ1"}.get(self.weight_kind)
        if name is None:
            name = str(self.weight_options.get("method", self.weight_kind)).upper()
        return {"architectures": [f"Spectra{name}ForCausalLM"], "model_type": f"spectra_{self.weight_kind}",
                "quantization_config": {
                    "format": f"spectra-{self.weight_kind}", **self.weight_options,
                    "note": f"spectra {self.weight_kind} weights (not LLaMA weight matrices): load with "
                            f"spectra.load_checkpoint or the spectra command; transformers cannot load them"}}

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> ModelConfig:
        try:
            heads = data["num_attention_heads"]
            valid_heads = isinstance(heads, int) and heads > 0  # else the check below names the field
            if valid_heads and data.get("num_key_value_heads", heads) != heads:
                raise ConfigError("grouped-query attention (num_key_value_heads != num_attention_heads) "
                                  "is not part of the Spectra architecture")
            if data.get("tie_word_embeddings", False):
                raise ConfigError("tied input/output embeddings are not supported: Spectra models untie them")
            rope = data.get("rope_parameters") or {}
            if rope.get("rope_type", "default") not in ("default", None):
                raise ConfigError(f"rope scaling {rope.get('rope_type')!r} is not supported")
            extra = data.get("spectra", {})
            return cls(
                vocab_size=data["vocab_size"],
                hidden_size=data["hidden_size"],
                intermediate_size=data["intermediate_size"],
                num_heads=heads,
                num_layers=data["num_hidden_layers"],
                max_seq_len=data.get("max_position_embeddings", 2048),
                rope_theta=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
                norm_eps=float(data.get("rms_norm_eps", 1e-5)),
                weight_kind=extra.get("weight_kind", "float"),
                model_parallel_size=int(data.get("pretraining_model_parallel", 1) or 1),
                weight_options=extra.get("weight_options", {}),
            )
        except KeyError as missing:
            raise ConfigError(f"config.json lacks the key {missing}; is this a LLaMA-style checkpoint?") from None

    def save_json(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_hf_dict(), indent=2) + "\n")


def _nearest_divisor(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0 and (n // d) % 2 == 0), key=lambda d: abs(d - target))


def _suite(hidden: int, glu: int, heads: int, layers: int, mp: int) -> ModelConfig:
    return ModelConfig(hidden_size=hidden, intermediate_size=glu, num_heads=heads, num_layers=layers,
                       model_parallel_size=mp)


# The Spectra suite (arXiv 2407.12327, Table 1).
SUITE: dict[str, ModelConfig] = {
    "99M": _suite(512, 1280, 8, 16, 1),
    "190M": _suite(768, 2048, 12, 16, 1),
    "390M": _suite(1024, 2560, 16, 24, 1),
    "560M": _suite(1280, 3072, 20, 24, 1),
    "830M": _suite(1536, 4096, 24, 24, 1),
    "1.1B": _suite(1792, 5120, 28, 24, 2),
    "1.5B": _suite(2048, 6144, 32, 24, 2),
    "2.4B": _suite(2304, 7680, 36, 30, 3),
    "3.9B": _suite(3072, 9216, 24, 30, 6),
}

# Small presets for tests and CPU demos; they use a tokenizer trained on the user's text.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=176, num_heads=4, num_layers=2,
                        max_seq_len=256),
    "mini": ModelConfig(vocab_size=4096, hidden_size=192, intermediate_size=512, num_heads=6, num_layers=4,
                        max_seq_len=512),
    **SUITE,
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The named preset (a suite size such as "3.9B", or "tiny"/"mini"), with fields overridden."""
    key = {k.lower(): k for k in PRESETS}.get(name.lower())
    if key is None and (Path(name).exists() or "/" in name or "\\" in name):
        # Callers take a directory as a checkpoint, so this is a mistyped path or a file, not a size name.
        what = "is not a directory" if Path(name).exists() else "does not exist"
        raise ConfigError(f"checkpoint directory {name} {what}; give a checkpoint directory or a model size "
                          f"({', '.join(PRESETS)})")
    if key is None:
        raise ConfigError(f"unknown model size {name!r}; known sizes: {', '.join(PRESETS)}")
    known = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"unknown config fields {unknown}; known: {', '.join(known)}")
    return PRESETS[key].replace(**overrides)
