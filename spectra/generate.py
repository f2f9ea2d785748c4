"""Autoregressive generation with a preallocated KV cache: temperature, top-k, top-p, streaming.

The library chooses how to decode (:func:`decode_plan`). On a GPU the fast path is the default: each block's
q/k/v and gate/up are fused into one product (in place; inference only), the one-token step is captured in
a CUDA graph (optionally ``torch.compile``-d first) that also samples the next token on the GPU, and the
host streams the tokens a few steps behind the GPU, so no token waits for a host round trip. Elsewhere (or
with ``fast=False``) a plain loop runs the model's forward step by step and samples with a
``torch.Generator``.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch

from .decode_graph import GraphDecodeStep, GraphSamplingStep
from .errors import ConfigError, DataError, DeviceError, SpectraWarning
from .model import SpectraLM
from .sampling import sample_keyed, sample_next

__all__ = ["KV_CACHE_DTYPES", "DecodePlan", "check_sampling", "decode_cache_length", "decode_plan", "generate",
           "generate_stream", "generate_uncached", "release_decode_step", "sample_next"]

DecodeStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# The KV-cache choices a user names (`--kv-cache`): the model's own dtype, or 8-bit rows with a scale each
# (half the memory; at long context the decode step reads half the bytes).
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {"model": None, "int8": torch.int8}
STREAM_LAG = 8  # steps the GPU may run ahead of the tokens handed out (the host never waits on the newest)
DECODE_CACHE_MIN = 256  # the shortest KV cache a captured step is built for (decode_cache_length)


def decode_cache_length(total: int, max_seq_len: int) -> int:
    """KV-cache positions that a generation of `total` tokens (prompt + new) allocates on the fast path.

    A captured step is bound to its cache (a compiled one also to the cache's shape: ``torch.compile(
    dynamic=False)`` would compile again for each length, and after 8 lengths dynamo stops compiling and
    silently runs the step uncompiled). The length is therefore rounded up to a power of two (at least
    DECODE_CACHE_MIN, at most `max_seq_len`), so that later generations of other lengths (a chat whose prompt
    grows) replay the kept step (:func:`_graph_tokens`) and reuse a few compiled steps. The decode-attention
    kernel reads only the filled part of the cache, so a step costs the same; the cache takes at most twice the
    memory."""
    return max(total, min(max(DECODE_CACHE_MIN, 1 << (total - 1).bit_length()), max_seq_len))


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling options that would crash mid-generation or mean nothing (NaN temperature, top_p 2)."""
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be at least 1 (or unset), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must lie in (0, 1] (or be unset), got {top_p}")


@dataclass(frozen=True)
class DecodePlan:
    """How :func:`generate` decodes: a captured CUDA-graph step sampling on the GPU (`graph`), with the
    projections fused first (`fuse`) and the step compiled by torch.compile (`compile`), or the plain loop."""

    graph: bool
    fuse: bool
    compile: bool


def decode_plan(device: torch.device, fast: bool | None = None, compile: bool = False) -> DecodePlan:
    """The decoding path for a model on `device`: `fast` None means the fast path wherever it exists (CUDA),
    True demands it, False turns it off; `compile` needs the fast path."""
    cuda = torch.device(device).type == "cuda"
    if fast is None:
        fast = cuda
    if fast and not cuda:
        raise DeviceError(f"fast decoding (fused projections, a CUDA-graph step) needs the model on a CUDA device, "
                          f"it is on {device}; pass fast=False, or move the model to the GPU")
    if compile and not fast:
        raise DeviceError("compile applies to CUDA decoding (a compiled, graph-captured step); drop it, or decode "
                          "on a GPU with the fast path on")
    return DecodePlan(graph=fast, fuse=fast, compile=compile)


def _prompt_tensor(model: SpectraLM, prompt: torch.Tensor | list[int]) -> torch.Tensor:
    """The prompt as [B, T] ids on the model's device; DataError for an empty prompt, ids outside the
    vocabulary or more tokens than the model takes."""
    tokens = torch.as_tensor(prompt, device=model.model.embed_tokens.weight.device)
    if tokens.numel() == 0:
        raise DataError("the prompt must be a non-empty list of ids or a [batch, tokens] tensor; it is empty")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise DataError(f"the prompt must be token ids (integers), got {tokens.dtype}")
    tokens = tokens.long()
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise DataError(f"the prompt must be a non-empty list of ids or a [batch, tokens] tensor, got shape "
                        f"{tuple(tokens.shape)}")
    vocab = model.config.vocab_size
    outside = (tokens < 0) | (tokens >= vocab)
    if bool(outside.any()):
        bad = int(tokens[outside][0])
        raise DataError(f"the prompt holds token id {bad}, outside the model's vocabulary of {vocab}; encode it "
                        f"with the model's own tokenizer")
    if tokens.shape[1] > model.config.max_seq_len:
        raise DataError(f"the prompt has {tokens.shape[1]} tokens; the model takes at most "
                        f"{model.config.max_seq_len}")
    return tokens


