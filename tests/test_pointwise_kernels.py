"""Fused RMSNorm (with and without the residual add) and SwiGLU kernels against their PyTorch references.

The Triton kernels run under TRITON_INTERPRET=1 in a subprocess on CPU tensors (CI); GPU tests are marked.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_support import run_in_interpreter

pytest.importorskip("triton")

# Odd widths (a masked tail of the power-of-two block, an H past one 1024-wide block), rows of a strided view
# (the halves of a fused gate/up product), fp32 and fp16. fp32 must agree to rounding; fp16 to one unit in
# the last place of the output (the fp32 sum of squares is taken in another order).
_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from spectra.kernels.pointwise import (add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference,
                                           swiglu, swiglu_reference)
    torch.manual_seed(0)
    failures, cases = [], 0

    def check(name, got, want, dtype):
        global cases
        cases += 1
        tol = 2e-6 if dtype == torch.float32 else 1e-3
        err = float(((got.float() - want.float()).abs() / want.float().abs().clamp_min(1.0)).max())
        if got.shape != want.shape or got.dtype != want.dtype or not err <= tol:
            failures.append(f"{name}: {tuple(got.shape)} {got.dtype} err {err:.3e}")

    for shape, dtype in (((3, 5, 77), torch.float32), ((2, 1, 200), torch.float16), ((1, 1, 33), torch.float16)):
        x = (torch.randn(shape) * 3).to(dtype)
        r = torch.randn(shape).to(dtype)
        w = (torch.rand(shape[-1]) + 0.5).to(dtype)
        check(f"rms_norm {shape}", rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), dtype)
        total, normed = add_rms_norm(x, r, w, 1e-6)
        want_total, want_normed = add_rms_norm_reference(x, r, w, 1e-6)
        cases += 1
        if not torch.equal(total, want_total):
            failures.append(f"add_rms_norm sum {shape} {dtype} differs")
        check(f"add_rms_norm {shape}", normed, want_normed, dtype)
    for rows, h, dtype in ((3, 1100, torch.float32), (2, 90, torch.float16), (1, 2051, torch.float16)):
        gate_up = (torch.randn(rows, 1, 2 * h) * 4).to(dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        check(f"swiglu {rows}x{h}", swiglu(gate, up), swiglu_reference(gate, up), dtype)

    # Under torch.compile the kernels are opaque ops: the traced graph calls them (not inductor's fusion of the
    # PyTorch ops), their fakes give the real shapes, and the results are the eager kernels'.
    from torch.library import opcheck
    from spectra.kernels.pointwise import add_rms_norm_op, rms_norm_op, swiglu_op
    x, r = (torch.randn(2, 3, 40) * 2).half(), torch.randn(2, 3, 40).half()
    w = (torch.rand(40) + 0.5).half()
    gate, up = (torch.randn(2, 1, 180) * 3).half().chunk(2, dim=-1)
    for op, args in ((rms_norm_op, (x, w, 1e-5)), (add_rms_norm_op, (x, r, w, 1e-5)), (swiglu_op, (gate, up))):
        opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        cases += 1
    traced = []

    def recording_backend(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    def step(x, r, w, gate, up):
        total, normed = add_rms_norm(x, r, w, 1e-5)
        return total, normed, rms_norm(normed, w, 1e-5), swiglu(gate, up)

    got = torch.compile(step, backend=recording_backend, fullgraph=True)(x, r, w, gate, up)
    want = step(x, r, w, gate, up)
    cases += 1
    ops = sorted(t for t in traced if t.startswith("spectra."))
    if ops != ["spectra.add_rms_norm.default", "spectra.rms_norm.default", "spectra.swiglu.default"]:
        failures.append(f"compiled step calls {traced}")
    if not all(torch.equal(a, b) for a, b in zip(got, want)):
        failures.append("compiled pointwise ops differ from the eager kernels")

    # The same inside a compiled model forward (fused gate/up halves as strided views, the residual carried
    # from block to block): the kernels forced on for CPU tensors, which the interpreter runs.
    import spectra.model as model_module
    from spectra.config import get_config
    from spectra.model import SpectraLM
    model_module.fused_pointwise_applies = lambda x, weight=None: not torch.is_grad_enabled()
    model = SpectraLM(get_config("tiny", weight_kind="float", vocab_size=61, num_layers=2)).eval()
    model.fuse_projections()
    tokens = torch.randint(0, 61, (2, 5))
    traced.clear()
    with torch.no_grad():
        want = model(tokens)
        got = torch.compile(model, backend=recording_backend, fullgraph=True)(tokens)
    cases += 1
    counts = {op: traced.count(op) for op in ("spectra.add_rms_norm.default", "spectra.rms_norm.default",
                                                "spectra.swiglu.default")}
    if counts != {"spectra.add_rms_norm.default": 4, "spectra.rms_norm.default": 1, "spectra.swiglu.default": 2}:
        failures.append(f"compiled model calls {counts}")
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
        failures.append(f"compiled model differs: {float((got - want).abs().max()):.3e}")
""")


