"""Launch plans of ternary_matmul (spectra/kernels/plans.py): built once per call signature, rebuilt when
anything a launch depends on changes; the plan's launches compute the reference result (interpreter)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_support import run_in_interpreter

from spectra.formats import get_format
from spectra.kernels import clear_config_memo, launch_support, plans


def _inputs(m=3, n=5, k=40, dtype=torch.float16, p=1):
    packed = get_format("tq2").pack(torch.randint(-1, 2, (n, k), dtype=torch.int8))
    return torch.randn(m, k).to(dtype), packed, torch.rand(p) + 0.5


def test_plan_is_built_once_per_signature_and_rebuilt_when_it_changes(monkeypatch):
    built = []

    def builder(x, packed, fmt, k, scales, axis):
        built.append((tuple(x.shape), x.dtype, scales.numel(), axis))
        return object()

    plans.clear_plans()
    x, packed, s = _inputs()
    first = plans.get_plan(x, packed, "tq2", 40, s, 0, builder)
    # same signature with fresh tensors: a hit
    x2, packed2, s2 = _inputs()
    assert plans.get_plan(x2, packed2, "tq2", 40, s2, 0, builder) is first
    assert len(built) == 1
    # every change of what the launch depends on is a miss
    plans.get_plan(x.to(torch.bfloat16), packed, "tq2", 40, s, 0, builder)           # dtype
    plans.get_plan(torch.randn(7, 40, dtype=torch.float16), packed, "tq2", 40, s, 0, builder)  # m
    plans.get_plan(x.view(1, 3, 40), packed, "tq2", 40, s, 0, builder)               # rank
    plans.get_plan(x, packed, "tq2", 40, torch.rand(2) + 0.5, 0, builder)            # per-shard scales
    plans.get_plan(x, packed, "tq2", 40, torch.rand(2) + 0.5, 1, builder)            # shard axis
    plans.get_plan(torch.randn(40, 3, dtype=torch.float16).t(), packed, "tq2", 40, s, 0, builder)  # strides
    plans.get_plan(torch.randn(3 * 40 + 1, dtype=torch.float16)[1:].view(3, 40), packed, "tq2", 40, s, 0,
                   builder)                                                          # 16-byte alignment
    assert len(built) == 8
    assert plans.get_plan(x, packed, "tq2", 40, s, 0, builder) is first
    # tuning forgets the plans (their configs may have changed)
    clear_config_memo()
    assert plans.get_plan(x, packed, "tq2", 40, s, 0, builder) is not first
    assert len(built) == 9


def test_plan_memo_is_bounded(monkeypatch):
    plans.clear_plans()
    monkeypatch.setattr(plans, "MAX_PLANS", 4)
    packed = _inputs()[1]
    s = torch.ones(1)
    for m in range(1, 11):
        plans.get_plan(torch.randn(m, 40), packed, "tq2", 40, s, 0, lambda *a: object())
        assert len(plans._plans) <= 4
    plans.clear_plans()


def test_plan_validates_on_first_use(monkeypatch):
    from spectra.errors import FormatError

    plans.clear_plans()
    x, packed, s = _inputs()
    try:
        plans.get_plan(x[:, :39], packed, "tq2", 40, s, 0)
    except FormatError as e:
        assert "features" in str(e)
    else:
        raise AssertionError("a wrong activation width was accepted")


# The plans' launches (compiled-kernel fast path on a GPU; the interpreter here) against the reference: split-k,
# stream-K, the CUDA-core GEMV, per-shard scales on both axes, a 3-D and a strided activation, and the dequantize
# path into the cached scratch; each plan called twice (the second call is the cached launch).
_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from spectra.formats import get_format
    from spectra.kernels import configs, plans, ternary_matmul_reference
    torch.manual_seed(0)
    K = configs.KernelConfig
    failures, cases = [], 0
    for cfg in (K("tc", 16, 16, 32, 3, 4, 2), K("sk", 16, 32, 32, 1, 4, 2, 3), K("dequant"),
                K("gemv", 1, 16, 64, 2, 4, 1)):
        configs.lookup_config = lambda *a, cfg=cfg: cfg
        plans.clear_plans()  # plans are cached per call signature: each config builds its own
        for fmt, n, k in (("tq2", 37, 300), ("tq1", 21, 713)):
            packed = get_format(fmt).pack(torch.randint(-1, 2, (n, k), dtype=torch.int8))
            for p, axis, shape in ((1, 0, (3, k)), (3, 0, (2, 2, k)), (2, 1, (5, k)), (1, 0, "strided")):
                scales = torch.rand(p) + 0.5
                for _ in range(2):
                    if shape == "strided":
                        x = torch.randn(4, 2 * k, dtype=torch.float16)[:, ::2]
                    else:
                        x = torch.randn(*shape, dtype=torch.float16)
                    plan = plans.get_plan(x, packed, fmt, k, scales, axis)
                    if plan.cfg != cfg:
                        failures.append(f"{cfg.kind} {fmt} {n}x{k} P={p} axis={axis} {shape}: plan ran {plan.cfg}")
                    y = plan(x, packed, scales)
                    ref = ternary_matmul_reference(x.float(), packed, fmt, k, scales, axis)
                    err = float((y.float() - ref).norm() / ref.norm())
                    cases += 1
                    if not (y.shape == ref.shape and err < 2e-3):
                        failures.append(f"{cfg.kind} {fmt} {n}x{k} P={p} axis={axis} {shape} rel={err:.2e}")
""")