def _plain_tokens(model: SpectraLM, tokens: torch.Tensor, total: int, temperature: float, top_k: int | None,
                  top_p: float | None, seed: int | None, eos_id: int | None,
                  decode_step: DecodeStep | None, cache_dtype: torch.dtype | None) -> Iterator[torch.Tensor]:
    """The reference loop: forward, sample on the host side with a torch.Generator, feed back."""
    device = tokens.device
    batch, prompt_len = tokens.shape
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    own_cache = decode_step is None
    if own_cache:
        model.setup_cache(batch, total, cache_dtype)
        decode_step = lambda tok, pos: model(tok, input_pos=pos)  # noqa: E731
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    try:
        logits = model.prefill(tokens)
        for pos in range(prompt_len, total):
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                finished |= nxt == eos_id
            yield nxt
            if (eos_id is not None and bool(finished.all())) or pos == total - 1:
                break
            logits = decode_step(nxt[:, None], torch.tensor([pos], device=device))
    finally:
        if own_cache:
            model.clear_cache()


@dataclass
class _IdleStep:
    """A captured sampling step kept for the model's next generation (see :func:`_graph_tokens`)."""

    step: GraphSamplingStep
    key: tuple  # (batch, cache dtype, compile, eos_id, temperature, top_k, top_p): what the graph baked in
    seed: torch.Tensor  # the sampler's seed, a device tensor the graph reads: set per generation
    # the model's parameters and buffers (KV cache included) and their data addresses when it was captured:
    # `model.half()` or `.to()` keeps a Parameter object but moves its data
    tensors: list[tuple[weakref.ref, int]]

    def fits(self, model: SpectraLM, key: tuple, total: int) -> bool:
        """Whether a generation of `total` positions with these settings can replay this step: same settings,
        a cache at least that long, and the very tensors the graph reads (no weight, layer or cache replaced)."""
        return key == self.key and total <= self.step.max_len and _same_tensors(model, self.tensors)


def _model_tensors(model: SpectraLM) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def _tensor_refs(model: SpectraLM) -> list[tuple[weakref.ref, int]]:
    """Weak references to the model's parameters and buffers, with their data addresses."""
    return [(weakref.ref(t), t.data_ptr()) for t in _model_tensors(model)]


def _same_tensors(model: SpectraLM, refs: list[tuple[weakref.ref, int]]) -> bool:
    current = _model_tensors(model)
    return len(current) == len(refs) and all(ref() is t and t.data_ptr() == ptr
                                             for (ref, ptr), t in zip(refs, current))


# One idle captured step per model, for the next generation with the same batch size and sampling settings: a
# capture costs about 78 ms on an H100 (3.9B TQ2), as much as 60 decode steps. It holds only weak references to
# the model and its tensors, so the model's KV cache stays allocated between generations until
# model.clear_cache() or model.setup_cache() (after which the idle step no longer fits and is dropped).
_IDLE: weakref.WeakKeyDictionary[SpectraLM, _IdleStep] = weakref.WeakKeyDictionary()


def release_decode_step(model: SpectraLM) -> None:
    """Drop the captured decode step that :func:`generate` keeps for `model` between calls and free the model's KV
    cache (``model.clear_cache()`` frees the cache; the step, then unusable, goes at the next call)."""
    idle = _IDLE.pop(model, None)
    if idle is not None:
        idle.step.release()
    model.clear_cache()


