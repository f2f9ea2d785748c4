"""Checkpoints as Hugging Face-style directories: config.json + model.safetensors (sharded when large).

Float and ternary models are written with dense weights, so transformers' LlamaForCausalLM loads them
(a TriLM then holds trits times scales, exactly like the released SpectraSuite `*_Unpacked` models).
Loading detects ternary matrices and recovers their per-shard scales. Other weight kinds (packed, GPTQ)
write their own tensors, named under each linear layer, and are rebuilt from config.json.
Only safetensors are read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .block import BLOCK_LINEARS, spec_of
from .config import DENSE_KINDS, PRESETS, ModelConfig, get_config
from .errors import CheckpointError, ConfigError, DeviceError
from .formats import FORMATS
from .io import atomic_dir, check_output, is_plain_file_name, read_json
from .linear import FloatLinear, FrozenTernaryLinear, TernaryLinear
from .model import SpectraLM
from .tensor_table import check_tensors, read_headers
from .ternary import detect_ternary, latent_from_ternary
from .tokenizer import TOKENIZER_FILE, load_tokenizer, save_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# --- writing --------------------------------------------------------------------------------------

def checkpoint_tensors(model: SpectraLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors to save: dense weights for float/ternary layers, each other kind's own tensors as they are."""
    out: dict[str, torch.Tensor] = {}
    linear = model.linear_layers()
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in linear:
            continue
        out[name] = tensor
    # projections fused for inference are saved as the layers they joined
    for name, layer in model.separate_linear_layers().items():
        if isinstance(layer, (TernaryLinear, FrozenTernaryLinear, FloatLinear)):
            out[f"{name}.weight"] = layer.dense_weight().to(dtype or _float_dtype(model))
        else:
            out.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() and not k.endswith("scales") else v for k, v in out.items()}
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _float_dtype(model: SpectraLM) -> torch.dtype:
    return model.model.embed_tokens.weight.dtype


FLOAT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype a model may be loaded in, by name ("bf16", "float16", ...); None stays None."""
    if name is None:
        return None
    try:
        return FLOAT_DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(FLOAT_DTYPES)}") from None


def save_checkpoint(model: SpectraLM, path: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 2 * 1024**3, extra_files: dict[str, str] | None = None, *,
                    owner: str = "save_checkpoint", force: bool = False) -> Path:
    """Write `model` (and optionally a `tokenizers.Tokenizer`) to directory `path`, atomically.

    Everything goes to a staging sibling first, then replaces `path` (spectra.io.atomic_dir), so an
    interrupted save never leaves a half-written checkpoint. An existing `path` that is not empty and not a
    previous output of `owner` is refused unless `force`.
    """
    path = Path(path)
    check_output(path, owner, force=force)
    with atomic_dir(path, owner) as staging:
        write_checkpoint_files(model, staging, tokenizer, dtype, max_shard_bytes, extra_files)
    return path


def write_checkpoint_files(model: SpectraLM, directory: Path, tokenizer=None, dtype: torch.dtype | None = None,
                           max_shard_bytes: int = 2 * 1024**3, extra_files: dict[str, str] | None = None) -> None:
    """The files of a checkpoint, written into the existing (staging) `directory`."""
    tensors = checkpoint_tensors(model, dtype)
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(dtype or _float_dtype(model)).replace("torch.", "")
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    _write_tensors(tensors, directory, max_shard_bytes)
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)


def _write_tensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_FILE), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# --- reading --------------------------------------------------------------------------------------

def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise CheckpointError(f"checkpoint directory {path} {what}; give the directory holding config.json")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}; "
                              + run_dir_hint(path, "is it a checkpoint directory?"))
    data = _read_json_object(file, "the checkpoint is corrupt")
    try:
        return ModelConfig.from_hf_dict(data)
    except ConfigError as err:
        raise CheckpointError(f"{file}: {err}") from None
    except (TypeError, ValueError, AttributeError) as err:  # e.g. rope_theta "abc", "spectra": []
        raise CheckpointError(f"{file} has a field of the wrong type ({err}); fix config.json or re-save the "
                              f"checkpoint") from None


def run_dir_hint(path: Path, otherwise: str) -> str:
    """What to give instead of a training run directory (whose checkpoints are in checkpoints/step-N)."""
    steps = sorted((path / "checkpoints").glob("step-*")) if (path / "checkpoints").is_dir() else []
    if steps or (path / "run.json").is_file():
        last = steps[-1] if steps else path / "checkpoints" / "step-N"
        return f"it is a training run: give one of its checkpoints (e.g. {last}) or its export directory"
    return otherwise


def _read_json_object(file: Path, fix: str) -> dict:
    """A JSON file that must hold an object, or one CheckpointError naming the file."""
    data = read_json(file, CheckpointError, fix)
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def _index_shards(path: Path) -> list[Path]:
    """The shard files named by model.safetensors.index.json: plain file names inside `path` only."""
    file = path / INDEX_FILE
    index = _read_json_object(file, "re-save or re-download the checkpoint")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{file} has no weight_map object; re-save or re-download the checkpoint")
    bad = [n for n in weight_map.values() if not is_plain_file_name(n)]
    if bad:
        raise CheckpointError(f"{file} names shard {bad[0]!r}, which is not a plain file name inside {path}; "
                              f"a checkpoint may only load files from its own directory")
    return [path / n for n in sorted(set(weight_map.values()))]


def checked_config(path: str | Path) -> ModelConfig:
    """config.json of checkpoint `path`, checked against the tensors its weight files hold (headers only, before
    anything is allocated; see spectra.tensor_table)."""
    path = Path(path)
    config = read_config(path)
    check_tensors(path, config, weight_files(path), dense=config.weight_kind in DENSE_KINDS)
    return config


def weight_files(path: Path) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        return _index_shards(path)
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path} holds only pickled weights (.bin/.pt), which spectra never loads "
                              f"(unpickling runs code); convert them to safetensors first")
    raise CheckpointError(f"{path} has no {WEIGHTS_FILE} (nor {INDEX_FILE}); the checkpoint lacks its weights")


def stored_tensor_bytes(path: str | Path) -> dict[str, int]:
    """Name -> bytes of every tensor of a checkpoint directory, read from the safetensors headers."""
    return {name: info.nbytes for name, info in read_headers(weight_files(Path(path))).items()}


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single or sharded safetensors)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(Path(path)):
        if not file.is_file():
            raise CheckpointError(f"shard {file.name} listed in {INDEX_FILE} is missing")
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {file} ({err}); the file is truncated or corrupt — "
                                  f"re-download or re-save the checkpoint") from None
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN or infinite weights (they load and then give NaN losses or garbage text silently)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor {name} holds {bad} NaN or infinite values; the checkpoint is "
                                  f"damaged (pass --allow-nonfinite / allow_nonfinite=True to load it anyway)")


def check_ternary_scales(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A packed layer's scales are mean |W| + eps > 0: a zero or negative one is corruption that would load and
    silently flip or zero the layer."""
    for name, t in tensors.items():
        if name.endswith(".scales") and t.is_floating_point() and not bool((t > 0).all()):
            raise CheckpointError(f"{path}: tensor {name} holds a zero or negative ternary scale ({t.min().item():g}); "
                                  f"the checkpoint is corrupt — pack it again from its TriLM checkpoint")


