"""CUDA-graph decoding: one captured graph replays a whole one-token step.

A decode step of a packed model is a few hundred small kernels; launched from Python each costs more
CPU time than its GPU time, which would hide the packed kernels' gain. The model's KV cache has fixed
shapes (``setup_cache``), so a step can be captured once and replayed. The prompt is still prefilled by the
plain forward (its shapes vary), into the same cache buffers.

Two captured steps: :class:`GraphDecodeStep` returns logits (benchmarks, and callers that choose tokens
themselves); :class:`GraphSamplingStep` also chooses the next token on the GPU (:func:`~spectra.sampling.
sample_keyed`), feeds it back as the next input and advances the position, so a generation is a string of
replays with no host work between them (:func:`spectra.generate.generate` streams its tokens with a lag).

With ``compile=True`` the captured forward is the model compiled by ``torch.compile`` (inductor): the packed
matmul, the decode attention, RMSNorm (with the residual add) and SwiGLU stay our kernels (opaque ops, launched
with PDL), and inductor fuses the rest (the embedding, the rotary rows, the column scales, the sampling).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from .errors import DeviceError
from .model import SpectraLM
from .sampling import sample_keyed

Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [B, V], position [1]) -> ids [B]


def _model_device(model: SpectraLM) -> torch.device:
    device = model.model.embed_tokens.weight.device
    if device.type != "cuda":
        raise DeviceError(f"CUDA-graph decoding needs the model on a CUDA device, it is on {device}")
    return device


def _capture(step: Callable[[], torch.Tensor | None], device: torch.device, warmup: int,
             before_each: Callable[[], None]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None]:
    """Warm `step` up on a side stream (compiles kernels, allocates split-k workspaces), then capture it."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(warmup):
            before_each()
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    before_each()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = step()
    return graph, out


class GraphDecodeStep:
    """``step(tokens [B, 1], pos [1]) -> logits [B, 1, V]`` replaying a captured CUDA graph.

    Allocates the model's KV cache for `batch` sequences of `max_len` tokens (in `cache_dtype`, see
    :meth:`~spectra.model.SpectraLM.setup_cache`). The returned logits are a
    static buffer overwritten by the next call (clone it to keep it). Call :meth:`close` (or use the
    object as a context manager) to free the cache and the graph.
    """

    def __init__(self, model: SpectraLM, batch: int, max_len: int, warmup: int = 2, compile: bool = False,
                 cache_dtype: torch.dtype | None = None) -> None:
        device = _model_device(model)
        self.model = model
        model.setup_cache(batch, max_len, cache_dtype)
        # dynamic=False: one step shape ([batch, 1] tokens, fixed cache) is all the graph ever replays
        forward = torch.compile(model, dynamic=False) if compile else model
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph, self.logits = _capture(lambda: forward(self.tokens, input_pos=self.pos), device,
                                           max(warmup, 3 if compile else 1), lambda: None)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits

    def close(self) -> None:
        self.graph = None
        self.model.clear_cache()

    def __enter__(self) -> GraphDecodeStep:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GraphSamplingStep:
    """A captured step that samples on the GPU: each :meth:`replay` runs the model on :attr:`tokens` [B, 1]
    at :attr:`pos` [1], writes the sampled next token into :attr:`tokens` and adds one to :attr:`pos`.

    `sample(logits [B, V], position [1]) -> ids [B]` is called with the position of the token it chooses.
    With `eos_id`, a sequence that produced it keeps producing it (as the plain loop does). Allocates the
    KV cache (``batch`` x ``max_len``, in `cache_dtype`), or with `keep_cache` takes the one the model holds
    (already filled by a prompt's forward: the warm-up steps write only its last row, which a generation writes
    before it reads);
    :meth:`close` frees it.
    """

    def __init__(self, model: SpectraLM, batch: int, max_len: int, sample: Sampler, eos_id: int | None = None,
                 compile: bool = False, warmup: int = 2, keep_cache: bool = False,
                 cache_dtype: torch.dtype | None = None) -> None:
        device = _model_device(model)
        # only a weak reference to the model: spectra.generate keeps an idle step per model, which must not keep
        # the model alive
        self.model_ref, self.sample, self.eos_id, self.max_len = weakref.ref(model), sample, eos_id, max_len
        if not keep_cache:
            model.setup_cache(batch, max_len, cache_dtype)
        elif model.cache_shape() != (batch, max_len):
            raise ValueError(f"keep_cache needs the model's KV cache for {batch} sequences of {max_len} positions, "
                             f"it holds {model.cache_shape()}")
        forward = torch.compile(model, dynamic=False) if compile else model
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        # the warm-up steps run at the last position (they write its cache row and move pos; a generation writes
        # that row before it reads it, and start() resets the rest): a prompt already in the cache stays intact
        self.graph, _ = _capture(lambda: self._step(forward), device, max(warmup, 3 if compile else 1),
                                 lambda: self.pos.fill_(max_len - 1))

    def _step(self, forward: Callable[..., torch.Tensor]) -> None:
        logits = forward(self.tokens, input_pos=self.pos)
        nxt = self.sample(logits[:, -1], self.pos + 1)
        if self.eos_id is not None:
            nxt = torch.where(self.finished, self.eos_id, nxt)
            self.finished |= nxt == self.eos_id
        self.tokens.copy_(nxt[:, None])
        self.pos.add_(1)

    def start(self, first: torch.Tensor, pos: int) -> None:
        """Continue from the token ids `first` [B] at position `pos` (the prompt is in the cache before it)."""
        self.tokens.copy_(first[:, None])
        self.pos.fill_(pos)
        if self.eos_id is not None:
            self.finished.copy_(first == self.eos_id)

    def replay(self) -> None:
        self.graph.replay()

    def release(self) -> None:
        """Drop the captured graph (after the replays in flight, which use the cache), leaving the cache."""
        if self.graph is not None:
            torch.cuda.current_stream(self.tokens.device).synchronize()
        self.graph = None

    def close(self) -> None:
        """Drop the graph and free the model's KV cache."""
        self.release()
        model = self.model_ref()
        if model is not None:
            model.clear_cache()


def greedy(logits: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The sampler of a greedy generation (``temperature=0``): the arg max, as :func:`spectra.generate.generate`
    chooses it inside its graph."""
    return sample_keyed(logits, position, temperature=0)


def _mean_seconds(call: Callable[[int], object], calls: int) -> float:
    """Mean seconds per call of call(0), ..., call(calls - 1), between two CUDA events."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for i in range(calls):
        call(i)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3 / calls


def time_replays(step: GraphSamplingStep, steps: int = 50, start: int = 8) -> float:
    """Mean seconds per replay of a sampling step over `steps` replays from position `start` (CUDA events,
    after one warm replay): the rate :func:`spectra.generate.generate` decodes at, with no host work between
    replays."""
    batch = step.tokens.shape[0]
    step.start(torch.zeros(batch, dtype=torch.long, device=step.tokens.device), start)
    step.replay()
    return _mean_seconds(lambda _: step.replay(), steps)


def time_decode(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch: int, device: torch.device,
                steps: int = 50, start: int = 8) -> float:
    """Mean seconds per call of a logits-returning step (a :class:`GraphDecodeStep`) over `steps` calls (CUDA
    events, after one warm call); the token and position are copied in before each replay."""
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    step(tok, torch.tensor([start], device=device))
    positions = [torch.tensor([start + 1 + i], device=device) for i in range(steps)]
    return _mean_seconds(lambda i: step(tok, positions[i]), steps)
