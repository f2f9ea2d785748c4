"""The prefill's rotary embedding and cache write in one kernel (kernels.attention.prefill_rope_write), bit for
bit against apply_rope_signed and write_cache_rows, and the model's fresh-cache prefill that takes it.

The Triton kernel runs under TRITON_INTERPRET=1 in a subprocess on CPU tensors (CI); GPU tests are marked.
"""

from __future__ import annotations

import textwrap
import types

import pytest
import torch
from kernel_support import run_in_interpreter

# Odd shapes (D = 24: half rows of 12 in a 16-wide tile; 3 heads in a 4-high one), fp16, bf16 and fp32, q/k/v as
# column slices of one fused product and as separate tensors, and a tile of 2 heads (PREFILL_TILE 64): two head
# groups, the second half masked. The caches are longer than the prompt and hold garbage everywhere: rows past
# T must stay as they were. Every result must equal the reference's bits (torch.equal): the kernel rounds where
# PyTorch's ops round (x * cos, the rolled row times the sines, their sum).
_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from spectra.kernels import attention
    from spectra.kernels.attention import prefill_rope_write, prefill_rope_write_reference
    from spectra.model import rope_tables
    from spectra.ternary import signed_sines
    torch.manual_seed(7)
    failures, cases = [], 0
    for (b, t, h, d, tile), dtype, fused in (((b, t, h, d, tile), dtype, fused)
                                            for b, t, h, d, tile in ((2, 37, 3, 24, 4096), (2, 37, 3, 128, 4096),
                                                                     (1, 5, 3, 24, 64))
                                            for dtype in (torch.float16, torch.bfloat16, torch.float32)
                                            for fused in (True, False)):
        attention.PREFILL_TILE = tile
        cos_t, sin_t = rope_tables(d, 64, 10000.0)
        cos, sin = cos_t[:t].to(dtype), signed_sines(sin_t[:t].to(dtype))
        if fused:  # column slices of one [B, T, 3 * H * D] product, as a fused q/k/v projection gives them
            qkv = (torch.randn(b, t, 3 * h * d) * 3).to(dtype)
            q, k, v = (y.view(b, t, h, d) for y in qkv.chunk(3, dim=-1))
        else:
            q, k, v = ((torch.randn(b, t, h, d) * 3).to(dtype) for _ in range(3))
        length = t + 11
        k_cache = (torch.randn(b, h, length, d) * 100).to(dtype)
        v_cache = (torch.randn(b, h, length, d) * 100).to(dtype)
        k_got, v_got, k_want, v_want = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
        got = prefill_rope_write(q, k, v, cos, sin, k_got, v_got)
        want = prefill_rope_write_reference(q, k, v, cos, sin, k_want, v_want)
        cases += 1
        name = f"b={b} t={t} h={h} d={d} tile={tile} {dtype} fused={fused}"
        if not (got.shape == (b, t, h, d) and got.dtype == dtype and got.is_contiguous()):
            failures.append(f"{name}: q out {tuple(got.shape)} {got.dtype} contiguous={got.is_contiguous()}")
        elif not torch.equal(got, want):
            failures.append(f"{name}: rotated q differs in {int((got != want).sum())} values")
        if not (torch.equal(k_got, k_want) and torch.equal(v_got, v_want)):
            failures.append(f"{name}: cache rows differ (k {int((k_got != k_want).sum())}, "
                            f"v {int((v_got != v_want).sum())} values)")
        if not (torch.equal(k_got[:, :, t:], k_cache[:, :, t:]) and torch.equal(v_got[:, :, t:], v_cache[:, :, t:])):
            failures.append(f"{name}: cache rows past T changed")

    # The model's fresh-cache prefill through the kernel (its gate forced open on the CPU) against the PyTorch
    # path: the same logits and the same cache, fused q/k/v projection or not.
    import spectra.model as model_module
    from spectra.config import get_config
    from spectra.model import SpectraLM
    for dtype, fuse in ((torch.float32, True), (torch.bfloat16, False)):
        model = SpectraLM(get_config("tiny", max_seq_len=64)).to(dtype).eval()
        if fuse:
            model.fuse_projections()
        tokens = torch.randint(0, model.config.vocab_size, (2, 13))
        results = []
        for kernel in (False, True):
            model_module.prefill_kernel_applies = lambda x, cache_k, cache_scale, on=kernel: on
            model.setup_cache(2, 20)
            for layer in model.model.layers:  # garbage in the cache: the prompt must attend to its own rows only
                layer.self_attn.cache.k.normal_()
                layer.self_attn.cache.v.normal_()
            with torch.no_grad():
                logits = model.prefill(tokens, last_only=False)
            results.append((logits, [(l.self_attn.cache.k.clone(), l.self_attn.cache.v.clone())
                                     for l in model.model.layers]))
        cases += 1
        (want, want_caches), (got, got_caches) = results
        same_caches = all(torch.equal(a[:, :, :13], b_[:, :, :13]) for pa, pb in zip(want_caches, got_caches)
                          for a, b_ in zip(pa, pb))
        if not (torch.equal(got, want) and same_caches):
            failures.append(f"model prefill {dtype} fused={fuse}: logits max diff "
                            f"{float((got.float() - want.float()).abs().max()):.3e}, caches equal {same_caches}")