def _graph_tokens(model: SpectraLM, tokens: torch.Tensor, total: int, temperature: float, top_k: int | None,
                  top_p: float | None, seed: int | None, eos_id: int | None,
                  compile: bool, cache_dtype: torch.dtype | None) -> Iterator[torch.Tensor]:
    """The fast loop. The prompt's forward fills the KV cache and its token is handed out at once; only then is
    the one-token step captured (a :class:`~spectra.decode_graph.GraphSamplingStep` on that cache), so the
    capture (and with `compile`, the compilation) delays the second token, not the first. Each later token is
    copied to pinned host memory and handed out once the GPU is STREAM_LAG steps further.

    The captured step and its cache are kept for the model's next generation (:data:`_IDLE`): one with the same
    batch size, cache dtype and sampling settings, at most as long, and the same model tensors replays it with
    the new prompt prefilled into the same cache (rows past the prompt are written by each step before they are
    read) and the seed in the graph's seed tensor: no capture. A generation that raises frees both."""
    device = tokens.device
    batch, prompt_len = tokens.shape
    if seed is None:  # drawn from torch's global generator, so torch.manual_seed makes runs repeatable
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
    key = (batch, cache_dtype or model.model.embed_tokens.weight.dtype, compile, eos_id, temperature, top_k, top_p)
    n_new = total - prompt_len
    idle = _IDLE.pop(model, None)  # taken: a generation started meanwhile on this model captures its own
    if idle is not None and not idle.fits(model, key, total):
        idle.step.release()
        idle = None
    if idle is None:
        cache_len = decode_cache_length(total, model.config.max_seq_len)
        model.setup_cache(batch, cache_len, cache_dtype)
        seed_tensor = torch.zeros((), dtype=torch.long, device=device)
    else:
        cache_len, seed_tensor = idle.step.max_len, idle.seed
    # this generation's cache stays valid while it runs, even if another generation replaces the model's
    caches = [layer.self_attn.cache for layer in model.model.layers]
    seed_tensor.fill_(seed)
    sample = partial(sample_keyed, seed=seed_tensor, temperature=temperature, top_k=top_k, top_p=top_p)
    step = None if idle is None else idle.step
    failed = False
    try:
        logits = model.prefill(tokens)
        first = sample(logits[:, -1], torch.tensor([prompt_len], device=device))
        token = first.cpu()
        yield token
        finished = token == eos_id if eos_id is not None else torch.zeros(batch, dtype=torch.bool)
        if n_new == 1 or bool(finished.all()):
            return
        if step is None:
            step = GraphSamplingStep(model, batch, cache_len, sample, eos_id, compile=compile, keep_cache=True)
        step.start(first, prompt_len)
        host = torch.empty(n_new, batch, dtype=torch.long, pin_memory=True)
        ready = [torch.cuda.Event() for _ in range(n_new)]
        handed = 1
        for i in range(1, n_new + STREAM_LAG):
            if i < n_new:
                step.replay()
                host[i].copy_(step.tokens[:, 0], non_blocking=True)
                ready[i].record()
            while handed <= min(i - STREAM_LAG, n_new - 1):  # tokens the GPU finished STREAM_LAG steps ago
                ready[handed].synchronize()
                token = host[handed].clone()
                handed += 1
                yield token
                if eos_id is not None:
                    finished |= token == eos_id
                    if bool(finished.all()):
                        return
    except GeneratorExit:  # the caller stopped early: the step and cache are still good
        raise
    except BaseException:
        failed = True
        raise
    finally:
        ours = all(layer.self_attn.cache is cache is not None for layer, cache in zip(model.model.layers, caches))
        if step is not None and not failed and ours and model not in _IDLE:
            _IDLE[model] = _IdleStep(step, key, seed_tensor, _tensor_refs(model))
        else:
            if step is not None:
                step.release()
            if ours:  # a cache another generation allocated since is not this one's to free
                model.clear_cache()


