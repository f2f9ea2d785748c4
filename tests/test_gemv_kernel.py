"""The CUDA-core GEMV kernel (tq_triton.tq_gemv_kernel): interpreter runs against the reference (CI), the
config rules that decide where it runs, and GPU tests (marked `gpu`): odd shapes and dtypes, and greedy decoding
of a model whose every decode product runs it under programmatic dependent launch."""

from __future__ import annotations

import textwrap
from functools import partial

import pytest
import torch
from kernel_support import poisoned_launch_error, run_in_interpreter, tolerance

from spectra.formats import get_format
from spectra.kernels import configs, dispatch, ternary_matmul_reference

triton = pytest.importorskip("triton")


# The CUDA-core GEMV kernel: the int64 activation loads (rows of 128 bytes, no masks), a plane whose padding
# columns pass k (611: value-by-value loads for that plane only), a partial last step (713, TQ1 rows of 144
# bytes), fp32 activations (never int64 loads), split-k, every scale mode.
_INTERPRETER_GEMV_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from spectra.formats import get_format
    from spectra.kernels import configs, dispatch, launch_support, ternary_matmul_reference
    torch.manual_seed(2)
    K = configs.KernelConfig
    cases = [
        ("tq2", 23, 512, torch.float16, 1, (1, 0), K("gemv", 1, 16, 64, 2, 4, 1)),
        ("tq2", 23, 512, torch.float16, 2, (3, 0), K("gemv", 1, 8, 64, 1, 4, 2)),
        ("tq1", 23, 640, torch.float16, 1, (2, 1), K("gemv", 1, 16, 64, 1, 4, 1)),
        ("tq1", 23, 640, torch.float32, 3, (1, 0), K("gemv", 1, 8, 32, 3, 4, 1)),
        ("tq2", 19, 611, torch.float16, 1, (2, 0), K("gemv", 1, 16, 32, 2, 4, 1)),
        ("tq2", 19, 611, torch.float32, 2, (3, 1), K("gemv", 1, 8, 32, 1, 4, 1)),
        ("tq1", 21, 713, torch.float16, 1, (1, 0), K("gemv", 1, 16, 64, 2, 4, 1)),
        ("tq1", 21, 713, torch.float16, 2, (3, 0), K("gemv", 1, 32, 16, 1, 4, 2)),
    ]
    failures = []
    for fmt, n, k, dtype, m, (p, axis), cfg in cases:
        packed = get_format(fmt).pack(torch.randint(-1, 2, (n, k), dtype=torch.int8))
        x = torch.randn(m, k).to(dtype)
        scales = torch.rand(p) + 0.5
        y = torch.full((m, n), float("nan"), dtype=dtype)
        dispatch.launch_gemv(x, packed, fmt, k, scales, axis, cfg, out=y)
        ref = ternary_matmul_reference(x.float(), packed, fmt, k, scales, axis)
        err = float((y.float() - ref).norm() / ref.norm())
        if not err < (1e-5 if dtype == torch.float32 else 2e-3):
            failures.append(f"{fmt} {n}x{k} m={m} P={p} axis={axis} {dtype} {cfg} rel={err:.3e}")
    ws, cnt = launch_support.WORKSPACE.buffers[torch.device("cpu")]
    if int(cnt.abs().max()) != 0:
        failures.append("split-k arrival counters not left zeroed")
    cases = len(cases)