""")


def test_prefill_kernel_in_interpreter_matches_reference_bit_for_bit():
    pytest.importorskip("triton")
    assert "cases=20" in run_in_interpreter(_SCRIPT)


def test_prefill_rope_write_rejects_bad_inputs():
    pytest.importorskip("triton")
    from spectra.kernels.attention import prefill_rope_write

    q = torch.randn(1, 5, 2, 8)
    rows = torch.randn(5, 8)
    cache = torch.randn(1, 2, 7, 8)
    with pytest.raises(ValueError, match="one shape"):
        prefill_rope_write(q, q[..., :6], q, rows, rows, cache, cache.clone())
    with pytest.raises(ValueError, match="D even"):
        prefill_rope_write(q[..., :7], q[..., :7], q[..., :7], rows[:, :7], rows[:, :7], cache[..., :7],
                           cache[..., :7].clone())
    with pytest.raises(ValueError, match="rotary rows"):
        prefill_rope_write(q, q, q, rows[:4], rows[:4], cache, cache.clone())
    with pytest.raises(ValueError, match=r"L >= T"):
        prefill_rope_write(q, q, q, rows, rows, cache[:, :, :4], cache[:, :, :4].clone())
    with pytest.raises(ValueError, match="one floating-point dtype"):
        prefill_rope_write(q, q, q, rows, rows, cache.half(), cache.half())
    with pytest.raises(ValueError, match="one floating-point dtype"):
        int8 = torch.zeros(1, 2, 7, 8, dtype=torch.int8)
        prefill_rope_write(q, q, q, rows, rows, int8, int8.clone())
    with pytest.raises(ValueError, match="contiguous"):
        prefill_rope_write(q, q, q, rows, rows, cache.transpose(2, 3).contiguous().transpose(2, 3), cache.clone())


def test_prefill_kernel_gate(monkeypatch):
    """GPU inference only, eager, into a floating-point cache of the activations' dtype. x is a stand-in with
    is_cuda set (the gate reads only that and the dtype), so each refusal shows on a CPU."""
    from spectra.kernels import pointwise
    from spectra.kernels.attention import prefill_kernel_applies

    fp16_cache = torch.zeros(1, 2, 4, 8, dtype=torch.float16)
    gpu_x = types.SimpleNamespace(is_cuda=True, dtype=torch.float16)
    if pointwise.triton is None:  # a CPU-only install: never
        assert not prefill_kernel_applies(gpu_x, fp16_cache, None)
        return
    with torch.no_grad():
        assert prefill_kernel_applies(gpu_x, fp16_cache, None)
        assert not prefill_kernel_applies(torch.zeros(1, 3, 16, dtype=torch.float16), fp16_cache, None)  # CPU
        int8_cache, scales = torch.zeros(1, 2, 4, 8, dtype=torch.int8), torch.zeros(1, 2, 4)
        assert not prefill_kernel_applies(gpu_x, int8_cache, scales)
        assert not prefill_kernel_applies(gpu_x, fp16_cache.bfloat16(), None)  # cache dtype != activations'
        assert not prefill_kernel_applies(gpu_x, fp16_cache.float(), None)
        monkeypatch.setattr(pointwise, "ENABLED", False)  # benchmarks time the PyTorch ops
        assert not prefill_kernel_applies(gpu_x, fp16_cache, None)
        monkeypatch.setattr(pointwise, "ENABLED", True)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not prefill_kernel_applies(gpu_x, fp16_cache, None)
        monkeypatch.undo()
    with torch.enable_grad():  # training
        assert not prefill_kernel_applies(gpu_x, fp16_cache, None)


def test_fresh_cache_prefill_takes_the_kernel_where_it_applies(monkeypatch):
    """The model's wiring, on the CPU: with the gate open every layer of a fresh-cache prefill makes one call (the
    kernel replaced by its reference, counted) and gives the PyTorch path's logits and cache; later steps with a
    mask, a forward without a cache and an int8 cache's prefill make none."""
    import spectra.model as model_module
    from spectra.config import get_config
    from spectra.kernels.attention import prefill_rope_write_reference
    from spectra.model import SpectraLM

    torch.manual_seed(1)
    model = SpectraLM(get_config("tiny", max_seq_len=64)).eval()
    model.fuse_projections()
    tokens = torch.randint(0, model.config.vocab_size, (2, 11))

    def prefill(cache_dtype=None):
        model.setup_cache(2, 16, cache_dtype)
        with torch.no_grad():
            logits = model.prefill(tokens, last_only=False)
            step = model(tokens[:, :2], input_pos=torch.tensor([11, 12]))  # a masked step: not a prefill
        return logits, step, [(layer.self_attn.cache.k.clone(), layer.self_attn.cache.v.clone())
                              for layer in model.model.layers]

    want = prefill()
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return prefill_rope_write_reference(*args)

    monkeypatch.setattr(model_module, "prefill_kernel_applies",
                        lambda x, cache_k, cache_scale: cache_scale is None and cache_k.dtype == x.dtype)
    monkeypatch.setattr(model_module, "prefill_rope_write", counted)
    got = prefill()
    assert calls == [(2, 11, 4, model.config.head_dim)] * model.config.num_layers
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(torch.equal(a, b) for pa, pb in zip(got[2], want[2]) for a, b in zip(pa, pb))
    calls.clear()
    prefill(torch.int8)
    with torch.no_grad():
        model.clear_cache()
        model(tokens)
    assert calls == []


