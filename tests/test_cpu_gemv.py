"""The compiled CPU product of packed weights (spectra.kernels.cpu_gemv) against the reference: odd shapes, both
formats, per-shard scales on both axes, fp32/bf16/fp16; the dispatcher's choice; the fallback when compiling
fails; greedy decoding of a packed model equal to the reference path's."""

from __future__ import annotations

import copy

import pytest
import torch

import spectra
from spectra import kernels
from spectra.formats import get_format
from spectra.kernels import cpu_gemv, ternary_matmul, ternary_matmul_reference


@pytest.fixture
def compiled_path(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "ENABLED", True)
    monkeypatch.setattr(cpu_gemv.FALLBACK, "broken", None)


def _case(fmt, n, k, parts, axis, seed):
    g = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(parts, generator=g) + 0.05
    return get_format(fmt).pack(trits), scales, g


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
def test_compiled_cpu_product_equals_the_reference(fmt, compiled_path):
    calls = 0
    for seed, (n, k, parts, axis, m) in enumerate([(37, 77, 1, 0, 1), (70, 300, 2, 0, 3), (64, 611, 3, 1, 8),
                                                   (5, 16, 2, 1, 1), (129, 1000, 6, 0, 2)]):
        packed, scales, g = _case(fmt, n, k, parts, axis, seed)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(m, k, generator=g).to(dtype)
            got = cpu_gemv.ternary_matmul_cpu(x, packed, fmt, k, scales, axis)
            want = ternary_matmul_reference(x.float(), packed, fmt, k, scales, axis)
            assert got.dtype == dtype and got.shape == (m, n)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())
            calls += 1
    # 3-D activations, through the public dispatcher
    packed, scales, g = _case(fmt, 24, 40, 2, 0, 99)
    x = torch.randn(2, 3, 40, generator=g)
    torch.testing.assert_close(ternary_matmul(x, packed, fmt, 40, scales, 0),
                               ternary_matmul_reference(x, packed, fmt, 40, scales, 0), rtol=1e-5, atol=1e-5)
    assert calls == 15


def test_dispatcher_takes_the_compiled_path_for_decode_steps_only(compiled_path, monkeypatch):
    taken = []
    real = cpu_gemv.ternary_matmul_cpu
    monkeypatch.setattr(cpu_gemv, "ternary_matmul_cpu", lambda *a: taken.append(a[0].shape) or real(*a))
    packed, scales, g = _case("tq2", 24, 40, 1, 0, 1)
    for m in (1, cpu_gemv.MAX_M, cpu_gemv.MAX_M + 1):
        ternary_matmul(torch.randn(m, 40, generator=g), packed, "tq2", 40, scales, 0)
    x = torch.randn(2, 40, generator=g, requires_grad=True)  # training through a packed base (LoRA): reference
    ternary_matmul(x, packed, "tq2", 40, scales, 0).sum().backward()
    assert x.grad is not None
    assert taken == [(1, 40), (cpu_gemv.MAX_M, 40)]
    with pytest.raises(spectra.errors.FormatError, match="features"):  # the same input checks as every path
        ternary_matmul(torch.randn(1, 41), packed, "tq2", 40, scales, 0)


def test_compile_failure_falls_back_to_the_reference_with_one_warning(compiled_path, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(cpu_gemv, "_compiled", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: no_compiler)
    packed, scales, g = _case("tq1", 30, 50, 2, 1, 3)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ compiler") as record:
        for _ in range(3):
            x = torch.randn(1, 50, generator=g)
            torch.testing.assert_close(ternary_matmul(x, packed, "tq1", 50, scales, 1),
                                       ternary_matmul_reference(x, packed, "tq1", 50, scales, 1))
    assert len([w for w in record if "compiled CPU product" in str(w.message)]) == 1
    assert not cpu_gemv.usable(torch.randn(1, 50))


def test_greedy_decoding_of_a_packed_model_equals_the_reference_path(compiled_path, monkeypatch):
    torch.manual_seed(0)
    model = spectra.SpectraLM(spectra.get_config("tiny", vocab_size=320, model_parallel_size=2))
    frozen = spectra.freeze_ternary(model).eval()
    prompt = torch.randint(0, 320, (2, 7))
    real = cpu_gemv.ternary_matmul_cpu
    taken = []
    monkeypatch.setattr(cpu_gemv, "ternary_matmul_cpu", lambda *a: taken.append(1) or real(*a))
    for fmt in ("tq2", "tq1"):
        packed = spectra.pack_model(copy.deepcopy(frozen), fmt)
        taken.clear()
        got = spectra.generate(packed, prompt, 12, temperature=0)
        monkeypatch.setattr(cpu_gemv, "ENABLED", False)
        want = spectra.generate(packed, prompt, 12, temperature=0)
        monkeypatch.setattr(cpu_gemv, "ENABLED", True)
        assert taken and torch.equal(got, want)
    assert kernels.cpu_gemv is cpu_gemv


def test_scales_changed_in_place_or_swapped_take_effect_at_once(compiled_path):
    # the loop gathers each row's scale itself (only the shard index, a function of the shape, is memoised):
    # a scale edited in place, another layer's scales of the same shape, or a new count of shards must never
    # reuse an earlier call's values
    packed, scales, g = _case("tq2", 50, 64, 5, 0, 7)
    x = torch.randn(1, 64, generator=g)
    first = cpu_gemv.ternary_matmul_cpu(x, packed, "tq2", 64, scales, 0)
    scales.mul_(2.0)
    torch.testing.assert_close(cpu_gemv.ternary_matmul_cpu(x, packed, "tq2", 64, scales, 0), 2 * first)
    for parts in (5, 2, 1):
        other = torch.rand(parts, generator=g) + 0.5
        torch.testing.assert_close(cpu_gemv.ternary_matmul_cpu(x, packed, "tq2", 64, other, 0),
                                   ternary_matmul_reference(x, packed, "tq2", 64, other, 0), rtol=1e-5, atol=1e-5)
