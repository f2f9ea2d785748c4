"""Decode products with the norm, SwiGLU and residual add in their kernel (kernels.ternary_matmul_fused, the
GEMV kernel's fused epilogue) and the model's decode step through them (DecoderLayer.fused_step): interpreter
runs against the reference composition (CI), the model's five-kernel block against its usual path on the CPU,
and GPU tests (marked `gpu`)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_support import run_in_interpreter, tolerance

import spectra.kernels as kernels
from spectra.formats import get_format
from spectra.kernels import ternary_matmul_fused, ternary_matmul_fused_reference

# Every fusion the model uses (norm; norm + SwiGLU; residual; residual + gain), with and without split-k (whose
# last program runs the epilogue), odd row counts (a SwiGLU half of 23 rows: a program's pairs past it), TQ1
# and TQ2, both scale modes on rows, column-shard scales (applied to x first), m = 1 and 2.
_INTERPRETER_FUSED_SCRIPT = textwrap.dedent("""
    import torch
    from spectra.formats import get_format
    from spectra.kernels import configs, launch_support, plans, ternary_matmul_fused_reference
    torch.manual_seed(3)
    K = configs.KernelConfig
    F = plans.Fusion
    cases = [
        ("tq2", 46, 512, 1, (1, 0), K("gemv", 1, 16, 64, 1, 4, 1), F(norm=True, eps=1e-5)),
        ("tq2", 46, 512, 2, (3, 0), K("gemv", 1, 16, 64, 2, 4, 1), F(norm=True, eps=1e-5)),
        ("tq2", 46, 512, 1, (2, 0), K("gemv", 1, 16, 64, 1, 4, 1), F(norm=True, swiglu=True, eps=1e-6)),
        ("tq1", 46, 640, 2, (1, 0), K("gemv", 1, 8, 64, 2, 4, 1), F(norm=True, swiglu=True, eps=1e-6)),
        ("tq2", 37, 611, 1, (2, 1), K("gemv", 1, 16, 32, 2, 4, 1), F(residual=True)),
        ("tq2", 37, 512, 2, (1, 0), K("gemv", 1, 16, 64, 3, 4, 1), F(residual=True, gain=True)),
        ("tq1", 21, 713, 1, (3, 1), K("gemv", 1, 32, 16, 1, 4, 2), F(residual=True, gain=True)),
        # the tensor-core kernel (batch decode): row pairs inside a 64-row tile, activation rows past m
        ("tq2", 46, 512, 3, (2, 0), K("tc", 16, 64, 64, 1, 4, 2), F(norm=True, swiglu=True, eps=1e-6)),
        ("tq1", 90, 640, 16, (1, 0), K("tc", 16, 64, 64, 2, 4, 2), F(norm=True, swiglu=True, eps=1e-6)),
        ("tq2", 70, 512, 5, (3, 0), K("tc", 16, 64, 32, 3, 4, 2), F(norm=True, eps=1e-5)),
        ("tq2", 37, 611, 2, (2, 1), K("tc", 16, 64, 64, 2, 4, 2), F(residual=True, gain=True)),
        ("tq1", 21, 713, 9, (1, 0), K("tc", 16, 64, 64, 1, 4, 2), F(residual=True)),
    ]
    failures = []
    for fmt, n, k, m, (p, axis), cfg, fusion in cases:
        configs.fused_config = lambda *a, cfg=cfg: cfg
        packed = get_format(fmt).pack(torch.randint(-1, 2, (n, k), dtype=torch.int8))
        rows = (torch.randn(m, k) * 3).half()
        gain_in = (torch.rand(k) + 0.5).half()
        x = (rows * gain_in) if fusion.norm else torch.randn(m, k).half()
        scales = torch.rand(p) * 0.02 + 0.01
        n_out = n // 2 if fusion.swiglu else n
        residual = torch.randn(m, n_out).half() if fusion.residual else None
        gain = (torch.rand(n_out) + 0.5).half() if fusion.gain else None
        norm_of = rows if fusion.norm else None
        plan = plans.build_plan(x, packed, fmt, k, scales, axis, fusion)
        got = plan.fused(x, packed, scales, norm_of, residual, gain)
        ref = ternary_matmul_fused_reference(x, packed, fmt, k, scales, axis, norm_of=norm_of, eps=fusion.eps,
                                             swiglu=fusion.swiglu, residual=residual, gain=gain)
        got = got if isinstance(got, tuple) else (got,)
        ref = ref if isinstance(ref, tuple) else (ref,)
        for g, r in zip(got, ref):
            err = float((g.float() - r.float()).norm() / r.float().norm())
            if g.shape != r.shape or not err < 2e-3:
                failures.append(f"{fmt} {n}x{k} m={m} P={p} axis={axis} {cfg} {fusion}: {tuple(g.shape)} rel={err:.3e}")
    ws, cnt = launch_support.WORKSPACE.buffers[torch.device("cpu")]
    if int(cnt.abs().max()) != 0:
        failures.append("split-k arrival counters not left zeroed")
    cases = len(cases)
