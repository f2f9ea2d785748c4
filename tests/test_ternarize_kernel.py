"""The fused STE ternarization kernel (training on GPU) against the eager PyTorch form.

CI has no GPU: the Triton kernel runs under TRITON_INTERPRET=1 in a subprocess (the variable must be set
before triton is imported). A GPU test checks the whole autograd path on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from spectra.linear import ternary_weight_ste
from spectra.ternary import expand_scales, shard_scales, ternarize, ternary_dense_weight

pytest.importorskip("triton")

_INTERPRETER_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from spectra.kernels.ternarize import ternary_weight_fused
    from spectra.ternary import expand_scales, shard_scales
    torch.manual_seed(0)
    failures, cases = [], 0
    for rows, cols in ((37, 77), (33, 130), (5, 3), (40, 7)):
        for parts, axis in ((1, 0), (2, 0), (3, 0), (6, 0), (2, 1), (3, 1), (5, 1)):
            if parts > (rows, cols)[axis]:
                continue
            w = torch.randn(rows, cols) * 0.02
            scales = shard_scales(w, parts, axis)
            s_full = expand_scales(scales, (rows, cols), axis).expand(rows, cols)
            # Values exactly on the rounding boundary (+-0.5 s rounds half-to-even to 0), just past it, and
            # beyond the clamp; the scales stay those computed above.
            w[0, 0], w[-1, -1] = 0.5 * s_full[0, 0], -0.5 * s_full[-1, -1]
            w[1, 1] = torch.nextafter(0.5 * s_full[1, 1], torch.tensor(1.0))
            w[2, 2] = 3.0 * s_full[2, 2]
            want_trits = torch.round(torch.clamp(w / s_full, -1.0, 1.0))
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                want = (want_trits * s_full).to(dtype)
                for layout in ("contiguous", "transposed"):
                    src = w if layout == "contiguous" else w.t().contiguous().t()
                    got = ternary_weight_fused(src, scales, axis, dtype)
                    cases += 1
                    if dtype == torch.bfloat16:
                        # numpy has no bf16: the interpreter's fp32 -> bf16 store may round differently from
                        # the GPU's round-to-nearest (exact there, see the GPU test); allow one bf16 step.
                        same = torch.all((got.float() - want.float()).abs() <= want.float().abs() * 2**-7)
                    else:
                        same = torch.equal(got, want)
                    if got.dtype != dtype or not same:
                        failures.append(f"{rows}x{cols} P={parts} axis={axis} {dtype} {layout}")
    # The boundary cases really are on the boundary (else the test could not tell the rounding modes apart).
    assert (w[0, 0] / s_full[0, 0]).item() == 0.5
    print("cases", cases)
    print("FAILURES", failures)
""")


def test_fused_ternarize_kernel_matches_eager_under_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FAILURES []" in result.stdout, result.stdout[-3000:]
    cases = int(result.stdout.split("cases", 1)[1].split()[0])
    assert cases >= 60


def test_shard_scales_are_mean_abs_per_shard() -> None:
    torch.manual_seed(1)
    w = torch.randn(10, 7)
    for parts, axis in ((1, 0), (3, 0), (2, 1)):
        pieces = torch.tensor_split(w, parts, dim=axis)
        want = torch.stack([p.abs().mean() for p in pieces]) + 1e-5
        torch.testing.assert_close(shard_scales(w, parts, axis), want, rtol=1e-6, atol=0)


def test_ste_output_dtype_and_straight_through_gradient_on_cpu() -> None:
    torch.manual_seed(2)
    w = torch.randn(12, 9, requires_grad=True)
    out = ternary_weight_ste(w, 3, 0, torch.bfloat16)
    trits, scales = ternarize(w, 3, 0)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ternary_dense_weight(trits, scales, 0, torch.bfloat16))
    g = torch.randn(12, 9, dtype=torch.bfloat16)
    out.backward(g)
    assert w.grad.dtype == torch.float32
    assert torch.equal(w.grad, g.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_ste_on_cuda_matches_cpu_reference() -> None:
    torch.manual_seed(3)
    for shape, parts, axis in (((300, 517), 3, 0), ((129, 1000), 2, 1), ((64, 64), 1, 0)):
        w = (torch.randn(shape) * 0.02).cuda().requires_grad_()
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            got = ternary_weight_ste(w, parts, axis, dtype)
            trits, scales = ternarize(w, parts, axis)
            assert torch.equal(got, ternary_dense_weight(trits, scales, axis, dtype))
            got.float().sum().backward()
            assert torch.equal(w.grad, torch.ones_like(w))
            w.grad = None
        # In fp32, t * s / s is exactly t: every value is -1, 0 or +1 times its shard's scale.
        scale_full = expand_scales(shard_scales(w, parts, axis), shape, axis)
        ratios = ternary_weight_ste(w, parts, axis, torch.float32).detach() / scale_full
        assert set(torch.unique(ratios).tolist()) <= {-1.0, 0.0, 1.0}
