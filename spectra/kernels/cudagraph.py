"""CUDA-graph decoding: one captured graph replays a whole one-token forward step.

A decode step of a packed model is a few hundred small kernels; launched from Python each costs more
CPU time than its GPU time, which would hide the packed kernels' gain. The model's KV cache has fixed
shapes (``setup_cache``), so a step can be captured once and replayed with new token/position inputs.
The prompt is still prefilled by the plain forward (its shapes vary), into the same cache buffers.

With ``compile=True`` the captured step is the model's forward compiled by ``torch.compile`` (inductor):
the packed matmul stays our kernel (an opaque op, ``spectra::ternary_matmul``) and the small kernels around
it (RMSNorm, rotary embedding, SwiGLU, the cache update) are fused, which is most of a step's launches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import DeviceError
from ..generate import generate
from ..model import SpectraLM


class GraphDecodeStep:
    """``step(tokens [B, 1], pos [1]) -> logits [B, 1, V]`` replaying a captured CUDA graph.

    Allocates the model's KV cache for `batch` sequences of `max_len` tokens. The returned logits are a
    static buffer overwritten by the next call (clone it to keep it). Call :meth:`close` (or use the
    object as a context manager) to free the cache and the graph.
    """

    def __init__(self, model: SpectraLM, batch: int, max_len: int, warmup: int = 2, compile: bool = False) -> None:
        device = model.model.embed_tokens.weight.device
        if device.type != "cuda":
            raise DeviceError(f"CUDA-graph decoding needs the model on a CUDA device, it is on {device}")
        self.model = model
        model.setup_cache(batch, max_len)
        # dynamic=False: one step shape ([batch, 1] tokens, fixed cache) is all the graph ever replays
        forward = torch.compile(model, dynamic=False) if compile else model
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        # Warm up on a side stream (compiles kernels, allocates split-k workspaces) before capturing.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(max(warmup, 3 if compile else 1)):
                forward(self.tokens, input_pos=self.pos)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = forward(self.tokens, input_pos=self.pos)

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


@torch.no_grad()
def generate_cuda_graph(model: SpectraLM, prompt: torch.Tensor | list[int], max_new_tokens: int = 64,
                        compile: bool = False, **kwargs) -> torch.Tensor:
    """:func:`spectra.generate.generate` with its one-token steps replayed from a CUDA graph (of the
    ``torch.compile``-d step with ``compile=True``: slower to start, faster per token)."""
    tokens = torch.as_tensor(prompt, dtype=torch.long)
    batch = 1 if tokens.dim() == 1 else tokens.shape[0]
    total = min(tokens.shape[-1] + max_new_tokens, model.config.max_seq_len)
    with GraphDecodeStep(model, batch, total, compile=compile) as step:
        return generate(model, prompt, max_new_tokens=max_new_tokens, decode_step=step, **kwargs)


def time_decode(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch: int, device: torch.device,
                steps: int = 50, start: int = 8) -> float:
    """Median-free mean seconds per decode step over `steps` steps (CUDA events, after one warm step)."""
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    step(tok, torch.tensor([start], device=device))
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    positions = [torch.tensor([start + 1 + i], device=device) for i in range(steps)]
    begin.record()
    for p in positions:
        step(tok, p)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3 / steps