""")


def test_gemv_kernel_in_interpreter_matches_reference():
    assert "cases=8" in run_in_interpreter(_INTERPRETER_GEMV_SCRIPT)


def test_gemv_paths_the_interpreter_cases_take():
    # the cases above reach each activation path: whole planes by int64, a masked plane, masked steps
    q = get_format("tq2").row_bytes(512)
    assert dispatch.gemv_args("tq2", configs.KernelConfig("gemv", 1, 16, 64, 2), 1, 23, 512, q, 0, 0)["MASK_C"] is False
    assert dispatch.gemv_args("tq2", configs.KernelConfig("gemv", 1, 16, 64, 2), 1, 23, 512, q, 0, 0)["PLANE_MASK"] == 0
    q = get_format("tq2").row_bytes(611)
    args = dispatch.gemv_args("tq2", configs.KernelConfig("gemv", 1, 16, 32, 2), 1, 19, 611, q, 0, 0)
    assert args["MASK_C"] is False and args["PLANE_MASK"] == 8
    q = get_format("tq1").row_bytes(713)
    assert dispatch.gemv_args("tq1", configs.KernelConfig("gemv", 1, 16, 64, 2), 1, 21, 713, q, 0, 0)["MASK_C"]
    assert dispatch.x_vec_aligned(torch.zeros(2, 512, dtype=torch.float16))
    assert not dispatch.x_vec_aligned(torch.zeros(2, 515, dtype=torch.float16)[:, :512])
    assert not dispatch.x_vec_aligned(torch.zeros(2, 512))


def test_gemv_entries_serve_small_m_only_and_misaligned_weights_fall_back(monkeypatch):
    gemv = configs.KernelConfig("gemv", 1, 32, 256, 2, 4, 1)
    table = {configs.config_key("tq2", 64, 512, 1, torch.float16, 0, "GPU"): gemv.__dict__}
    monkeypatch.setattr(configs, "_table", table)
    monkeypatch.setattr(configs, "gpu_name", lambda device: "GPU")
    monkeypatch.setattr(configs, "num_sms", lambda device: 132)
    dev = torch.device("cuda")
    assert configs.lookup_config("tq2", 64, 512, 1, torch.float16, 0, dev, gluon=False) == gemv
    assert configs.lookup_config("tq2", 64, 512, 2, torch.float16, 0, dev, gluon=False) == gemv  # borrowed
    assert configs.lookup_config("tq2", 64, 512, 4, torch.float16, 0, dev, gluon=False).kind == "tc"
    assert all(c.kind != "gemv" for c in configs.candidate_configs(64, 512, 4, "tq2", 132))
    assert any(c.kind == "gemv" for c in configs.candidate_configs(64, 512, 1, "tq2", 132))
    packed = torch.zeros(4, 129, dtype=torch.uint8)[:, 1:]
    assert not dispatch.gemv_usable(packed)
    assert dispatch.gemv_usable(torch.zeros(4, 128, dtype=torch.uint8))



@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
def test_gpu_gemv_kernel_poisoned_outputs(fmt):
    # the CUDA-core GEMV kernel: odd shapes, fp16 and bf16, every scale mode, split-k, partial last steps,
    # int64 activation loads and value-by-value ones (a row stride that is not a multiple of 4)
    gen = torch.Generator(device="cuda").manual_seed(17)
    K = configs.KernelConfig
    cfgs = [K("gemv", 1, 16, 128, 1, 4, 1), K("gemv", 1, 64, 256, 3, 4, 2), K("gemv", 1, 32, 64, 8, 4, 1)]
    cases = [(1, torch.float16, (1, 0), cfgs), (3, torch.bfloat16, (3, 0), cfgs[1:2]),
             (4, torch.float16, (2, 1), cfgs[2:]), (2, torch.float16, (1, 0), cfgs[:1])]
    for n, k in ((1, 16), (37, 77), (130, 999), (1000, 3001), (515, 8192), (3072, 3072)):
        packed = get_format(fmt).pack(torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda", generator=gen))
        for m, dtype, (p, axis), chosen in cases:
            if p > (n, k)[axis]:
                continue
            scales = torch.rand(p, device="cuda", generator=gen) + 0.5
            for cfg in chosen:
                x = torch.randn(m, k + (1 if m == 2 else 0), dtype=dtype, device="cuda", generator=gen)[:, :k]
                err = poisoned_launch_error(partial(dispatch.launch_gemv, x, packed, fmt, k, scales, axis, cfg),
                                            x, packed, fmt, k, scales, axis)
                assert err < tolerance(dtype), (n, k, m, p, axis, cfg, err)



@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
def test_gpu_gemv_decode_with_pdl_greedy_tokens_equal_reference_path(monkeypatch, fmt):
    # every decode product (m = 1) on the GEMV kernel, launched with programmatic dependent launch where the GPU
    # has it (its weight loads start before the previous kernel ends), fused projections, in a CUDA graph
    from spectra import convert as convert_mod
    from spectra import model as model_mod
    from spectra import packed as packed_mod
    from spectra.config import get_config
    from spectra.generate import generate, generate_cuda_graph
    from spectra.kernels import plans
    from spectra.model import SpectraLM

    lookup = configs.lookup_config
    gemv = configs.KernelConfig("gemv", 1, 16, 64, 2, 4, 1)
    monkeypatch.setattr(configs, "lookup_config", lambda fmt_, n, k, m, *a, **kw: gemv if m == 1 else
                        lookup(fmt_, n, k, m, *a, **kw))
    plans.clear_plans()
    torch.manual_seed(0)
    model = SpectraLM(get_config("mini", weight_kind="ternary")).cuda().float().eval()
    convert_mod.pack_model(model, fmt)
    model = model.half()
    model.fuse_projections()
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    fast = generate_cuda_graph(model, prompt, max_new_tokens=24, temperature=0)
    assert any(p.cfg.kind == "gemv" for p in plans._plans.values())
    monkeypatch.setattr(packed_mod, "ternary_matmul", ternary_matmul_reference)
    monkeypatch.setattr(model_mod, "uses_decode_kernel", lambda *args: False)
    ref = generate(model, prompt, max_new_tokens=24, temperature=0, fast=False)
    plans.clear_plans()
    assert torch.equal(fast.cpu(), ref.cpu())



def test_probe_helpers_check_before_timing_and_format_rows():
    from spectra.kernels import timing

    gen = torch.Generator().manual_seed(3)
    packed = get_format("tq2").pack(torch.randint(-1, 2, (6, 40), dtype=torch.int8, generator=gen))
    s = torch.tensor([0.7])
    x = torch.randn(2, 40, generator=gen)
    exact = ternary_matmul_reference(x, packed, "tq2", 40, s, 0)
    assert timing.reference_error(x, packed, "tq2", 40, s, exact) < 1e-6
    assert timing.reference_error(x, packed, "tq2", 40, s, exact * 1.1) > 0.05
    lines = []

    def broken(xx, p, out=None):
        raise RuntimeError("out of resources")

    def wrong(xx, p, out=None):
        out.copy_(ternary_matmul_reference(xx, p, "tq2", 40, s, 0) + 1.0)

    assert timing.time_checked(broken, x, [packed], "tq2", s, gen, lines.append, "v1") is None
    assert timing.time_checked(wrong, x, [packed], "tq2", s, gen, lines.append, "v2") is None
    assert "v1: FAILED RuntimeError: out of resources" in lines[0] and "v2: WRONG" in lines[1]
    row = timing.layer_table_row("70b", 1, 600e-6, [130e-6, 150e-6])
    assert row == "| 70b | 1 | 600.0 | 130.0 (4.62x) | 150.0 (4.00x) |"