# --- GPU ---

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])  # fp32: no fused multiply-add
def test_gpu_prefill_kernel_matches_reference_bit_for_bit(dtype):
    from spectra.kernels.attention import prefill_rope_write, prefill_rope_write_reference
    from spectra.model import rope_tables
    from spectra.ternary import signed_sines

    gen = torch.Generator(device="cuda").manual_seed(8)
    for b, t, h, d, fused in ((2, 37, 3, 24, True), (2, 37, 3, 24, False), (1, 2048, 24, 128, True),
                              (3, 129, 5, 72, False), (16, 7, 24, 128, True)):
        cos_t, sin_t = rope_tables(d, t, 10000.0)
        cos, sin = cos_t.to("cuda", dtype), signed_sines(sin_t.to("cuda", dtype))
        if fused:
            qkv = (torch.randn(b, t, 3 * h * d, device="cuda", generator=gen) * 3).to(dtype)
            q, k, v = (y.view(b, t, h, d) for y in qkv.chunk(3, dim=-1))
        else:
            q, k, v = ((torch.randn(b, t, h, d, device="cuda", generator=gen) * 3).to(dtype) for _ in range(3))
        caches = [(torch.randn(b, h, t + 9, d, device="cuda", generator=gen) * 100).to(dtype) for _ in range(2)]
        got_caches = [c.clone() for c in caches]
        want_caches = [c.clone() for c in caches]
        got = prefill_rope_write(q, k, v, cos, sin, *got_caches)
        want = prefill_rope_write_reference(q, k, v, cos, sin, *want_caches)
        assert torch.equal(got, want), (b, t, h, d, fused)
        for got_c, want_c, before in zip(got_caches, want_caches, caches):
            assert torch.equal(got_c, want_c), (b, t, h, d, fused)
            assert torch.equal(got_c[:, :, t:], before[:, :, t:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fuse", [True, False])
def test_gpu_prefill_with_the_kernel_equals_the_pytorch_path(dtype, fuse, monkeypatch):
    """A small model's prefill on a GPU: the kernel path gives the PyTorch path's logits and cache, bit for bit.
    The reference closes only this kernel's gate (spectra.kernels.pointwise.ENABLED = False would also take the
    fused RMSNorm and SwiGLU away, whose fp32 sums of squares round differently); with ENABLED False the kernel
    is not called."""
    import spectra.model as model_module
    from spectra.config import get_config
    from spectra.kernels import pointwise
    from spectra.model import SpectraLM

    torch.manual_seed(9)
    model = SpectraLM(get_config("mini")).cuda().to(dtype).eval()
    if fuse:
        model.fuse_projections()
    tokens = torch.randint(0, model.config.vocab_size, (3, 77), device="cuda")
    calls = []
    kernel = model_module.prefill_rope_write
    monkeypatch.setattr(model_module, "prefill_rope_write", lambda *args: calls.append(1) or kernel(*args))

    def prefill():
        model.setup_cache(3, 100)
        for layer in model.model.layers:  # garbage past the prompt, which it must not read
            layer.self_attn.cache.k.normal_()
            layer.self_attn.cache.v.normal_()
        with torch.no_grad():
            logits = model.prefill(tokens, last_only=False)
        return logits, [(layer.self_attn.cache.k[:, :, :77].clone(), layer.self_attn.cache.v[:, :, :77].clone())
                        for layer in model.model.layers]

    got, got_caches = prefill()
    assert len(calls) == model.config.num_layers
    gate = model_module.prefill_kernel_applies
    monkeypatch.setattr(model_module, "prefill_kernel_applies", lambda *args: False)
    want, want_caches = prefill()
    assert len(calls) == model.config.num_layers
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for pa, pb in zip(got_caches, want_caches) for a, b in zip(pa, pb))
    monkeypatch.setattr(model_module, "prefill_kernel_applies", gate)
    monkeypatch.setattr(pointwise, "ENABLED", False)
    prefill()
    assert len(calls) == model.config.num_layers
