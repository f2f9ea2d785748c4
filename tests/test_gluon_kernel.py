"""The Hopper Gluon kernel (spectra/kernels/tq_gluon.py): its fallback to the portable kernel (CPU), and its
results against an fp32-accumulated reference on an sm_90 GPU (GPU-marked)."""

from __future__ import annotations

import sys
import warnings
from functools import partial

import pytest
import torch
from kernel_support import fp32_reference, poisoned_launch_error, relative_error, tolerance

from spectra.formats import get_format
from spectra.kernels import configs, dispatch, gluon_launch, plans, ternary_matmul, tuning


@pytest.fixture
def fresh_gluon_state(monkeypatch):
    monkeypatch.setattr(gluon_launch.FALLBACK, "broken", None)
    plans.clear_plans()
    yield
    plans.clear_plans()


def test_import_failure_falls_back_with_one_warning(monkeypatch, fresh_gluon_state):
    monkeypatch.setitem(sys.modules, "spectra.kernels.tq_gluon", None)  # "import tq_gluon" raises ImportError
    # ... also after an earlier test imported it: "from . import tq_gluon" finds the package attribute first
    monkeypatch.delattr(sys.modules["spectra.kernels"], "tq_gluon", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert not gluon_launch.available()
        assert not gluon_launch.available()
        cfg = dispatch.portable_config(configs.KernelConfig("gluon", 8, 64, 64, 4), "tq2", 3072, 3072, 1,
                                       torch.device("cpu"))
    assert cfg.kind == "tc"
    assert len([w for w in seen if "Gluon" in str(w.message)]) == 1


def test_spectra_gluon_0_turns_the_kernel_off(monkeypatch, fresh_gluon_state, recwarn):
    monkeypatch.setenv("SPECTRA_GLUON", "0")
    assert not gluon_launch.available()
    assert gluon_launch.FALLBACK.broken is None and not recwarn.list  # a switch, not a failure: no warning


def test_compile_failure_falls_back_to_the_portable_kernel_with_one_warning(monkeypatch, fresh_gluon_state):
    # a Triton whose Gluon cannot compile the kernel (API change): the plan runs the portable kernel instead
    monkeypatch.setattr(gluon_launch, "usable", lambda device, m, dtype: gluon_launch.available())
    monkeypatch.setattr(configs, "lookup_config", lambda *a, gluon=True: configs.KernelConfig("gluon", 8, 64, 64, 2)
                        if gluon else configs.KernelConfig("tc", 16, 64, 64, 1, 4, 3))

    def broken_compile(self, *tensors):
        raise RuntimeError("simulated: PassManager::run failed")

    monkeypatch.setattr(plans.Launch, "compile", broken_compile)
    packed = get_format("tq2").pack(torch.randint(-1, 2, (70, 300), dtype=torch.int8))
    s = torch.ones(1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for m in (1, 3, 5):  # three plans: the first compile failure disables Gluon, one warning in all
            plan = plans.get_plan(torch.randn(m, 300, dtype=torch.float16), packed, "tq2", 300, s, 0)
            assert plan.cfg.kind == "tc" and plan.main.fn.__name__ == "tq_matmul_kernel"
    msgs = [str(w.message) for w in seen if "Gluon" in str(w.message)]
    assert len(msgs) == 1 and "simulated" in msgs[0] and "portable" in msgs[0]
    assert not gluon_launch.available()


def test_steps_and_split_respect_the_shared_memory_budget():
    for q in (16, 624, 768, 2048, 7168):
        for bm, planes in ((8, 4), (16, 4), (16, 5)):
            for want in (1, 3, 8):
                for bj in (64, 128):
                    steps, split = gluon_launch.steps_and_split(q, want, bm, planes, bj)
                    assert steps * planes * bm * bj * 2 <= max(gluon_launch.SMEM_BUDGET, planes * bm * bj * 2)
                    assert steps * bj * split >= q and steps * bj * (split - 1) < q  # every split non-empty
                blocks = -(-q // 64)
                steps, split = gluon_launch.steps_and_split(q, want, bm, planes)
                assert steps <= -(-blocks // min(want, blocks))  # at least the asked split, up to rounding


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and gluon_launch.available()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_gluon_kernel_many_shapes_poisoned_outputs(fmt, dtype):
    if not _hopper():
        pytest.skip("the Gluon kernel needs an sm_90 GPU and a Triton with Gluon")
    gen = torch.Generator(device="cuda").manual_seed(19)
    for n, k in ((1, 16), (37, 77), (130, 999), (1000, 3001), (515, 8192), (3072, 3072)):
        packed = get_format(fmt).pack(torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda", generator=gen))
        for m in (1, 5, 8, 9, 16):
            for p, axis in ((1, 0), (3, 0), (2, 1)):
                if p > (n, k)[axis]:
                    continue
                scales = torch.rand(p, device="cuda", generator=gen) + 0.5
                for bm, split, bj in ((8, 1, 64), (16, 3, 128), (16, 8, 64), (8, 5, 128)):
                    if m > bm:
                        continue
                    x = torch.randn(m, k, dtype=dtype, device="cuda", generator=gen)  # fresh every launch
                    err = poisoned_launch_error(partial(gluon_launch.launch, x, packed, fmt, k, scales, axis, bm,
                                                        split, block_j=bj), x, packed, fmt, k, scales, axis)
                    assert err < tolerance(dtype), (n, k, m, p, axis, bm, split, bj, err)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_stream_kernel_many_shapes_poisoned_outputs(fmt, dtype):
    if not _hopper():
        pytest.skip("the Gluon kernels need an sm_90 GPU and a Triton with Gluon")
    gen = torch.Generator(device="cuda").manual_seed(29)
    # k a multiple of 16 (the kernel's limit); TQ1 rows of 624 / 608 bytes end inside a 64-byte step
    for n, k in ((1, 16), (37, 80), (130, 1008), (1000, 3008), (515, 8192), (3072, 3072), (200, 3040)):
        packed = get_format(fmt).pack(torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda", generator=gen))
        for m in (1, 3, 8):
            for p, axis in ((1, 0), (3, 0), (2, 1)):
                if p > (n, k)[axis]:
                    continue
                scales = torch.rand(p, device="cuda", generator=gen) + 0.5
                for warps, split in ((4, 1), (8, 3), (4, 8), (8, 16)):
                    x = torch.randn(m, k, dtype=dtype, device="cuda", generator=gen)  # fresh every launch
                    err = poisoned_launch_error(partial(gluon_launch.launch_stream, x, packed, fmt, k, scales, axis,
                                                        warps, split), x, packed, fmt, k, scales, axis)
                    assert err < tolerance(dtype), (n, k, m, p, axis, warps, split, err)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gluon", "stream"])
def test_gpu_split_k_repeatable_and_plans_through_ternary_matmul(monkeypatch, kind):
    if not _hopper():
        pytest.skip("the Gluon kernels need an sm_90 GPU and a Triton with Gluon")
    gen = torch.Generator(device="cuda").manual_seed(31)
    n, k = 9216, 3072
    packed = get_format("tq2").pack(torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda", generator=gen))
    scales = torch.rand(6, device="cuda", generator=gen) + 0.5
    if kind == "gluon":  # both step widths; 16 activation rows
        rows, cfg = 16, configs.KernelConfig("gluon", 16, 64, 64, 4)
        launch = lambda x, i: gluon_launch.launch(x, packed, "tq2", k, scales, 0, 16, 8, block_j=64 << (i % 2))  # noqa: E731
    else:  # 4 and 8 warps; 8 activation rows
        rows, cfg = 8, configs.KernelConfig("stream", 8, 64, 64, 4, 4)
        launch = lambda x, i: gluon_launch.launch_stream(x, packed, "tq2", k, scales, 0, 4 << (i % 2), 12)  # noqa: E731
    for i in range(20):  # many launches on fresh inputs: a race in the split-k fix-up shows as a changing result
        x = torch.randn(rows, k, dtype=torch.float16, device="cuda", generator=gen)
        y = launch(x, i)
        assert torch.equal(y, launch(x, i))
        assert relative_error(y, fp32_reference(x, packed, "tq2", k, scales, 0)) < tolerance(torch.float16)
    # the public entry point with a Gluon config: cached plans (compiled-kernel launches with their launch
    # options), 3-D, strided and column-scaled activations; m past the kernel's rows runs the portable kernel
    monkeypatch.setattr(configs, "lookup_config", lambda *a, gluon=True: cfg if gluon
                        else configs.KernelConfig("tc", 16, 64, 64, 1, 4, 3))
    plans.clear_plans()
    for shape, axis, p in (((2, 3, k), 0, 1), ((5, 2 * k), 0, 3), ((4, k), 1, 4), ((rows + 1, k), 0, 1)):
        s = torch.rand(p, device="cuda", generator=gen) + 0.5
        for _ in range(2):
            x = torch.randn(*shape, dtype=torch.float16, device="cuda", generator=gen)
            if shape[-1] == 2 * k:
                x = x[:, ::2]
            y = ternary_matmul(x, packed, "tq2", k, s, axis)
            ref = fp32_reference(x.reshape(-1, k), packed, "tq2", k, s, axis).reshape(*x.shape[:-1], n)
            assert relative_error(y, ref) < tolerance(torch.float16)
    kinds = {pl.m: pl.cfg.kind for pl in plans._plans.values()}
    assert kinds[6] == kinds[5] == kinds[4] == kind and kinds[rows + 1] == "tc", kinds
    plans.clear_plans()


def test_stream_configs_only_where_the_streaming_kernel_takes_the_shape(monkeypatch):
    # m <= 8 and k a multiple of 16: the tuner offers stream configs there only, and a plan or run_config given
    # one outside those limits runs the portable kernel (here: no GPU, so the heuristic)
    kinds = lambda m, k: {c.kind for c in configs.gluon_candidates(m, k)}  # noqa: E731
    assert kinds(8, 3072) == {"gluon", "stream"}
    assert kinds(9, 3072) == kinds(1, 3000) == {"gluon"}
    assert gluon_launch.takes("stream", 8, 3072) and not gluon_launch.takes("stream", 8, 3000)
    assert gluon_launch.takes("gluon", 16, 3000) and not gluon_launch.takes("gluon", 17, 3072)
    stream = configs.KernelConfig("stream", 8, 128, 64, 4, 8)
    assert dispatch.portable_config(stream, "tq2", 3072, 3072, 1, torch.device("cpu")).kind == "tc"
    assert tuning.describe(stream) == "gluon stream warps 8 split 4"
    # tuned entries: a stream config that wins is the Gluon entry (the portable entry stays)
    tc = configs.KernelConfig("tc", 16, 64, 64, 4, 4, 3)
    key = configs.config_key("tq2", 3072, 3072, 1, torch.float16, 0, "GPU")
    assert tuning.tuned_entries("tq2", 3072, 3072, 1, torch.float16, "GPU", {tc: 9e-6, stream: 7e-6}) == \
        {key: tc, key + configs.GLUON_KEY_SUFFIX: stream}


def test_lookup_skips_a_stream_entry_past_its_shape_limits(monkeypatch, scratch_kernel_table):
    monkeypatch.setattr(gluon_launch, "usable", lambda device, m, dtype: True)
    tc, stream = configs.KernelConfig("tc", 16, 64, 64, 4, 4, 3), configs.KernelConfig("stream", 8, 64, 64, 2, 4)
    cuda = torch.device("cuda", 0)  # only compared, never touched: usable() is patched
    for k, want in ((3072, stream), (3000, tc)):
        key = configs.config_key("tq2", 512, k, 8, torch.float16, 0, "Test GPU")
        configs.save_configs({key: tc, key + configs.GLUON_KEY_SUFFIX: stream})
        assert configs.lookup_config("tq2", 512, k, 8, torch.float16, 0, cuda) == want
    monkeypatch.setattr(configs, "_table", None)


def test_tuning_keeps_the_portable_entry_and_adds_a_gluon_entry_only_where_it_wins():
    K = configs.KernelConfig
    tc, gl_fast, gl_slow = K("tc", 16, 64, 64, 4, 4, 3), K("gluon", 8, 64, 128, 4), K("gluon", 8, 64, 64, 1)
    key = configs.config_key("tq2", 3072, 3072, 1, torch.float16, 0, "GPU")
    wins = tuning.tuned_entries("tq2", 3072, 3072, 1, torch.float16, "GPU", {tc: 9e-6, gl_fast: 7e-6, gl_slow: 8e-6})
    assert wins == {key: tc, key + configs.GLUON_KEY_SUFFIX: gl_fast}
    loses = tuning.tuned_entries("tq2", 3072, 3072, 1, torch.float16, "GPU", {tc: 6e-6, gl_fast: 7e-6})
    assert loses == {key: tc}


def test_lookup_takes_the_gluon_entry_only_where_the_gluon_kernel_can_run(monkeypatch, scratch_kernel_table):
    tc, gl = configs.KernelConfig("tc", 16, 64, 64, 4, 4, 3), configs.KernelConfig("gluon", 8, 64, 64, 4)
    key = configs.config_key("tq2", 3072, 3072, 1, torch.float16, 0, "Test GPU")
    configs.save_configs({key: tc, key + configs.GLUON_KEY_SUFFIX: gl})
    cuda = torch.device("cuda", 0)  # only compared, never touched: usable() is patched
    for ok, want in ((True, gl), (False, tc)):
        monkeypatch.setattr(gluon_launch, "usable", lambda device, m, dtype, ok=ok: ok)
        assert configs.lookup_config("tq2", 3072, 3072, 1, torch.float16, 0, cuda) == want
        assert configs.lookup_config("tq2", 3072, 3072, 1, torch.float16, 1, cuda) == want  # per-shard scales


# --- the Gluon kernel's word decode (ptx.word_decode_asm), emulated instruction by instruction --------------

def _lanes(v: int) -> tuple[int, int]:
    return v & 0xFFFF, v >> 16


def _half(bits: int, dtype: str) -> float:
    import numpy as np

    if dtype == "fp16":
        return float(np.array(bits, dtype=np.uint16).view(np.float16))
    return float(torch.tensor(bits << 16, dtype=torch.int64).to(torch.int32).view(torch.float32))


def _bits(v: float, dtype: str) -> int:
    import numpy as np

    if dtype == "fp16":
        return int(np.array(v, dtype=np.float64).astype(np.float16).view(np.uint16))  # one IEEE rounding
    return int(torch.tensor(v, dtype=torch.float64).to(torch.bfloat16).view(torch.int16)) & 0xFFFF


def _run_ptx(asm: str, word: int) -> dict[str, int]:
    """Execute the straight-line PTX of a word-decode snippet on one 32-bit input word; returns the registers."""
    import re

    regs: dict[str, int] = {}
    n_out = max(int(r) for r in re.findall(r"\$(\d+)", asm))
    regs[f"${n_out}"] = word  # the input operand (the last one used by the snippet)

    def val(tok: str) -> int:
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    for line in asm.splitlines():
        m = re.match(r"(\S+)\s+(.*);", line.strip())
        if not m or line.strip().startswith(".reg"):
            continue
        op, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        if op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op == "prmt.b32":
            a, b, sel = val(args[1]), val(args[2]), val(args[3])
            pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
            regs[args[0]] = sum(pool[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))
        elif op == "lop3.b32":
            assert args[4] == "0xEA"  # (a & b) | c
            regs[args[0]] = (val(args[1]) & val(args[2])) | val(args[3])
        elif op == "shl.b32":
            regs[args[0]] = (val(args[1]) << val(args[2])) & 0xFFFFFFFF
        elif op == "mul.lo.u32":
            regs[args[0]] = (val(args[1]) * val(args[2])) & 0xFFFFFFFF
        elif op.startswith(("fma.rn", "add.rn")):
            dt = "bf16" if "bf16" in op else "fp16"
            ins = [_lanes(val(a)) for a in args[1:]]
            out = 0
            for lane in range(2):
                xs = [_half(i[lane], dt) for i in ins]
                r = xs[0] * xs[1] + xs[2] if op.startswith("fma") else xs[0] + xs[1]
                out |= _bits(r, dt) << (16 * lane)
            regs[args[0]] = out
        else:
            raise AssertionError(f"unexpected instruction {op}")
    return regs


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_word_decode_asm_gives_every_plane_of_all_four_bytes(fmt, dtype):
    from spectra.formats import tq1_digits
    from spectra.kernels.ptx import word_decode_asm

    asm = word_decode_asm(fmt, dtype)
    planes = 4 if fmt == "tq2" else 5
    gen = torch.Generator().manual_seed(3)
    valid = [b for b in range(256) if fmt == "tq1" or all((b >> (2 * i)) & 3 != 3 for i in range(4))]
    for _ in range(60):
        bytes4 = [valid[int(i)] for i in torch.randint(0, len(valid), (4,), generator=gen)]
        regs = _run_ptx(asm, sum(b << (8 * i) for i, b in enumerate(bytes4)))
        for i in range(planes):
            got = [_half(v, dtype) for r in (f"${2 * i}", f"${2 * i + 1}") for v in _lanes(regs[r])]
            if fmt == "tq2":
                want = [((b >> (2 * i)) & 3) - 1 for b in bytes4]
            else:
                want = [int(tq1_digits(torch.tensor([b]))[i]) - 1 for b in bytes4]
            assert got == want, (fmt, dtype, bytes4, i, got, want)