""")


def test_fused_gemv_epilogues_in_interpreter_match_reference():
    pytest.importorskip("triton")
    assert "cases=12" in run_in_interpreter(_INTERPRETER_FUSED_SCRIPT)


def test_fused_reference_is_the_separate_operations():
    """The reference composition equals the model's own ops (RMSNorm, silu * up, residual add) up to the one
    rounding it skips: the normalised row's, before the product."""
    from spectra.kernels.pointwise import add_rms_norm_reference, rms_norm_reference, swiglu_reference

    torch.manual_seed(0)
    k, inter = 64, 24
    fmt = "tq2"
    w_qkv = get_format(fmt).pack(torch.randint(-1, 2, (2 * inter, k), dtype=torch.int8))
    scales = torch.tensor([0.03])
    x = torch.randn(2, k) * 4
    gain = torch.rand(k) + 0.5
    fused = ternary_matmul_fused_reference(x * gain, w_qkv, fmt, k, scales, 0, norm_of=x, eps=1e-5, swiglu=True)
    h = rms_norm_reference(x, gain, 1e-5)
    gate, up = kernels.ternary_matmul_reference(h, w_qkv, fmt, k, scales, 0).chunk(2, dim=-1)
    torch.testing.assert_close(fused, swiglu_reference(gate, up), rtol=1e-5, atol=1e-6)
    res = torch.randn(2, 2 * inter)
    total, total_gained = ternary_matmul_fused_reference(h, w_qkv, fmt, k, scales, 0, residual=res,
                                                         gain=torch.full((2 * inter,), 2.0))
    expected, _ = add_rms_norm_reference(kernels.ternary_matmul_reference(h, w_qkv, fmt, k, scales, 0), res,
                                         torch.ones(2 * inter), 1e-5)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(total_gained, 2 * expected)


@pytest.mark.parametrize("bad, message", [
    (dict(norm_of=torch.zeros(1, 32)), "norm_of must be"),
    (dict(residual=torch.zeros(1, 7)), "residual must be"),
    (dict(residual=torch.zeros(1, 8), gain=torch.zeros(3)), "gain must"),
    (dict(gain=torch.zeros(8)), "gain must come with a residual"),
])
def test_fused_matmul_refuses_mismatched_rows(bad, message):
    packed = get_format("tq2").pack(torch.randint(-1, 2, (8, 64), dtype=torch.int8))
    with pytest.raises(ValueError, match=message):
        ternary_matmul_fused(torch.randn(1, 64), packed, "tq2", 64, torch.ones(1), 0, **bad)
    with pytest.raises(ValueError, match="even count"):
        ternary_matmul_fused(torch.randn(1, 64), packed[:7], "tq2", 64, torch.ones(1), 0, swiglu=True)


def test_fused_config_takes_a_kernel_with_the_epilogue_or_none(monkeypatch):
    """A tuned GEMV, streaming or tensor-core entry is used as it is; where the tuned entry is the wgmma Gluon
    kernel (no fused epilogue), the m = 1 bucket's streaming entry up to m = 8, else the portable kernel's entry;
    past m = 16 none (and fused_matmul_applies says no)."""
    from spectra.kernels import configs, gluon_launch

    K = configs.KernelConfig
    gemv, stream, tc = K("gemv", 1, 32, 256, 2, 4, 1), K("stream", 8, 64, 64, 4, 4), K("tc", 16, 64, 64, 4, 4, 3)
    wgmma = K("gluon", 8, 64, 64, 4, 4)
    key = configs.config_key
    g = configs.GLUON_KEY_SUFFIX
    table = {key("tq2", 640, 512, 1, torch.float16, 0, "GPU"): gemv.__dict__,
             key("tq1", 3072, 9216, 1, torch.float16, 0, "GPU"): tc.__dict__,
             key("tq1", 3072, 3072, 1, torch.float16, 0, "GPU") + g: stream.__dict__,
             key("tq1", 3072, 3072, 2, torch.float16, 0, "GPU") + g: wgmma.__dict__,
             key("tq1", 3072, 3072, 2, torch.float16, 0, "GPU"): tc.__dict__,
             key("tq1", 3072, 3072, 16, torch.float16, 0, "GPU") + g: wgmma.__dict__,
             key("tq1", 3072, 3072, 16, torch.float16, 0, "GPU"): tc.__dict__}
    monkeypatch.setattr(configs, "_table", table)
    monkeypatch.setattr(configs, "gpu_name", lambda device: "GPU")
    monkeypatch.setattr(configs, "num_sms", lambda device: 132)
    monkeypatch.setattr(gluon_launch, "runs", lambda kind, device, m, k, dtype: kind != "gluon" or m <= 16)
    configs.clear_fused_memo()
    dev = torch.device("cuda")
    try:
        assert configs.fused_config("tq2", 640, 512, 1, torch.float16, 0, dev) == gemv
        assert configs.fused_config("tq1", 3072, 9216, 1, torch.float16, 0, dev) == tc
        assert configs.fused_config("tq1", 3072, 3072, 1, torch.float16, 0, dev) == stream
        assert configs.fused_config("tq1", 3072, 3072, 2, torch.float16, 0, dev) == stream  # the m = 1 entry
        assert configs.fused_config("tq1", 3072, 3072, 2, torch.float16, 0, dev, gluon=False) == tc
        assert configs.fused_config("tq1", 3072, 3072, 16, torch.float16, 0, dev) == tc  # past the stream tile
        assert configs.fused_config("tq1", 3072, 3072, 32, torch.float16, 0, dev) is None
    finally:
        configs.clear_fused_memo()