def check_tokenizer_fits(path: Path, vocab_size: int) -> None:
    """Refuse a tokenizer.json with more tokens than the model's embedding has rows (ids would overflow)."""
    if (path / TOKENIZER_FILE).is_file():
        size = load_tokenizer(path).get_vocab_size()
        if size > vocab_size:
            raise CheckpointError(f"{path / TOKENIZER_FILE} has {size} tokens but the model's vocab_size is "
                                  f"{vocab_size}; the tokenizer belongs to another model — put the matching "
                                  f"tokenizer.json beside the weights")


def _infer_parts(weights: dict[str, torch.Tensor]) -> int | None:
    """Model-parallel size of a checkpoint without `pretraining_model_parallel`: the distinct magnitudes."""
    name, w = next(iter(weights.items()))
    magnitudes = torch.unique(w.abs().flatten()[:1_000_000])
    count = int((magnitudes > 0).sum())
    return count if 1 <= count <= 16 else None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    kind: str | None = None, allow_nonfinite: bool = False) -> SpectraLM:
    """Load a spectra or transformers LLaMA checkpoint directory.

    `kind` picks the weight kind to build for dense checkpoints: "ternary_frozen" (default when all linear
    weights are ternary), "float", or "ternary" (trainable latent weights initialised to trits * scales).
    `dtype` defaults to float32 on CPU and the stored dtype elsewhere. A NaN or infinite weight is an error
    unless `allow_nonfinite`; so is a tokenizer.json with more tokens than the model's vocabulary.
    """
    path = Path(path)
    device = resolve_device(device)
    if isinstance(dtype, str):  # "bf16", as the command line takes it (a str used to be taken for a device)
        dtype = parse_dtype(dtype)
    config = checked_config(path)
    check_tokenizer_fits(path, config.vocab_size)
    tensors = load_tensors(path)
    if not allow_nonfinite:
        check_finite(tensors, path)
    if config.weight_kind in FORMATS:
        check_ternary_scales(tensors, path)
    if dtype is None:
        stored = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
        dtype = torch.float32 if device.type == "cpu" else stored

    if config.weight_kind in DENSE_KINDS:
        model = _load_dense(config, tensors, kind, path)
    else:
        if kind not in (None, config.weight_kind):
            raise CheckpointError(f"{path} holds {config.weight_kind} weights; it cannot be loaded as {kind!r}")
        model = SpectraLM(config)
        _load_state(model, tensors, path)
    return _cast(model, dtype).to(device).eval()


def _cast(model: SpectraLM, dtype: torch.dtype) -> SpectraLM:
    # Cast floating parameters and scales; integer buffers (trits, packed bytes, codes) keep their type.
    for module in model.modules():
        for _name, p in list(module.named_parameters(recurse=False)):
            p.data = p.data.to(dtype)
        for name, b in list(module.named_buffers(recurse=False)):
            # Scales stay fp32 (exact for fp16 scales); RoPE tables are cast at use.
            if b is not None and b.is_floating_point() and name != "scales" and not name.startswith("rope_"):
                setattr(module, name, b.to(dtype))
    return model


