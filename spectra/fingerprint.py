"""A fingerprint of a model's weights: one digest that tells whether two models hold the same base.

A LoRA adapter records the fingerprint of the base it was trained on (spectra.lora), so that loading it on
another base of the same shape is refused instead of silently giving garbage.

What is hashed (sha256, every byte, nothing sampled), in a fixed order: the model's essential config (sizes,
RoPE θ, norm ε), then every linear layer of every block in a canonical form, then every other parameter
(embedding, norms, head) by name. A ternary layer counts as its trits in canonical TQ2 bytes (kernel layout:
one trit matrix, one byte string) and its fp32 per-shard scales, whatever holds them (TQ2 or TQ1 packed
bytes, int8 trits, latent weights), so the TQ2-packed base a LoRA run trains on and the same checkpoint
loaded unpacked for generation agree; a float layer counts as its weights. TQ2 is the canonical form because
a TQ2 layer's bytes are hashed as they are (a quarter of the bytes of int8 trits, and nothing to unpack). Fused
projections are read through :meth:`SpectraLM.separate_linear_layers` and folded kernel scales are not read
(the true ``scales`` are), so fusing for inference changes nothing; tensors are hashed from CPU copies, so the
device does not matter; an adapted layer counts as its frozen base.

Float tensors are cast when a checkpoint loads (``dtype=``), so their bytes depend on the dtype; trits and
scales never are. A fingerprint therefore holds one digest per float dtype (float32, bfloat16, float16),
each over the float tensors cast to that dtype, and a model is checked under the dtype its parameters have:
an adapter trained on a float32 base loads on that base loaded in bfloat16, whose weights are the float32
ones rounded exactly as the cast rounds them. Two bases equal at bfloat16 precision are the same base there.

Cost: one pass over the weights, measured in docs/finetuning.md (benchmarks/fingerprint_cost.py); layers are
hashed in parallel threads (hashlib and torch release the GIL).
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn

from .formats import pack_tq2
from .linear import FloatLinear, FrozenTernaryLinear, TernaryLinear
from .packed import PackedTernaryLinear, ternary_values

FINGERPRINT_VERSION = 1
FLOAT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                        "float16": torch.float16}
CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_layers", "rope_theta",
                 "norm_eps")
TERNARY_LAYERS = (PackedTernaryLinear, FrozenTernaryLinear, TernaryLinear)

# (name, tensor, cast): `cast` tensors are float ones a checkpoint load casts to its dtype
Entry = tuple[str, torch.Tensor, bool]


def _base_layer(module: nn.Module) -> nn.Module:
    # an adapted layer (spectra.lora.LoRALinear) wraps its frozen base as `.base`
    return module.base if hasattr(module, "lora_A") else module


def layer_family(module: nn.Module) -> str:
    """The weights' family in the fingerprint: "ternary" whatever their storage, "float", or the class name."""
    module = _base_layer(module)
    if isinstance(module, TERNARY_LAYERS):
        return "ternary"
    return "float" if isinstance(module, FloatLinear) else type(module).__name__


def base_summary(model: nn.Module) -> dict:
    """The config essentials a fingerprint covers, readable: sizes, RoPE θ, norm ε, the linear weights' family."""
    families = sorted({layer_family(m) for m in model.separate_linear_layers().values()})
    return {name: getattr(model.config, name) for name in CONFIG_FIELDS} | {"weights": ",".join(families)}


def _layer_entries(name: str, module: nn.Module) -> list[Entry]:
    module = _base_layer(module)
    if isinstance(module, TERNARY_LAYERS):
        if isinstance(module, PackedTernaryLinear) and module.format == "tq2":
            # already the canonical bytes: loading checks that the padding holds zero trits, as packing writes
            codes, scales = module.qweight, module.scales
        else:
            trits, scales = ternary_values(name, module)
            codes = pack_tq2(trits)
        return [(f"{name}.tq2", codes, False), (f"{name}.scales", scales.float().reshape(-1), False)]
    # float weights (cast on load); any other kind by its saved tensors, whose "scales" a load never casts
    return [(f"{name}.{key}", t, t.is_floating_point() and key != "scales")
            for key, t in module.state_dict().items()]


def _tensor_digest(t: torch.Tensor, dtype: torch.dtype | None) -> bytes:
    t = t.detach()
    if dtype is not None:
        t = t.to(dtype)
    elif t.is_floating_point():
        t = t.float()  # exact: a scale held in bf16/fp16 widens to the same value
    t = t.contiguous().cpu()
    digest = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy of the bytes
    return digest.digest()


def _digests(entries: list[Entry], dtypes: tuple[str, ...]) -> list[tuple[str, dict[str, bytes]]]:
    """(name, {dtype: digest}) per entry; a tensor no load casts has one digest, the same under every dtype."""
    out = []
    for name, tensor, cast in entries:
        if cast:
            out.append((name, {d: _tensor_digest(tensor, FLOAT_DTYPES[d]) for d in dtypes}))
        else:
            out.append((name, dict.fromkeys(dtypes, _tensor_digest(tensor, None))))
    return out


def _other_parameters(model: nn.Module) -> list[Entry]:
    """The parameters outside the blocks' linear layers (embedding, norms, head; LoRA's A and B are inside)."""
    prefixes = tuple(f"{name}." for name in model.linear_layers())
    return [(name, p, p.is_floating_point()) for name, p in sorted(model.named_parameters())
            if not name.startswith(prefixes)]


@torch.no_grad()
def weight_fingerprint(model: nn.Module, dtypes: tuple[str, ...] = tuple(FLOAT_DTYPES)) -> dict[str, str]:
    """{dtype name: hex sha256} of `model`'s weights, its float tensors cast to each of `dtypes` (names of
    FLOAT_DTYPES); the same for a model fused for inference or not, on any device."""
    jobs = [lambda name=name, module=module: _layer_entries(name, module)
            for name, module in model.separate_linear_layers().items()]
    jobs += [lambda entry=entry: [entry] for entry in _other_parameters(model)]
    # one layer per job: unpacking (torch) and sha256 (hashlib, on buffers over 2 KB) release the GIL
    with ThreadPoolExecutor(max(1, min(8, torch.get_num_threads()))) as pool:
        results = list(pool.map(lambda job: _digests(job(), dtypes), jobs))
    header = json.dumps({"version": FINGERPRINT_VERSION, **base_summary(model)}, sort_keys=True).encode()
    hashes = {d: hashlib.sha256(header) for d in dtypes}
    for digests in results:
        for name, by_dtype in digests:
            for d in dtypes:
                hashes[d].update(name.encode() + b"|" + by_dtype[d])
    return {d: h.hexdigest() for d, h in hashes.items()}


def held_dtype(model: nn.Module) -> str:
    """The float dtype whose digest a model is checked under: that of its (non-linear) float parameters."""
    dtype = next((p.dtype for _, p, cast in _other_parameters(model) if cast), torch.float32)
    return next((name for name, d in FLOAT_DTYPES.items() if d == dtype), "float32")