@pytest.mark.parametrize("portable", [None, "stream"])
def test_fused_plan_without_a_kernel_computes_the_separate_operations(monkeypatch, portable):
    """Where the streaming kernel was chosen but cannot run (a failed Gluon compile) and no portable kernel with
    the epilogue is offered, the fused plan computes the reference composition (never an unfused plan)."""
    from spectra.kernels import configs, plans

    stream = configs.KernelConfig("stream", 8, 64, 64, 1, 4)
    monkeypatch.setattr(configs, "fused_config", lambda *a, gluon=True: stream if gluon or portable else None)
    torch.manual_seed(4)
    packed = get_format("tq1").pack(torch.randint(-1, 2, (24, 64), dtype=torch.int8))
    rows, gain = torch.randn(1, 64), torch.rand(64) + 0.5
    fusion = plans.Fusion(norm=True, swiglu=True, eps=1e-5)
    plan = plans.build_plan(rows * gain, packed, "tq1", 64, torch.tensor([0.02]), 0, fusion)
    assert plan.main is None
    got = plan.fused(rows * gain, packed, torch.tensor([0.02]), rows, None, None)
    ref = ternary_matmul_fused_reference(rows * gain, packed, "tq1", 64, torch.tensor([0.02]), 0, norm_of=rows,
                                         eps=1e-5, swiglu=True)
    torch.testing.assert_close(got, ref)


def _packed_model(fmt: str = "tq2", dtype=torch.float32, device="cpu", layers: int = 2):
    from spectra.config import get_config
    from spectra.convert import pack_model
    from spectra.model import SpectraLM

    torch.manual_seed(0)
    cfg = get_config("tiny", weight_kind="ternary", num_layers=layers, model_parallel_size=2)
    model = SpectraLM(cfg).eval()
    with torch.no_grad():
        for norm in [m for name, m in model.named_modules() if name.endswith("norm")]:
            norm.weight.uniform_(0.5, 1.5)  # gains that are not all ones: each must reach its product
    pack_model(model, fmt)
    model.fuse_projections()
    return model.to(device=device, dtype=dtype)


def test_model_decode_step_through_fused_blocks_equals_usual_path(monkeypatch):
    """On the CPU the fused step runs as the reference composition (the plumbing: which gain, norm and residual
    reaches which product, the first block's gained input, the last block's final norm): its logits equal the
    usual path's over a few steps, and it is the path taken."""
    import spectra.model as model_module
    from spectra.packed import PackedTernaryLinear

    model = _packed_model()
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))

    def decode(fused: bool) -> torch.Tensor:
        monkeypatch.setattr(PackedTernaryLinear, "fuses", lambda self, x: fused)
        monkeypatch.setattr(model_module, "uses_decode_kernel", lambda t, device, pos: t == 1 and pos is not None)
        monkeypatch.setattr(model_module.Attention, "step_attention", _cpu_step_attention)
        model.setup_cache(2, 16)
        with torch.no_grad():
            model(prompt, input_pos=torch.arange(5))
            out = [model(prompt[:, i:i + 1], input_pos=torch.tensor([5 + i])) for i in range(3)]
        model.clear_cache()
        return torch.cat(out, 1)

    calls = []
    real = model_module.DecoderLayer.fused_step
    monkeypatch.setattr(model_module.DecoderLayer, "fused_step",
                        lambda self, *a: calls.append(1) or real(self, *a))
    usual = decode(False)
    assert not calls
    fused = decode(True)
    assert len(calls) == 3 * len(model.model.layers)
    torch.testing.assert_close(fused, usual, rtol=1e-4, atol=1e-4)


