"""The one LLaMA-style model of the Spectra suite (TriLM, FloatLM and QuantLM share it).

RMSNorm with a learned weight, SwiGLU MLP, rotary position embedding, multi-head attention through
scaled_dot_product_attention, no biases, untied embedding and lm head. One-token decode steps on a GPU take
spectra/kernels/attention.py instead: rotary embedding, cache write and a split-KV attention over the filled
part of the KV cache, in one kernel; a GPU prefill into a fresh cache applies the rotary embedding and writes
the cache in one kernel too. Linear layers come from :func:`spectra.kinds.make_linear`, so the
weight kind is a config field, not a code path; their names, sizes and axes come from the one table of
:mod:`spectra.block`.
Parameter names match transformers' LlamaForCausalLM so checkpoints move between the two unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block import BLOCK_LINEARS, FUSION_GROUPS, GATE_UP, QKV, SPECS, LinearSpec, is_block_linear, linears_of
from .config import ModelConfig
from .errors import ConfigError
from .kernels.attention import (
    cached_step_attention,
    dequantize_cache_rows,
    prefill_kernel_applies,
    prefill_rope_write,
    uses_decode_kernel,
    write_cache_rows,
)
from .kernels.pointwise import add_rms_norm, fused_pointwise_applies, rms_norm, swiglu
from .kinds import make_linear
from .linear import concat_output_rows, replace_layers
from .size import count_parameters
from .ternary import apply_rope_signed, signed_sines


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_pointwise_applies(x, self.weight):  # GPU inference: one kernel instead of about seven
            return rms_norm(x, self.weight, self.eps)
        # Normalize in fp32 as LLaMA does, then cast back before the learned gain.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, the norm of that sum): one kernel in GPU inference."""
        if fused_pointwise_applies(x, self.weight):
            return add_rms_norm(x, residual, self.weight, self.eps)
        total = x + residual
        return total, self(total)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # LLaMA's half-split ("rotate_half") layout
    return emb.cos(), emb.sin()