def _load_dense(config: ModelConfig, tensors: dict[str, torch.Tensor], kind: str | None,
                path: Path) -> SpectraLM:
    if kind not in (None, *DENSE_KINDS):  # a packed or quantized layer would find no weight to copy
        raise CheckpointError(f"{path} holds dense weights, which load as {', '.join(DENSE_KINDS)}, not as {kind!r}; "
                              f"convert the loaded model with spectra.convert_ (or pack_checkpoint / quantize)")
    names = [f"model.layers.{i}.{spec.path}" for i in range(config.num_layers) for spec in BLOCK_LINEARS]
    missing = [n for n in names if f"{n}.weight" not in tensors]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} linear weights (first: {missing[0]}.weight); "
                              f"the checkpoint does not match its config.json")
    linear = {n: tensors[f"{n}.weight"] for n in names}
    parts = config.model_parallel_size
    if "pretraining_model_parallel" not in json.loads((path / CONFIG_FILE).read_text()):
        parts = _infer_parts(linear) or 1
    detected = {n: detect_ternary(w, parts, _axis(n)) for n, w in linear.items()}
    is_ternary = all(d is not None for d in detected.values())
    if kind is None:
        kind = "ternary_frozen" if is_ternary else "float"
    if kind in ("ternary_frozen",) and not is_ternary:
        bad = next(n for n, d in detected.items() if d is None)
        raise CheckpointError(f"{path}: {bad} is not ternary (more than {parts + 1} distinct magnitudes with "
                              f"model-parallel size {parts}); load it with kind='float'")
    config = config.replace(weight_kind=kind, model_parallel_size=parts)
    model = SpectraLM(config)
    rest = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in linear}
    _load_state(model, rest, path, strict_linear=False)
    with torch.no_grad():
        for name, module in model.linear_layers().items():
            if isinstance(module, FrozenTernaryLinear):
                trits, scales = detected[name]
                module.trits.copy_(trits)
                module.scales = scales.float()
            elif kind == "ternary" and detected[name] is not None:
                # Continue training a ternary checkpoint: latent weights that ternarize to the same trits and
                # scales (a plain copy of trits * scale would shrink every scale by the nonzero fraction).
                trits, scales = detected[name]
                _copy(module.weight, latent_from_ternary(trits, scales, _axis(name)), f"{name}.weight", path)
            else:
                _copy(module.weight, linear[name], f"{name}.weight", path)
    return model


def _axis(name: str) -> int:
    return spec_of(name).axis


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str, path: Path) -> None:
    if dst.shape != src.shape:
        raise CheckpointError(f"{path}: {name} has shape {tuple(src.shape)} but the config implies "
                              f"{tuple(dst.shape)}; config.json and the weights disagree")
    dst.copy_(src.to(dst.dtype))


def _load_state(model: SpectraLM, tensors: dict[str, torch.Tensor], path: Path, strict_linear: bool = True) -> None:
    own = model.state_dict()
    linear = model.linear_layers()
    checked: dict[str, torch.Tensor] = {}
    for name, target in own.items():
        if not strict_linear and name.rsplit(".", 1)[0] in linear:
            continue
        if name not in tensors:
            raise CheckpointError(f"{path} lacks tensor {name}; the checkpoint does not match its config.json")
        src = tensors[name]
        if src.dtype.is_floating_point != target.dtype.is_floating_point:
            raise CheckpointError(f"{path}: {name} is {src.dtype} but {target.dtype} was expected")
        if src.shape != target.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(src.shape)} but the config implies "
                                  f"{tuple(target.shape)}; config.json and the weights disagree")
        checked[name] = src.to(target.dtype)
    # Through load_state_dict, not copies into state_dict() tensors: a module whose state_dict holds another
    # layout than its buffers (packed weights: storage rows on disk, 16-byte kernel rows in memory) converts there.
    model.load_state_dict(checked, strict=False)
    unexpected = set(tensors) - set(own) - {f"{n}.weight" for n in linear}
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
    if unexpected:
        raise CheckpointError(f"{path} has tensors the model does not know: {sorted(unexpected)[:3]}...")


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu...: spectra runs on CPUs and CUDA GPUs only
        raise DeviceError(f"device {str(device)!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"{device} was requested but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                          f"use cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
    return device


def load_model(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               kind: str | None = None, seed: int = 0, allow_nonfinite: bool = False) -> SpectraLM:
    """A checkpoint directory, or a preset name (randomly initialised, for benchmarks and tests)."""
    if Path(source).is_dir():
        return load_checkpoint(source, device, dtype, kind, allow_nonfinite=allow_nonfinite)
    if str(source).lower() in {k.lower() for k in PRESETS}:
        torch.manual_seed(seed)
        config = get_config(str(source))
        if kind:
            config = config.replace(weight_kind=kind)
        return _cast(SpectraLM(config), dtype or torch.float32).to(resolve_device(device)).eval()
    raise CheckpointError(f"{source!r} is neither a checkpoint directory nor a known model size")