def test_plans_in_interpreter_match_reference():
    assert "cases=64" in run_in_interpreter(_SCRIPT)


def test_gemm_table_eager_columns_report_host_time_per_product():
    from spectra.bench import GemmRow, format_gemm_header, format_gemm_row

    row = GemmRow("3.9b", 1, 100.0, {"tq2": 40.0}, {"tq2": 30_000_000}, 250_000_000,
                  {"fp16": 110.0, "tq2": 80.0})
    header = format_gemm_header(("tq2",), eager=True)
    line = format_gemm_row(row, ("tq2",), products=4)
    assert header.splitlines()[0].count("|") == line.count("|") == header.splitlines()[1].count("|")
    # eager 80 us vs graph 40 us over 4 products: 10 us of host time per call; eager speedup 110 / 80
    assert line.endswith("| 110.0 | 80.0 | 1.38x | 10.0 |")
    assert "eager" not in format_gemm_header(("tq2",))


def test_launch_goes_to_the_compiled_launcher_and_back_to_the_jit_if_its_arguments_changed(monkeypatch):
    calls = []

    class Compiled:
        packed_metadata, function = "meta", "fn"

        def __init__(self, accepts):
            self.accepts = accepts

        def run(self, *args):
            if not self.accepts:
                raise TypeError("launcher signature changed")
            assert args[3] == 7 and args[6:9] == (None, None, None)  # current stream; no hooks installed
            calls.append(("fast", args[9:]))

    class Kernel:
        arg_names = ["x_ptr", "y_ptr", "N", "BLOCK"]

        def __init__(self, accepts):
            self.accepts = accepts

        def __getitem__(self, grid):
            return lambda *args, **opts: calls.append(("jit", args)) or Compiled(self.accepts)

    from triton import knobs

    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    monkeypatch.setattr(launch_support, "DIRECT_LAUNCH_VERIFIED_ON_GPU", True)
    for accepts, want in ((True, ["jit", "fast", "fast"]), (False, ["jit", "jit", "jit"])):
        calls.clear()
        launch = launch_support.Launch(Kernel(accepts), (2, 1, 1), dict(N=5, BLOCK=64), ("x_ptr", "y_ptr"), {})
        for i in range(3):
            launch(f"x{i}", f"y{i}")
        assert [c[0] for c in calls] == want
        assert all(c[1] == (f"x{i}", f"y{i}", 5, 64) for i, c in enumerate(calls))  # arguments in kernel order