def _cpu_step_attention(self, q, k, v, cos, sin, pos):
    """The decode kernel's job in PyTorch ops, for the CPU (rotary as the model applies it, cache write, attention
    over the filled positions)."""
    from spectra.ternary import apply_rope_signed, signed_sines

    b, t, _ = q.shape
    q, k, v = (y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
    sin = signed_sines(sin)
    q, k = apply_rope_signed(q, cos, sin), apply_rope_signed(k, cos, sin)
    length = int(pos.max()) + 1
    keys, values = self.cache.update(pos, k, v, length)
    y = torch.nn.functional.scaled_dot_product_attention(q, keys, values)
    return y.transpose(1, 2).reshape(b, t, -1)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, dtype", [("tq2", torch.float16), ("tq1", torch.float16), ("tq2", torch.bfloat16)])
def test_gpu_fused_products_match_reference(fmt, dtype):
    """Every fusion on every kernel with the epilogue (split-k or not; odd shapes; the three scale modes, one per
    fusion; the m each kernel serves), and the 3.9B decode products with the config the dispatcher picks, poisoned
    outputs, against the fp32 reference composition."""
    from spectra.kernels import configs, plans

    torch.manual_seed(1)
    dev = torch.device("cuda")
    K = configs.KernelConfig
    norm, norm_swiglu = plans.Fusion(norm=True, eps=1e-5), plans.Fusion(norm=True, swiglu=True, eps=1e-6)
    residual, residual_gain = plans.Fusion(residual=True), plans.Fusion(residual=True, gain=True)
    fusions = [(norm, (3, 0)), (norm_swiglu, (2, 0)), (residual, (2, 1)), (residual_gain, (1, 0))]
    kernels_ms = [(K("tc", 16, 64, 64, 1, 4, 3), (3,)), (K("tc", 16, 64, 64, 4, 4, 3), (16,)),
                  (K("gemv", 1, 16, 256, 1, 4, 1), (1,)), (K("gemv", 1, 16, 256, 3, 4, 1), (2,)),
                  (K("stream", 8, 64, 64, 1, 4), (1,)), (K("stream", 8, 128, 64, 3, 8), (5,))]
    for n, k in [(46, 512), (774, 1000)]:
        packed = get_format(fmt).pack(torch.randint(-1, 2, (n, k), dtype=torch.int8)).to(dev)
        for cfg, ms in kernels_ms:
            if cfg.kind == "stream" and k % 16:
                continue  # the streaming kernel's shapes: k a multiple of 16
            for m in ms:
                for fusion, (p, axis) in fusions:
                    _check_gpu_fused(fmt, n, k, m, dtype, dev, packed, fusion, cfg, p, axis)
    for (n, k), fusion in zip(configs_shapes_39b(), (norm, residual_gain, norm_swiglu, residual_gain)):
        packed = get_format(fmt).pack(torch.randint(-1, 2, (n, k), dtype=torch.int8)).to(dev)
        cfg = configs.fused_config(fmt, n, k, 1, dtype, 1, dev)
        if cfg is not None:
            _check_gpu_fused(fmt, n, k, 1, dtype, dev, packed, fusion, cfg, 6, 0)


def configs_shapes_39b() -> list[tuple[int, int]]:
    """(out, in) of a 3.9B block's fused decode products: q/k/v, o, gate/up, down."""
    from spectra.block import fused_shapes
    from spectra.config import get_config

    return fused_shapes(get_config("3.9B"))


def _check_gpu_fused(fmt, n, k, m, dtype, dev, packed, fusion, cfg, p, axis):
    from spectra.kernels import configs, plans

    rows = (torch.randn(m, k, device=dev) * 3).to(dtype)
    gain_in = (torch.rand(k, device=dev) + 0.5).to(dtype)
    x = (rows * gain_in) if fusion.norm else torch.randn(m, k, device=dev).to(dtype)
    scales = torch.rand(p, device=dev) * 0.02 + 0.01
    n_out = n // 2 if fusion.swiglu else n
    residual = torch.randn(m, n_out, device=dev).to(dtype) if fusion.residual else None
    gain = (torch.rand(n_out, device=dev) + 0.5).to(dtype) if fusion.gain else None
    norm_of = rows if fusion.norm else None
    real = configs.fused_config
    configs.fused_config = lambda *a, **kw: cfg
    try:
        plan = plans.build_plan(x, packed, fmt, k, scales, axis, fusion)
    finally:
        configs.fused_config = real
    assert plan.cfg == cfg  # the kernel asked for ran (a Gluon compile failure would fall back)
    poison = torch.full((1 << 22,), float("nan"), dtype=dtype, device=dev)  # freed: the outputs reuse NaN memory
    del poison
    got = plan.fused(x, packed, scales, norm_of, residual, gain)
    ref = ternary_matmul_fused_reference(x.float(), packed, fmt, k, scales, axis,
                                         norm_of=None if norm_of is None else norm_of.float(), eps=fusion.eps,
                                         swiglu=fusion.swiglu, residual=None if residual is None else residual.float(),
                                         gain=None if gain is None else gain.float())
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for g, r in zip(got, ref, strict=True):
        err = float((g.float() - r.float()).norm() / r.float().norm())
        assert g.shape == r.shape and err < 2 * tolerance(dtype), (fmt, n, k, m, dtype, fusion, cfg, p, axis, err)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
def test_gpu_fused_decode_greedy_tokens_equal_unfused_path(monkeypatch, fmt):
    """A packed model's greedy tokens with the fused decode step (batch 1, 2, 16, in a CUDA graph under PDL) equal
    those with SPECTRA_FUSED_DECODE's switch off, and the fused step is what ran."""
    import spectra.model as model_module
    from spectra.generate import generate, release_decode_step

    model = _packed_model(fmt, torch.float16, "cuda", layers=3)
    calls = []
    real = model_module.DecoderLayer.fused_step
    monkeypatch.setattr(model_module.DecoderLayer, "fused_step", lambda self, *a: calls.append(1) or real(self, *a))
    for batch in (1, 2, 16):
        prompt = torch.randint(0, model.config.vocab_size, (batch, 7), device="cuda")
        monkeypatch.setattr(kernels, "FUSED_DECODE", False)
        plain = generate(model, prompt, max_new_tokens=24, temperature=0)
        release_decode_step(model)
        assert not calls
        monkeypatch.setattr(kernels, "FUSED_DECODE", True)
        fused = generate(model, prompt, max_new_tokens=24, temperature=0)
        release_decode_step(model)
        assert calls
        calls.clear()
        assert torch.equal(fused, plain)
        # the logits themselves, step by step along the same tokens (eager decode steps, no graph)
        logits = {}
        for on in (False, True):
            monkeypatch.setattr(kernels, "FUSED_DECODE", on)
            model.setup_cache(batch, 64)
            with torch.no_grad():
                model.prefill(plain[:, :7])
                logits[on] = torch.cat([model(plain[:, i:i + 1], input_pos=torch.tensor([i], device="cuda"))
                                        for i in range(7, 20)], 1).float()
            model.clear_cache()
        err = float((logits[True] - logits[False]).norm() / logits[False].norm())
        assert err < 1e-2, err


def test_split_k_workspaces_hold_a_slot_per_program_row(monkeypatch):
    """The split-k kernels index their fp32 slots by program row (programs x rows per program, which passes n
    where n is not a multiple, and with SWIGLU): every launcher asks for that many per split and activation
    row."""
    from spectra.kernels import configs, dispatch, gluon_launch, launch_support, plans

    asked = []
    real = launch_support.WORKSPACE.get
    monkeypatch.setattr(launch_support.WORKSPACE, "get", lambda dev, numel, tiles: asked.append(numel) or
                        real(dev, numel, tiles))
    n, k, m = 70, 512, 2
    packed = get_format("tq2").pack(torch.randint(-1, 2, (n, k), dtype=torch.int8))
    x, y, s = torch.randn(m, k).half(), torch.empty(m, n).half(), torch.ones(1)
    grid, _, _ = gluon_launch.launch_args(x, packed, "tq2", s, 0, 8, 4, y)
    assert asked[-1] >= grid[1] * m * grid[0] * gluon_launch.BN and grid[0] * gluon_launch.BN > n
    for fusion in (None, plans.Fusion(swiglu=True)):
        grid, _, _ = gluon_launch.stream_launch_args(x, packed, "tq2", s, 0, 4, 4, y, fusion=fusion)
        assert asked[-1] >= grid[1] * m * grid[0] * 64
    cfg = configs.KernelConfig("gemv", 1, 16, 64, 3, 4, 1)
    grid, _ = dispatch.gemv_grid(m, n, packed.shape[1], cfg, swiglu=True)
    assert dispatch.workspace_slots(grid, m, cfg) == grid[2] * m * grid[1] * 16 > grid[2] * m * n