def document_mask_and_positions(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For sequences packed from several documents ([b, t] ids, each document one contiguous run): the
    [b, 1, t, t] attention mask (causal, within a document) and the positions, restarting at 0 per document."""
    b, t = document_ids.shape
    index = torch.arange(t, device=document_ids.device).expand(b, t)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    positions = index - (index * starts).cummax(dim=1).values
    same = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal)[:, None], positions


def add_block_linears(owner: nn.Module, owner_name: str, cfg: ModelConfig) -> None:
    """The linear layers of block submodule `owner` ("self_attn" or "mlp"), as the block table lists them."""
    for spec in linears_of(owner_name):
        in_features, out_features = spec.features(cfg)
        owner.add_module(spec.name, make_linear(cfg.weight_kind, in_features, out_features, spec.axis,
                                                cfg.model_parallel_size, cfg.weight_options))


def group_outputs(owner: nn.Module, fused: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Outputs of the layers that fuse into `fused` (q, k, v or gate, up), from the fused layer once
    SpectraLM.fuse_projections joined them (inference), else layer by layer."""
    if hasattr(owner, fused):
        return getattr(owner, fused)(x).chunk(len(FUSION_GROUPS[fused]), dim=-1)
    return tuple(getattr(owner, spec.name)(x) for spec in FUSION_GROUPS[fused])


class KVCache(nn.Module):
    """Preallocated keys and values; fixed shapes keep decoding CUDA-graph friendly.

    An int8 cache (``dtype=torch.int8``) holds each (sequence, head, position) row of keys and of values as int8
    values and one fp32 scale (:func:`~spectra.kernels.attention.quantize_cache_rows`): about half the memory
    of an fp16 cache, and half the bytes a decode step reads at long context, for 8-bit keys and values."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        quantized = dtype == torch.int8
        for name in ("k_scale", "v_scale"):
            scale = torch.zeros(shape[:3], dtype=torch.float32, device=device) if quantized else None
            self.register_buffer(name, scale, persistent=False)

    def write(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write rows `pos` of k and v ([B, H, T, D]) (quantized, in an int8 cache)."""
        write_cache_rows(self.k, self.k_scale, pos, k)
        write_cache_rows(self.v, self.v_scale, pos, v)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`write`, then the caches' first `length` positions (default: all) in k's dtype."""
        self.write(pos, k, v)
        if self.k_scale is None:
            return self.k[:, :, :length], self.v[:, :, :length]
        return (dequantize_cache_rows(self.k[:, :, :length], self.k_scale[:, :, :length], k.dtype),
                dequantize_cache_rows(self.v[:, :, :length], self.v_scale[:, :, :length], v.dtype))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        add_block_linears(self, "self_attn", cfg)  # q, k, v, o (spectra.block)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                pos: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """`cos`, `sin`: the rotary rows of the positions; `sin` as :func:`~spectra.ternary.signed_sines` gives
        it, except in a GPU decode step (``uses_decode_kernel``), whose kernel takes the plain sines."""
        b, t, _ = x.shape
        heads, d = self.num_heads, self.head_dim

        def split_heads(y: torch.Tensor, n: int = heads) -> torch.Tensor:  # [b, t, n * d] -> [b, n, t, d]
            return y.view(b, t, n, d).transpose(1, 2)

        if self.cache is not None and uses_decode_kernel(t, x.device, pos):
            return self.o_proj(self.step_attention(*group_outputs(self, QKV, x), cos, sin, pos))
        if (self.cache is not None and pos is not None and mask is None and cos.dim() == 2 and cos.is_contiguous()
                and prefill_kernel_applies(x, self.cache.k, self.cache.k_scale)):
            # a prompt into a fresh cache (positions 0..t-1, cos/sin [t, d]) on a GPU: the rotary embedding of q
            # and k and the cache write of k and v in one kernel instead of six; the prompt attends to the rows
            # just written
            q, k, v = (y.view(b, t, heads, d) for y in group_outputs(self, QKV, x))
            cache = self.cache
            q = prefill_rope_write(q, k, v, cos, sin, cache.k, cache.v).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, cache.k[:, :, :t], cache.v[:, :, :t], is_causal=t > 1)
            return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))
        if hasattr(self, QKV):  # fused: q and k are adjacent heads of one output, rotated together
            qkv = getattr(self, QKV)(x)
            qk = apply_rope_signed(split_heads(qkv[..., :2 * heads * d], 2 * heads), cos, sin)
            q, k = qk[:, :heads], qk[:, heads:]
            v = split_heads(qkv[..., 2 * heads * d:])
        else:
            q, k, v = (split_heads(y) for y in group_outputs(self, QKV, x))
            q, k = apply_rope_signed(q, cos, sin), apply_rope_signed(k, cos, sin)
        if self.cache is not None and pos is not None:
            if mask is None:
                # a prompt into a fresh cache (SpectraLM.prefill): it attends to itself, causally, as in training
                # (a flash kernel on a GPU, where a mask over the whole cache takes a slower one)
                self.cache.write(pos, k, v)
            else:
                # the mask's width is the cache positions to read (on a CPU only the filled ones, see
                # SpectraLM.forward)
                k, v = self.cache.update(pos, k, v, mask.shape[-1])
        # without a cache, `mask` (when given) keeps packed documents apart (SpectraLM.forward's document_ids)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def step_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """A GPU decode step's attention ([b, 1, heads * d] each, before o_proj): rotary embedding, cache write
        and attention over the filled cache in one kernel."""
        b, t, _ = q.shape
        q, k, v = (y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        cache = self.cache
        y = cached_step_attention(q, k, v, cos, sin, cache.k, cache.v, pos, cache.k_scale, cache.v_scale)
        return y.transpose(1, 2).reshape(b, t, -1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        add_block_linears(self, "mlp", cfg)  # gate, up, down (spectra.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = group_outputs(self, GATE_UP, x)
        if fused_pointwise_applies(gate):
            return self.down_proj(swiglu(gate, up))
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, pos, mask, pending=None):
        """Returns (the residual stream, this block's MLP output): the stream after the block is their sum,
        left to the next norm (``pending``) so that in GPU inference the add and the norm are one kernel."""
        if pending is None:
            h = self.input_layernorm(x)
        else:
            x, h = self.input_layernorm.add_forward(x, pending)
        attn = self.self_attn(h, cos, sin, pos, mask)
        x, h = self.post_attention_layernorm.add_forward(x, attn)
        return x, self.mlp(h)

    def fused_step(self, x: torch.Tensor, xw: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                   next_gain: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A GPU decode step through the block in five kernels (see :meth:`fuses_decode`): the norms, SwiGLU
        and residual adds ride in the packed products. `x` is the residual stream and `xw` x times this block's
        input norm gain; returns the stream after the block and it times `next_gain` (the next block's input
        norm gain; None after the last block)."""
        attn, mlp = self.self_attn, self.mlp
        q, k, v = getattr(attn, QKV).fused_forward(xw, norm_of=x, eps=self.input_layernorm.eps).chunk(3, dim=-1)
        y = attn.step_attention(q, k, v, cos, sin, pos)
        x, xw = attn.o_proj.fused_forward(y, residual=x, gain=self.post_attention_layernorm.weight)
        act = getattr(mlp, GATE_UP).fused_forward(xw, norm_of=x, eps=self.post_attention_layernorm.eps, swiglu=True)
        if next_gain is None:
            return mlp.down_proj.fused_forward(act, residual=x), None
        return mlp.down_proj.fused_forward(act, residual=x, gain=next_gain)

    def fuses_decode(self, x: torch.Tensor) -> bool:
        """Whether :meth:`fused_step` takes a decode step on `x`: the four products of the block are packed
        layers (q/k/v and gate/up fused) whose kernels take the norms, SwiGLU and residual adds, and the norm
        gains are in x's dtype."""
        products = (getattr(self.self_attn, QKV, None), self.self_attn.o_proj, getattr(self.mlp, GATE_UP, None),
                    self.mlp.down_proj)
        return (all(hasattr(p, "fuses") and p.fuses(x) for p in products)
                and self.input_layernorm.weight.dtype == self.post_attention_layernorm.weight.dtype == x.dtype)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class SpectraLM(nn.Module):
    """Decoder-only LM. ``forward(tokens)`` gives logits; pass ``targets`` to also get the mean loss."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # LLaMA-style init (std 0.02); latent ternary weights use the same.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Parameters as the papers count them (buffers of frozen/packed kinds included)."""
        return count_parameters(self.config).total

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                last_only: bool = False, fresh_cache: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`document_ids` ([b, t], training only): tokens attend within their own document and positions
        restart per document, so packed examples see exactly what they would see alone. `last_only`: the
        logits of the last position only ([b, 1, vocab]; a prompt before sampling needs no more, and a long
        prompt's full logits can outweigh the model). `fresh_cache`: `input_pos` is 0..t-1 and the KV cache
        holds nothing the tokens should see (:meth:`prefill`)."""
        if last_only and targets is not None:
            raise ValueError("last_only gives one position's logits; a loss needs all of them")
        t = tokens.shape[1]
        decode_kernel = input_pos is not None and uses_decode_kernel(t, tokens.device, input_pos)
        if document_ids is not None:
            mask, positions = document_mask_and_positions(document_ids)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        elif input_pos is None:
            if t > self.config.max_seq_len:
                raise ConfigError(f"sequence of {t} tokens exceeds the model's max_seq_len "
                                  f"{self.config.max_seq_len}; use shorter windows")
            cos, sin, mask = self.rope_cos[:t], self.rope_sin[:t], None
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            mask = None
            # the decode kernels need no mask, nor does a prompt into a fresh cache (it attends to itself)
            if not fresh_cache and not decode_kernel:
                cache_len = self.model.layers[0].self_attn.cache.k.shape[2]
                if tokens.device.type == "cpu":
                    # read only the filled positions (the GPU's prefill keeps one shape and asks for no sync)
                    cache_len = min(cache_len, int(input_pos.max()) + 1)
                mask = input_pos[:, None] >= torch.arange(cache_len, device=tokens.device)[None, :]
        x = self.model.embed_tokens(tokens)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # once per step, not once per layer
        if not decode_kernel:
            sin = signed_sines(sin)  # what Attention's apply_rope_signed takes (the decode kernel takes them plain)
        if mask is not None and document_ids is None:
            # SDPA turns a boolean mask into an additive one on every call: once per forward here, not per layer
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        layers = self.model.layers
        if (decode_kernel and not torch.compiler.is_compiling() and layers
                and all(layer.fuses_decode(x) for layer in layers)):
            # a GPU decode step in five kernels per block (DecoderLayer.fused_step)
            xw = x * layers[0].input_layernorm.weight
            for i, layer in enumerate(layers):
                x, xw = layer.fused_step(x, xw, cos, sin, input_pos,
                                         layers[i + 1].input_layernorm.weight if i + 1 < len(layers) else None)
            logits = self.lm_head(self.model.norm(x))
        else:
            pending = None
            for layer in layers:
                x, pending = layer(x, cos, sin, input_pos, mask, pending)
            if last_only:
                x, pending = x[:, -1:], pending[:, -1:]
            logits = self.lm_head(self.model.norm.add_forward(x, pending)[1])  # the last block's MLP add, the norm
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a KV cache for `batch` sequences of up to `max_len` tokens (prompt + new tokens), in `dtype`
        (default: the model's); ``torch.int8`` gives an 8-bit cache with a scale per row (:class:`KVCache`)."""
        if max_len > self.config.max_seq_len:
            raise ConfigError(f"prompt + new tokens = {max_len} exceeds max_seq_len {self.config.max_seq_len}")
        if dtype is not None and not (dtype.is_floating_point or dtype == torch.int8):
            raise ConfigError(f"a KV cache holds a floating-point dtype or torch.int8 (8-bit rows with a scale "
                              f"each), got {dtype}")
        param = self.model.embed_tokens.weight
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache(batch, self.config.num_heads, max_len, self.config.head_dim,
                                            dtype or param.dtype, param.device)

    def _first_cache(self) -> KVCache | None:
        return self.model.layers[0].self_attn.cache if len(self.model.layers) else None

    def cache_shape(self) -> tuple[int, int] | None:
        """(sequences, positions) of the KV cache that :meth:`setup_cache` allocated, or None."""
        cache = self._first_cache()
        return None if cache is None else (cache.k.shape[0], cache.k.shape[2])

    def cache_dtype(self) -> torch.dtype | None:
        """The dtype of the KV cache that :meth:`setup_cache` allocated (torch.int8: 8-bit rows), or None."""
        cache = self._first_cache()
        return None if cache is None else cache.k.dtype

    def prefill(self, tokens: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Logits of a prompt [b, t] (the last position's, unless `last_only` is False) whose keys and values go
        into the KV cache at positions 0..t-1, which :meth:`setup_cache` just allocated. The prompt attends to
        itself as in training (causal, no mask: a flash kernel on a GPU) instead of to the whole cache through a
        mask."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self(tokens, input_pos=positions, last_only=last_only, fresh_cache=True)

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.cache = None

    @torch.no_grad()
    def fuse_projections(self) -> int:
        """Inference only: replace each block's layers that read the same input (q/k/v, gate/up) by one layer.

        One matrix product instead of three (two) per block, on a wider matrix: fewer kernel launches in
        decoding, and the packed kernels run the shapes they are tuned for. Rows are concatenated exactly
        (packed rows, int8 trits or float weights) and per-shard scales stay per shard, so the weights are
        the same and outputs differ at most by the rounding of a differently blocked product. Layers that
        cannot be joined exactly (latent or mixed kinds, or shards that would move) are left as they are.
        Packed o_proj and down_proj also hand their column-shard scales to v_proj's and up_proj's rows
        (:meth:`PackedTernaryLinear.fold_column_scales`; the block table's ``input_from``), which spares the
        GPU a pass over their inputs: the same products, other roundings. A fused model saves the checkpoint
        of its unfused layers (:meth:`unfuse_projections` undoes both); returns the number of fused groups.
        """
        fused = 0
        for index, layer in enumerate(self.model.layers):
            for new, specs in FUSION_GROUPS.items():
                owner = layer.get_submodule(specs[0].owner)
                if hasattr(owner, new):
                    continue
                joined = concat_output_rows([getattr(owner, spec.name) for spec in specs])
                if joined is None:
                    continue
                prefix = f"model.layers.{index}.{specs[0].owner}."
                replace_layers(self, {prefix + spec.name: None for spec in specs} | {prefix + new: joined})
                fused += 1
            for spec in BLOCK_LINEARS:
                if spec.input_from is None:
                    continue
                consumer = layer.get_submodule(spec.path)
                if hasattr(consumer, "fold_column_scales"):  # packed layers
                    consumer.fold_column_scales(*self._rows_of(layer, SPECS[spec.input_from]))
        return fused

    def _rows_of(self, layer: nn.Module, spec: LinearSpec) -> tuple[nn.Module, int]:
        """(the layer computing `spec`'s outputs in block `layer`, fused or not; their first row in it)."""
        owner = layer.get_submodule(spec.owner)
        if spec.fused is None or not hasattr(owner, spec.fused):
            return getattr(owner, spec.name), 0
        group = FUSION_GROUPS[spec.fused]
        return getattr(owner, spec.fused), sum(s.features(self.config)[1] for s in group[:group.index(spec)])

    @torch.no_grad()
    def unfuse_projections(self) -> int:
        """The inverse of :meth:`fuse_projections`: each fused layer split back into the layers it joined (the
        same weights, as views of the fused tensors where the kind allows); returns the number split."""
        for module in self.modules():
            if hasattr(module, "unfold_scales"):
                module.unfold_scales()
        split = 0
        for index, layer in enumerate(self.model.layers):
            for new, specs in FUSION_GROUPS.items():
                owner = layer.get_submodule(specs[0].owner)
                fused = getattr(owner, new, None)
                if fused is None:
                    continue
                pieces = fused.split_output_rows(len(specs), self.config.model_parallel_size)
                prefix = f"model.layers.{index}.{specs[0].owner}."
                replace_layers(self, {prefix + new: None} | {prefix + spec.name: piece
                                                              for spec, piece in zip(specs, pieces, strict=True)})
                split += 1
        return split

    @property
    def projections_fused(self) -> bool:
        """Whether :meth:`fuse_projections` changed any block (joined projections or moved scales)."""
        return any(hasattr(layer.get_submodule(specs[0].owner), new) for layer in self.model.layers
                   for new, specs in FUSION_GROUPS.items()) or any(
            getattr(module, "kernel_scales", None) is not None for module in self.modules())

    def linear_layers(self) -> dict[str, nn.Module]:
        """Name -> module of the seven linear layers of every block (the ones weight kinds replace)."""
        return {name: mod for name, mod in self.named_modules() if is_block_linear(name)}

    def separate_linear_layers(self) -> dict[str, nn.Module]:
        """:meth:`linear_layers` with every fused layer given as the layers it joined (views of its tensors where
        the kind allows), in block order: what checkpoints, exports and weight statistics read, fused or not."""
        layers = {}
        for name, module in self.linear_layers().items():
            owner, attr = name.rsplit(".", 1)
            if attr not in FUSION_GROUPS:
                layers[name] = module
                continue
            specs = FUSION_GROUPS[attr]
            pieces = module.split_output_rows(len(specs), self.config.model_parallel_size)
            layers.update({f"{owner}.{spec.name}": piece for spec, piece in zip(specs, pieces, strict=True)})
        order = {spec.path: i for i, spec in enumerate(BLOCK_LINEARS)}
        return dict(sorted(layers.items(), key=lambda item: (int(item[0].split(".")[2]),
                                                             order[item[0].split(".", 3)[3]])))