def test_launch_keeps_one_launcher_per_specialisation(monkeypatch):
    # launch_support.launch (the pointwise and attention kernels' eager launches): a Launch is reused only where
    # everything Triton specialises on is the same (grid, scalars, options, tensor dtypes and 16-byte alignment);
    # tensors are passed in the kernel's argument order whatever order the call names them in.
    made = []

    class Kernel:
        arg_names = ["x_ptr", "N", "y_ptr", "BLOCK"]
        __name__ = "kernel"

    class Recorder:
        def __init__(self, fn, grid, named, slots, options):
            made.append((grid, dict(named), slots, dict(options)))
            self.calls = []

        def __call__(self, *tensors):
            self.calls.append(tensors)

    monkeypatch.setattr(launch_support, "Launch", Recorder)
    monkeypatch.setattr(launch_support, "_launches", {})
    kernel = Kernel()
    x, y = torch.randn(8), torch.randn(8)
    for _ in range(3):
        launch_support.launch(kernel, (2,), dict(y_ptr=y, x_ptr=x), dict(N=8, BLOCK=16), dict(num_warps=4))
    assert made == [((2, 1, 1), dict(N=8, BLOCK=16), ("y_ptr", "x_ptr"), dict(num_warps=4))]
    (run,) = launch_support._launches.values()
    assert len(run.calls) == 3 and all(c[0] is y and c[1] is x for c in run.calls)
    launch_support.launch(kernel, (2,), dict(y_ptr=y, x_ptr=x), dict(N=9, BLOCK=16), dict(num_warps=4))  # a scalar
    launch_support.launch(kernel, (3,), dict(y_ptr=y, x_ptr=x), dict(N=8, BLOCK=16), dict(num_warps=4))  # the grid
    launch_support.launch(kernel, (2,), dict(y_ptr=y, x_ptr=x), dict(N=8, BLOCK=16), dict(num_warps=8))  # options
    launch_support.launch(kernel, (2,), dict(y_ptr=y[1:], x_ptr=x), dict(N=7, BLOCK=16), dict(num_warps=4))
    launch_support.launch(kernel, (2,), dict(y_ptr=y[1:], x_ptr=x), dict(N=8, BLOCK=16), dict(num_warps=4))  # align
    launch_support.launch(kernel, (2,), dict(y_ptr=y.half(), x_ptr=x), dict(N=8, BLOCK=16), dict(num_warps=4))
    assert len(made) == 7 and len(launch_support._launches) == 7
    with pytest.raises(ValueError, match="needs the arguments"):
        launch_support.launch(kernel, (2,), dict(x_ptr=x), dict(N=8, BLOCK=16), dict(num_warps=4))
    # pdl=True: the kernel's PDL constexpr, and the launch option where PDL is on for the tensors' device
    kernel.arg_names = [*Kernel.arg_names, "PDL"]
    for on in (False, True):
        monkeypatch.setattr(launch_support, "pdl_enabled", lambda device, on=on: on)
        launch_support.launch(kernel, (2,), dict(y_ptr=y, x_ptr=x), dict(N=8, BLOCK=16), dict(num_warps=4), pdl=True)
        assert made[-1][1] == dict(N=8, BLOCK=16, PDL=on)
        assert made[-1][3] == (dict(num_warps=4, launch_pdl=True) if on else dict(num_warps=4))


def test_launch_stays_on_the_jit_until_the_direct_launcher_is_verified(monkeypatch):
    calls = []

    class Kernel:
        arg_names = ["x_ptr", "N"]

        def __getitem__(self, grid):
            class Compiled:
                packed_metadata, function = "meta", "fn"

                def run(self, *args):
                    calls.append("fast")
            return lambda *args, **opts: calls.append("jit") or Compiled()

    monkeypatch.setattr(launch_support, "DIRECT_LAUNCH_VERIFIED_ON_GPU", False)
    monkeypatch.delenv("SPECTRA_DIRECT_LAUNCH", raising=False)
    launch = launch_support.Launch(Kernel(), (1, 1, 1), dict(N=3), ("x_ptr",), {})
    for i in range(3):
        launch(f"x{i}")
    assert calls == ["jit", "jit", "jit"]
    monkeypatch.setenv("SPECTRA_DIRECT_LAUNCH", "1")
    assert launch_support.direct_launch_enabled()
    monkeypatch.setattr(launch_support, "DIRECT_LAUNCH_VERIFIED_ON_GPU", True)
    monkeypatch.setenv("SPECTRA_DIRECT_LAUNCH", "0")
    assert not launch_support.direct_launch_enabled()
    monkeypatch.delenv("SPECTRA_DIRECT_LAUNCH")
    assert launch_support.direct_launch_enabled()


def test_a_call_the_gluon_kernel_cannot_take_gets_the_portable_entry(monkeypatch):
    # 16-byte-misaligned activations on a shape with a Gluon entry: the plan used to keep the Gluon config and
    # launch the portable kernel with its tiles (an 8-wide dot that does not compile)
    from spectra.formats import get_format
    from spectra.kernels import configs, gluon_launch, plans

    gluon_cfg = configs.KernelConfig("gluon", 8, 64, 64, 4)
    portable = configs.KernelConfig("tc", 16, 64, 64, 2, 4, 3)
    # the lookup as on an sm_90 GPU (a CPU device never gets the Gluon entry)
    monkeypatch.setattr(configs, "lookup_config", lambda *a, gluon=True: gluon_cfg if gluon else portable)
    monkeypatch.setattr(configs, "num_sms", lambda device: 132)
    monkeypatch.setattr(gluon_launch, "usable", lambda device, m, dtype: True)
    plans.clear_plans()
    packed = get_format("tq2").pack(torch.randint(-1, 2, (64, 512), dtype=torch.int8))
    x = torch.randn(1, 520, dtype=torch.float16)[:, 1:513]  # starts 2 bytes past an aligned address
    assert x.data_ptr() % 16
    plan = plans.build_plan(x, packed, "tq2", 512, torch.rand(1) + 0.5, 0)
    assert plan.cfg == portable
    plans.clear_plans()