@torch.no_grad()
def generate_stream(model: SpectraLM, prompt: torch.Tensor | list[int], max_new_tokens: int = 64,
                    temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                    seed: int | None = None, eos_id: int | None = None, fast: bool | None = None,
                    compile: bool = False, decode_step: DecodeStep | None = None,
                    cache_dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """Yield the new tokens of :func:`generate` one step at a time, each a [B] id tensor, as they are produced.
    Closing the iterator early ends the generation as if it had finished (on the fast path the captured step
    and its cache are kept for the next one, see :func:`generate`; the plain loop frees its cache)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    tokens = _prompt_tensor(model, prompt)
    total = min(tokens.shape[1] + max_new_tokens, model.config.max_seq_len)
    if total < tokens.shape[1] + max_new_tokens:  # stopping short of what was asked is said, not silent
        warnings.warn(f"only {total - tokens.shape[1]} of the {max_new_tokens} new tokens fit: the model's maximum "
                      f"length is {model.config.max_seq_len} tokens and the prompt has {tokens.shape[1]}",
                      SpectraWarning, stacklevel=3)
    if total <= tokens.shape[1]:
        return
    if decode_step is not None:
        if fast:
            raise ValueError("decode_step replaces the model's step in the plain loop; it cannot take fast=True")
        fast = False
    plan = decode_plan(tokens.device, fast, compile)
    if plan.fuse:
        model.fuse_projections()
    if plan.graph:
        yield from _graph_tokens(model, tokens, total, temperature, top_k, top_p, seed, eos_id, plan.compile,
                                 cache_dtype)
    else:
        yield from _plain_tokens(model, tokens, total, temperature, top_k, top_p, seed, eos_id, decode_step,
                                 cache_dtype)


@torch.no_grad()
def generate(model: SpectraLM, prompt: torch.Tensor | list[int], max_new_tokens: int = 64,
             temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_id: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None, fast: bool | None = None,
             compile: bool = False, decode_step: DecodeStep | None = None,
             cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Continue `prompt` ([B, T] ids or a list of ids) by up to `max_new_tokens` tokens.

    Returns [B, T + generated] on the model's device. `on_token` receives each new [B] token tensor as it is
    produced (for streaming; :func:`generate_stream` is the same as an iterator). Temperature 0 is greedy.

    `fast` (default: on for a model on a CUDA device) fuses the model's q/k/v and gate/up projections in
    place (the same weights; saving it writes the unfused layers) and decodes with a captured CUDA-graph step that
    samples on the GPU; `compile` compiles that step with torch.compile first (slower start; on an H100 no
    faster than the default step). A `seed` makes either path repeatable; the two paths draw different random
    numbers, so sampled (not greedy) tokens differ between them. `decode_step(tokens [B,1], pos [1]) -> logits`
    replaces the plain loop's one-token forward (e.g. a :class:`~spectra.decode_graph.GraphDecodeStep`).
    `cache_dtype` (default: the model's dtype) is the KV cache's: ``torch.int8`` stores keys and values in 8 bits
    with a scale per row: half the memory, at a small cost in accuracy, and faster steps at long context (a
    step reads half the cache bytes: 451 against 411 steps/s for a 3.9B TQ2 model at context 8192 on an H100).

    The fast path keeps its captured step and KV cache (sized in power-of-two buckets, see
    :func:`decode_cache_length`) for the model's next call: a later call with the same batch size, cache dtype
    and sampling settings that fits the cache replays it with no capture (a capture costs about 78 ms for the
    3.9B shape on an H100). :func:`release_decode_step` (or ``model.clear_cache()``) frees that memory.
    """
    tokens = _prompt_tensor(model, prompt)
    new: list[torch.Tensor] = []
    for token in generate_stream(model, tokens, max_new_tokens, temperature, top_k, top_p, seed, eos_id, fast,
                                 compile, decode_step, cache_dtype):
        if on_token is not None:
            on_token(token)
        new.append(token)  # on the host for the fast path: moved once at the end, not one blocking copy a token
    if not new:
        return tokens
    return torch.cat([tokens, torch.stack(new, dim=1).to(tokens.device)], dim=1)


@torch.no_grad()
def generate_uncached(model: SpectraLM, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full recomputation at every step: the reference the KV cache is tested against."""
    tokens = prompt if prompt.dim() == 2 else prompt[None]
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -model.config.max_seq_len:])
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@torch.no_grad()
def generate_cuda_graph(model: SpectraLM, prompt: torch.Tensor | list[int], max_new_tokens: int = 64,
                        compile: bool = False, **kwargs) -> torch.Tensor:
    """The plain generation loop (host-side sampling) with its one-token steps replayed from a
    :class:`GraphDecodeStep` (of the ``torch.compile``-d step with ``compile=True``). The reference the fast
    path of :func:`spectra.generate.generate` (sampling inside the graph) is tested against."""
    tokens = torch.as_tensor(prompt, dtype=torch.long)
    batch = 1 if tokens.dim() == 1 else tokens.shape[0]
    total = min(tokens.shape[-1] + max_new_tokens, model.config.max_seq_len)
    with GraphDecodeStep(model, batch, total, compile=compile, cache_dtype=kwargs.get("cache_dtype")) as step:
        return generate(model, prompt, max_new_tokens=max_new_tokens, decode_step=step, fast=False, **kwargs)