def test_pointwise_kernels_in_interpreter_match_references():
    assert "cases=17" in run_in_interpreter(_SCRIPT)


def test_fused_kernels_stay_out_of_training_and_cpu():
    from spectra.kernels.pointwise import fused_pointwise_applies

    x = torch.randn(2, 8)
    with torch.no_grad():
        assert not fused_pointwise_applies(x)  # CPU tensors keep the PyTorch ops
    meta = torch.empty(2, 8, device="meta")
    assert not fused_pointwise_applies(meta)


def test_pointwise_kernels_reject_mismatched_inputs():
    from spectra.kernels.pointwise import add_rms_norm, swiglu

    with pytest.raises(ValueError, match="a gain of N values"):
        add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.randn(2, 8), torch.randn(2, 9))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_pointwise_kernels_match_references(dtype):
    from spectra.kernels.pointwise import (
        add_rms_norm,
        add_rms_norm_reference,
        rms_norm,
        rms_norm_reference,
        swiglu,
        swiglu_reference,
    )

    gen = torch.Generator(device="cuda").manual_seed(5)
    ulp = 1e-3 if dtype == torch.float16 else 8e-3
    for rows, n, h in ((1, 3072, 8192), (16, 3072, 8192), (5, 1000, 2731)):
        x = torch.randn(rows, 1, n, device="cuda", generator=gen).to(dtype)
        r = torch.randn(rows, 1, n, device="cuda", generator=gen).to(dtype)
        w = (torch.rand(n, device="cuda", generator=gen) + 0.5).to(dtype)
        total, normed = add_rms_norm(x, r, w, 1e-5)
        want_total, want_normed = add_rms_norm_reference(x, r, w, 1e-5)
        assert torch.equal(total, want_total)
        for got, want in ((normed, want_normed), (rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))):
            assert float(((got.float() - want.float()).abs() / want.float().abs().clamp_min(1)).max()) <= ulp
        gate, up = (torch.randn(rows, 1, 2 * h, device="cuda", generator=gen) * 4).to(dtype).chunk(2, dim=-1)
        got, want = swiglu(gate, up), swiglu_reference(gate, up)
        assert float(((got.float() - want.float()).abs() / want.float().abs().clamp_min(1)).max()) <= ulp


def test_every_residual_add_of_a_gpu_inference_forward_is_fused_into_a_norm(monkeypatch):
    """The MLP's residual add joins the next block's input norm (or the final norm): in GPU inference a block
    runs two add+norm kernels and no separate add, and the logits are those of the plain forward. The fused
    kernels are replaced by their references (counted) so the wiring is checked on the CPU."""
    import spectra.model as model_module
    from spectra.config import ModelConfig
    from spectra.kernels.pointwise import add_rms_norm_reference, rms_norm_reference, swiglu_reference
    from spectra.model import SpectraLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=4,
                      max_seq_len=32)
    model = SpectraLM(cfg).eval()
    for p in model.parameters():  # gains away from 1, so a norm applied to the wrong stream shows
        p.data.add_(torch.randn_like(p) * 0.1)
    tokens = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        want = model(tokens)
    calls = {"add_rms_norm": 0, "rms_norm": 0}

    def counted(name, fn):
        def call(*args):
            calls[name] += 1
            return fn(*args)
        return call

    monkeypatch.setattr(model_module, "fused_pointwise_applies", lambda x, weight=None: not torch.is_grad_enabled())
    monkeypatch.setattr(model_module, "add_rms_norm", counted("add_rms_norm", add_rms_norm_reference))
    monkeypatch.setattr(model_module, "rms_norm", counted("rms_norm", rms_norm_reference))
    monkeypatch.setattr(model_module, "swiglu", swiglu_reference)
    with torch.no_grad():
        got = model(tokens)
    assert calls == {"add_rms_norm": 2 * cfg.num_layers, "rms_norm": 1}
    torch.testing.assert_close(got, want, rtol=0, atol=0)
