"""Split-KV decode attention over the filled part of the KV cache, against SDPA with the position mask.

The Triton kernels run under TRITON_INTERPRET=1 in a subprocess on CPU tensors (CI); GPU tests are marked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

# Odd head size (40 -> a masked 64-wide tile), a cache length that is not a multiple of the chunk, positions
# at chunk edges, and a long cache whose chunks exceed one combine block (2200 / 64 = 35 > 32). The cache
# past pos holds large garbage: it must not leak into the result.
_INTERPRETER_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from spectra.kernels.attention import decode_attention, decode_attention_reference
    torch.manual_seed(0)
    failures, cases = [], 0
    # pos past the cache (a caller's bug) reads no memory past it: all L positions, as the reference's mask says
    for b, h, length, d, dtype, positions in ((2, 3, 150, 40, torch.float32, (0, 63, 64, 100, 149, 170)),
                                              (1, 2, 2200, 16, torch.float32, (2150,)),
                                              (1, 2, 97, 32, torch.float16, (5, 96))):
        q = torch.randn(b, h, 1, d).to(dtype)
        k = torch.randn(b, h, length, d).to(dtype)
        v = torch.randn(b, h, length, d).to(dtype)
        for p in positions:
            kk, vv = k.clone(), v.clone()
            kk[:, :, p + 1:] = 1e4
            vv[:, :, p + 1:] = -1e4
            pos = torch.tensor([p])
            got = decode_attention(q, kk, vv, pos)
            want = decode_attention_reference(q.float(), k.float(), v.float(), pos)
            err = float((got.float() - want).abs().max())
            cases += 1
            if not err < (1e-5 if dtype == torch.float32 else 2e-3):
                failures.append(f"b={b} h={h} L={length} d={d} {dtype} pos={p}: max err {err:.3e}")
    print(f"cases={cases}")
    for f in failures:
        print("FAIL", f)
    sys.exit(1 if failures else 0)
""")


def test_decode_attention_kernels_in_interpreter_match_sdpa():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "cases=9" in proc.stdout


def test_decode_attention_rejects_bad_shapes():
    from spectra.kernels.attention import decode_attention

    q = torch.randn(1, 2, 3, 8)
    cache = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match=r"q \[B, H, 1, D\]"):
        decode_attention(q, cache, cache, torch.tensor([2]))
    with pytest.raises(ValueError, match="one position"):
        decode_attention(q[:, :, :1], cache, cache, torch.tensor([2, 3]))


def test_cpu_cached_attention_is_sdpa_with_mask():
    from spectra.kernels.attention import cached_attention, decode_attention_reference

    torch.manual_seed(1)
    q, k, v = torch.randn(2, 3, 1, 16), torch.randn(2, 3, 20, 16), torch.randn(2, 3, 20, 16)
    pos = torch.tensor([7])
    mask = pos[:, None] >= torch.arange(20)[None, :]
    assert torch.equal(cached_attention(q, k, v, pos, mask), decode_attention_reference(q, k, v, pos))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_attention_matches_sdpa_and_replays_in_a_graph(dtype):
    from spectra.kernels.attention import decode_attention, decode_attention_reference

    gen = torch.Generator(device="cuda").manual_seed(2)
    for b, h, length, d in ((1, 24, 4096, 128), (16, 24, 128, 128), (3, 5, 999, 72)):
        q = torch.randn(b, h, 1, d, device="cuda", dtype=dtype, generator=gen)
        k = torch.randn(b, h, length, d, device="cuda", dtype=dtype, generator=gen)
        v = torch.randn(b, h, length, d, device="cuda", dtype=dtype, generator=gen)
        pos = torch.tensor([0], device="cuda")
        out = decode_attention(q, k, v, pos)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = decode_attention(q, k, v, pos)
        for p in sorted({0, 1, 63, 64, length // 2, length - 1}):
            pos.fill_(p)
            graph.replay()
            want = decode_attention_reference(q.float(), k.float(), v.float(), pos)
            tol = 2e-3 if dtype == torch.float16 else 1.6e-2
            assert float((out.float() - want).abs().max()) <= tol * max(1.0, float(want.abs().max())), (b, h, p)
