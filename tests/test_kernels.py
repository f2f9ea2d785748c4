"""Packed ternary kernels: interpreter-mode runs of every Triton kernel against the reference (CPU, CI),
exhaustive checks of the inline-PTX decode constants, dispatcher checks, and GPU tests (marked `gpu`)."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict
from functools import partial

import numpy as np
import pytest
import torch
from kernel_support import fp32_reference as _fp32_reference
from kernel_support import poisoned_launch_error, relative_error, run_in_interpreter, tolerance

from spectra.errors import ConfigError, FormatError
from spectra.formats import get_format, tq1_digits
from spectra.kernels import configs, dispatch, ternary_matmul, ternary_matmul_reference, tuning
from spectra.kernels.ptx import _TQ2

triton = pytest.importorskip("triton")

# The whole interpreter battery runs in one subprocess: TRITON_INTERPRET must be set before triton is
# imported, and one process amortises the import. Small odd shapes; k=611 gives several K tiles per plane
# (the tile tail then overlaps the next plane's columns, which masks must stop); k=713 gives TQ1 rows of 144
# bytes, so with block_j 32 the loop runs whole steps and then the peeled partial step (also inside a split).
_INTERPRETER_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from spectra.formats import get_format
    from spectra.kernels import configs, dispatch, launch_support, ternary_matmul_reference
    from spectra.ternary import ternary_dense_weight
    torch.manual_seed(0)
    failures = []
    cases = 0
    for fmt in ("tq2", "tq1"):
        for n, k in ((37, 77), (19, 611), (21, 713)):
            trits = torch.randint(-1, 2, (n, k), dtype=torch.int8)
            packed = get_format(fmt).pack(trits)
            for p, axis in ((1, 0), (2, 0), (3, 0), (2, 1), (3, 1)):
                scales = torch.rand(p) + 0.5
                # bf16 dots are wrong in the Triton interpreter itself (numpy has no bf16): fp16 and fp32 here,
                # bf16 through the dequantize kernel below and on the GPU.
                # block_j 64 on 16-byte-aligned rows: the masked K-step path (q % block_j != 0) runs too
                for dtype, m, cfg in ((torch.float16, 1, (16, 16, 16, 1, 1)), (torch.float32, 5, (16, 16, 16, 3, 2)),
                                      (torch.float16, 3, (16, 32, 32, 2, 2)), (torch.float32, 2, (16, 16, 64, 1, 1))):
                    x = torch.randn(m, k).to(dtype)
                    bm, bn, bj, split, stages = cfg
                    c = configs.KernelConfig("tc", bm, bn, bj, split, 4, stages)
                    y = torch.full((m, n), float("nan"), dtype=dtype)
                    dispatch.launch_tc(x, packed, fmt, k, scales, axis, c, out=y, use_asm=False)
                    ref = ternary_matmul_reference(x.float(), packed, fmt, k, scales, axis)
                    err = float((y.float() - ref).norm() / ref.norm())
                    cases += 1
                    if not err < (1e-5 if dtype == torch.float32 else 2e-3):
                        failures.append(f"matmul {fmt} {n}x{k} P={p} axis={axis} {dtype} {cfg} rel={err:.3e}")
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    if dtype != torch.float32 and (p, axis) not in ((2, 0), (3, 1)):
                        continue  # keep the CI time down: every scale mode once per low-precision dtype
                    w = dispatch.dequantize(packed, fmt, k, scales, axis, dtype)
                    want = ternary_dense_weight(trits, scales, axis, dtype)
                    cases += 1
                    # the interpreter truncates fp32 -> bf16 (the GPU rounds): allow one bf16 ulp there
                    ok = (torch.equal(w, want) if dtype != torch.bfloat16
                          else torch.allclose(w.float(), want.float(), rtol=2 ** -7, atol=0))
                    if not ok:
                        failures.append(f"dequant {fmt} {n}x{k} P={p} axis={axis} {dtype}")
    # column-shard scales are applied to x before the matmul launch: bit-identical to fp32 product then cast,
    # on uneven shards and a row stride wider than k
    from spectra.kernels import scale_columns_reference
    for k, p in ((611, 7), (1500, 3), (64, 1)):
        for dtype in (torch.float16, torch.float32):
            x = torch.randn(3, k + 5).to(dtype)[:, :k]
            scales = torch.rand(p) + 0.5
            got = launch_support.scale_columns(x, scales, k)
            want = scale_columns_reference(x, scales, k)
            cases += 1
            if not torch.equal(got, want):
                failures.append(f"scale_columns k={k} P={p} {dtype}")
""")


def test_triton_kernels_in_interpreter_match_reference():
    assert "cases=" in run_in_interpreter(_INTERPRETER_SCRIPT)


# The persistent stream-K launch: its programs split output tiles at arbitrary K steps (several programs
# per tile, several tiles per program, tiles stored directly), with every scale mode.
_INTERPRETER_STREAM_K_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from spectra.formats import get_format
    from spectra.kernels import configs, dispatch, launch_support, ternary_matmul_reference
    torch.manual_seed(1)
    K = configs.KernelConfig
    cases = [
        (torch.float16, 33, (2, 1), K("sk", 16, 16, 16, 1, 4, 2, 3)),
        (torch.float32, 17, (1, 0), K("sk", 16, 16, 32, 1, 4, 2, 7)),
        (torch.float32, 40, (3, 0), K("sk", 32, 16, 16, 1, 4, 2, 5)),
        (torch.float16, 5, (1, 0), K("sk", 16, 32, 16, 1, 4, 2, 1)),
    ]
    failures = []
    count = 0
    for fmt in ("tq2", "tq1"):
        for n, k in ((37, 77), (19, 611), (21, 713)):
            packed = get_format(fmt).pack(torch.randint(-1, 2, (n, k), dtype=torch.int8))
            for dtype, m, (p, axis), cfg in cases:
                x = torch.randn(m, k).to(dtype)
                scales = torch.rand(p) + 0.5
                y = torch.full((m, n), float("nan"), dtype=dtype)
                dispatch.launch_sk(x, packed, fmt, k, scales, axis, cfg, out=y, use_asm=False)
                ref = ternary_matmul_reference(x.float(), packed, fmt, k, scales, axis)
                err = float((y.float() - ref).norm() / ref.norm())
                count += 1
                if not err < (1e-5 if dtype == torch.float32 else 2e-3):
                    failures.append(f"{fmt} {n}x{k} m={m} P={p} axis={axis} {dtype} {cfg} rel={err:.3e}")
    ws, cnt = launch_support.WORKSPACE.buffers[torch.device("cpu")]
    if int(cnt.abs().max()) != 0:
        failures.append("stream-K arrival counters not left zeroed")
    print(f"cases={count}")
    for f in failures:
        print("FAIL", f)
    sys.exit(1 if failures else 0)
""")


def test_stream_k_kernel_in_interpreter_matches_reference():
    assert "cases=24" in run_in_interpreter(_INTERPRETER_STREAM_K_SCRIPT)


def test_large_m_candidates_include_stream_k_and_old_tables_load():
    for m in (64, 100, 256):
        for fmt in ("tq2", "tq1"):
            cands = configs.candidate_configs(3072, 9216, m, fmt, 132)
            assert any(c.kind == "sk" for c in cands)
            assert all(configs.smem_bytes(c, fmt) <= configs.SMEM_LIMIT for c in cands if c.kind != "dequant")
    assert not any(c.kind == "sk" for c in configs.candidate_configs(3072, 9216, 16, "tq2", 132))
    # tables written before the `programs` field existed still load
    old = {"kind": "tc", "block_m": 64, "block_n": 64, "block_j": 64, "split": 1, "num_warps": 4, "num_stages": 3}
    assert configs.KernelConfig.from_dict(old) == configs.KernelConfig("tc", 64, 64, 64, 1, 4, 3, 0)


def test_prefill_sized_m_dispatches_to_dequantize_then_cublas(monkeypatch, scratch_kernel_table):
    # past the tuned buckets, from the measured crossover on, unless a tuned entry for that bucket exists
    monkeypatch.setattr(configs, "num_sms", lambda device: 132)
    dev = torch.device("cpu")

    def kind(fmt: str, m: int) -> str:
        return configs.lookup_config(fmt, 3072, 9216, m, torch.float16, 0, dev).kind

    assert [kind("tq2", m) for m in (1, 256, 512, 1024, 1025, 4096)] == ["tc", "tc", "tc", "tc", "dequant",
                                                                         "dequant"]
    assert [kind("tq1", m) for m in (256, 300, 512, 513, 2048)] == ["tc", "tc", "tc", "dequant", "dequant"]
    tuned = configs.KernelConfig("sk", 128, 128, 32, 1, 8, 3)
    configs.save_configs({configs.config_key("tq2", 3072, 9216, 2048, torch.float16, 0, "Test GPU"): tuned})
    assert configs.lookup_config("tq2", 3072, 9216, 2048, torch.float16, 0, dev) == tuned


# --- the inline-PTX decode, emulated bit for bit over every byte value ---------------------------------

def _f16(bits: int) -> float:
    return float(np.array(bits, dtype=np.uint16).view(np.float16))


def _bf16(bits: int) -> float:
    return float(torch.tensor(bits << 16, dtype=torch.int64).to(torch.int32).view(torch.float32))


def _rn16(v: float) -> float:
    return float(np.float16(v))  # v is exact in float64 here, so this is one IEEE rounding (fma semantics)


def _rnbf(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32).to(torch.bfloat16))


def test_tq2_ptx_constants_decode_every_valid_byte_exactly():
    for dtype, cvt, rnd in (("fp16", _f16, _rn16), ("bf16", _bf16, _rnbf)):
        magic, scale, bias = _TQ2[dtype]
        for byte in range(256):
            for i in range(4):
                digit = (byte >> (2 * i)) & 3
                if digit == 3:
                    continue  # invalid code, rejected by the format
                v = cvt(magic | (byte & (3 << (2 * i))))
                assert rnd(v * cvt(scale[i]) + cvt(bias[i])) == digit - 1, (dtype, byte, i)


def test_tq1_ptx_constants_decode_every_byte_exactly():
    for q in range(256):
        digits = [int(d) for d in tq1_digits(torch.tensor([q]))]
        for i in range(5):
            lane = (q * 4 * 3 ** i) & 0xFFFF
            a = _f16((lane & 0x03FC) | 0x5C01)                # fp16 256 + m + 1/4
            r = _rn16(a * _f16(0x2200) + _f16(0x63FB))        # rounds to 1025 + d
            assert _rn16(r + _f16(0xE402)) == digits[i] - 1, (q, i)
            bits = int(np.array(r, dtype=np.float16).view(np.uint16))
            vb = _bf16((bits & 3) | 0x4300)                   # bf16 128 + d + 1
            assert _rnbf(vb * _bf16(0x3F80) + _bf16(0xC302)) == digits[i] - 1, (q, i)


def test_tq1_lane_overflow_does_not_reach_the_high_lane_digits():
    # Two bytes share a 32-bit multiply; the low lane's carry (bit 16) must not change the high lane's bits 2..9.
    for q0 in (0, 200, 255):
        for q1 in range(256):
            word = q0 | (q1 << 16)
            for i in range(5):
                t = (word * 4 * 3 ** i) & 0xFFFFFFFF
                assert (t >> 18) & 0xFF == (q1 * 3 ** i) & 0xFF


# --- dispatcher ---------------------------------------------------------------------------------------

def test_cpu_dispatch_is_the_reference():
    trits = torch.randint(-1, 2, (9, 33), dtype=torch.int8)
    packed = get_format("tq1").pack(trits)
    x, s = torch.randn(2, 3, 33), torch.rand(3) + 0.5
    assert torch.equal(ternary_matmul(x, packed, "tq1", 33, s, 0), ternary_matmul_reference(x, packed, "tq1", 33, s, 0))


def test_check_inputs_rejects_bad_shapes_with_clear_errors():
    packed = get_format("tq2").pack(torch.zeros(8, 40, dtype=torch.int8))
    s = torch.ones(1)
    with pytest.raises(FormatError, match="features"):
        dispatch.check_inputs(torch.randn(2, 41), packed, "tq2", 40, s, 0)
    with pytest.raises(FormatError, match="bytes"):
        dispatch.check_inputs(torch.randn(2, 80), packed, "tq2", 80, s, 0)
    with pytest.raises(FormatError, match="uint8"):
        dispatch.check_inputs(torch.randn(2, 40), packed.to(torch.int8), "tq2", 40, s, 0)
    with pytest.raises(FormatError, match="shard_axis"):
        dispatch.check_inputs(torch.randn(2, 40), packed, "tq2", 40, s, 2)
    with pytest.raises(ConfigError):
        dispatch.check_inputs(torch.randn(2, 40), packed, "tq2", 40, torch.ones(9), 0)
    with pytest.raises(FormatError, match="unknown ternary format"):
        dispatch.check_inputs(torch.randn(2, 40), packed, "tq3", 40, s, 0)


def test_configs_fit_shared_memory_and_buckets_are_monotone():
    for m in (1, 3, 16, 17, 64, 100, 256, 1000):
        for fmt in ("tq2", "tq1"):
            for cfg in configs.candidate_configs(8192, 28672, m, fmt, 132):
                if cfg.kind == "tc":
                    assert configs.smem_bytes(cfg, fmt) <= configs.SMEM_LIMIT
    buckets = [configs.m_bucket(m) for m in range(1, 600)]
    assert buckets == sorted(buckets) and all(b >= m for m, b in zip(range(1, 600), buckets))


def test_tuning_without_cuda_raises_device_error():
    from spectra.errors import DeviceError

    with pytest.raises(DeviceError):
        tuning.tune("tq2", 64, 64, 1, device="cpu")


def test_model_linear_shapes_are_the_products_of_the_model_fused_and_separate():
    import spectra
    from spectra.bench import SHAPE_SETS, layer_shapes
    from spectra.block import model_linear_shapes

    config = spectra.get_config("tiny", weight_kind="ternary_frozen")
    model = spectra.SpectraLM(config)
    separate = {(m.out_features, m.in_features) for m in model.linear_layers().values()}
    model.fuse_projections()
    fused = {(m.out_features, m.in_features) for m in model.linear_layers().values()}
    assert fused != separate
    assert set(model_linear_shapes(config)) == fused | separate
    # the 3.9B benchmark shapes (k, n) are the fused decode shapes of the 3.9B preset, which `bench gemm` also
    # takes by name
    assert {(n, k) for k, n in SHAPE_SETS["3.9b"]} <= set(model_linear_shapes(spectra.get_config("3.9B")))
    assert layer_shapes("3.9B") == SHAPE_SETS["3.9b"] == layer_shapes("3.9b")
    assert {(n, k) for k, n in layer_shapes("tiny")} <= fused
    with pytest.raises(ConfigError, match="unknown shape set 'x'"):
        layer_shapes("x")


def test_bench_tune_cli_checks_its_arguments_then_needs_cuda(capsys, tmp_path):
    from spectra.cli.main import main

    if torch.cuda.is_available():
        pytest.skip("this checks the error on a machine without CUDA")
    for argv, message in ((["--size", "9B"], "unknown model size '9B'"),
                          (["--size", "99M", "--formats", "tq3"], "unknown format tq3"),
                          (["--size", "99M", "--ms", "1,x"], "--ms takes comma-separated batch sizes"),
                          (["--size", "99M", "--ms", "0"], "batch sizes >= 1"),
                          (["--checkpoint", str(tmp_path)], "has no config.json"),
                          (["--shapes", "7b"], "unknown shape set '7b'"),  # before any GPU check
                          (["--size", "99M"], "needs a CUDA GPU"),
                          (["--size", "3.9B", "--quick"], "needs a CUDA GPU"),
                          (["--shapes", "70b", "--quick"], "needs a CUDA GPU")):
        assert main(["bench", "tune", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, err
    assert main(["bench", "gemm", "--shapes", "3.9b,9B"]) == 2
    assert "unknown shape set '9B'" in capsys.readouterr().err


def test_tune_shapes_writes_entries_that_lookup_then_returns(monkeypatch, scratch_kernel_table):
    # The timing itself needs a GPU (test_gpu_tune_shapes_...); here tune() is replaced by a stand-in that
    # picks a distinctive config, to check the keys, the cache file and the read-back on any machine.
    picked = configs.KernelConfig("tc", 16, 64, 32, 3, 4, 5)
    calls = []

    def fake_tune(fmt, n, k, m, dtype, device, candidates, save):
        assert candidates is None  # the full search
        calls.append((fmt, n, k, m, save))
        return picked, {picked: 1e-5}

    monkeypatch.setattr(tuning, "tune", fake_tune)
    entries = tuning.tune_shapes([(200, 136), (136, 200)], ("tq2", "tq1"), (1, 3, 4), device="cpu",
                                   log=lambda msg: None)
    # m = 3 and 4 share a bucket: tuned once, at the bucket's m
    assert len(calls) == len(entries) == 8 and not any(c[-1] for c in calls)
    assert {c[3] for c in calls} == {1, 4}
    monkeypatch.setattr(configs, "_table", None)  # read back from the file
    for fmt in ("tq2", "tq1"):
        for m in (1, 3, 4):  # 3 and 4 share a bucket
            assert configs.lookup_config(fmt, 136, 200, m, torch.float16, 0, torch.device("cpu")) == picked
    monkeypatch.setattr(configs, "_table", None)


def test_interrupted_tune_keeps_the_shapes_it_finished(monkeypatch, scratch_kernel_table):
    # A long tune stopped part way (Ctrl-C, a time limit) must not lose the shapes already measured.
    picked = configs.KernelConfig("tc", 16, 64, 32, 3, 4, 5)
    done = []

    def fake_tune(fmt, n, k, m, dtype, device, candidates, save):
        if done:
            raise KeyboardInterrupt
        done.append((fmt, n, k, m))
        return picked, {picked: 1e-5}

    monkeypatch.setattr(tuning, "tune", fake_tune)
    with pytest.raises(KeyboardInterrupt):
        tuning.tune_shapes([(200, 136), (136, 200)], ("tq2",), (1,), device="cpu", log=lambda msg: None)
    saved = json.loads((scratch_kernel_table / "kernel_configs.json").read_text())
    assert list(saved) == [configs.config_key("tq2", 200, 136, 1, torch.float16, 0, "Test GPU")]
    monkeypatch.setattr(configs, "_table", None)


def test_quick_tune_times_the_configs_other_gpus_chose_for_the_shape(monkeypatch):
    # `spectra bench tune --quick` on a new GPU: the candidates are the entries of the same format, shape, m bucket
    # and dtype tuned on any GPU (portable and Gluon) plus the heuristic; other shapes, buckets, dtypes and
    # formats are not candidates, and a shape no GPU tuned gets the full search (None).
    a = configs.KernelConfig("gemv", 1, 16, 256, 2, 4, 1)
    b = configs.KernelConfig("tc", 16, 64, 64, 4, 4, 3)
    g = configs.KernelConfig("gluon", 8, 64, 128, 3)
    other = configs.KernelConfig("tc", 16, 64, 32, 8, 4, 5)

    def key(gpu, fmt="tq2", m=1, dtype=torch.float16):
        return configs.config_key(fmt, 3072, 9216, m, dtype, 0, gpu)

    table = {key("GPU A"): asdict(a), key("GPU B"): asdict(b), key("GPU B") + configs.GLUON_KEY_SUFFIX: asdict(g),
             key("GPU C"): asdict(a), key("GPU A", fmt="tq1"): asdict(other), key("GPU A", m=16): asdict(other),
             key("GPU A", dtype=torch.bfloat16): asdict(other),
             configs.config_key("tq2", 3072, 3072, 1, torch.float16, 0, "GPU A"): asdict(other)}
    monkeypatch.setattr(configs, "_table", table)
    monkeypatch.setattr(configs, "num_sms", lambda device: 132)
    assert set(configs.table_configs("tq2", 3072, 9216, 1, torch.float16)) == {a, b, g}
    heuristic = configs.heuristic_config(3072, 9216, 1, "tq2", 132)
    cpu = torch.device("cpu")  # the Gluon kernel cannot run here: its entry is left out
    assert set(tuning.quick_candidates("tq2", 3072, 9216, 1, torch.float16, cpu)) == {a, b, heuristic}
    monkeypatch.setattr(tuning.gluon_launch, "usable", lambda device, m, dtype: True)
    monkeypatch.setattr(tuning.gluon_launch, "tuning_enabled", lambda: True)
    assert set(tuning.quick_candidates("tq2", 3072, 9216, 1, torch.float16, cpu)) == {a, b, g, heuristic}
    assert tuning.quick_candidates("tq2", 5000, 9216, 1, torch.float16, cpu) is None
    monkeypatch.setattr(configs, "_table", None)


def test_tune_quick_flag_passes_the_quick_candidates_to_each_tuning(monkeypatch, scratch_kernel_table):
    picked = configs.KernelConfig("tc", 16, 64, 32, 3, 4, 5)
    seen = []
    monkeypatch.setattr(tuning, "quick_candidates", lambda fmt, n, k, m, dtype, device: [picked])

    def fake_tune(fmt, n, k, m, dtype, device, candidates, save):
        seen.append(candidates)
        return picked, {picked: 1e-5}

    monkeypatch.setattr(tuning, "tune", fake_tune)
    tuning.tune_shapes([(200, 136)], ("tq2",), (1, 16), device="cpu", log=lambda msg: None, quick=True)
    assert seen == [[picked], [picked]]
    monkeypatch.setattr(configs, "_table", None)


# --- GPU ---------------------------------------------------------------------------------------------



@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_kernels_many_shapes_poisoned_outputs(fmt, dtype):
    gen = torch.Generator(device="cuda").manual_seed(7)
    cfgs = [configs.KernelConfig("tc", 16, 64, 64, 3, 4, 4), configs.KernelConfig("tc", 64, 64, 64, 1, 4, 3),
               configs.KernelConfig("tc", 128, 64, 32, 2, 4, 3), configs.KernelConfig("dequant")]
    for n, k in ((1, 16), (37, 77), (130, 999), (1000, 3001), (515, 8192)):
        packed = get_format(fmt).pack(torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda", generator=gen))
        for m in (1, 7, 33, 100):
            x = torch.randn(m, k, dtype=dtype, device="cuda", generator=gen)
            for p, axis in ((1, 0), (3, 0), (2, 1)):
                if p > (n, k)[axis]:
                    continue
                scales = torch.rand(p, device="cuda", generator=gen) + 0.5
                # every compiled variant costs seconds: all configs with one scale, split-k with every scale mode
                for cfg in (cfgs if p == 1 else cfgs[:1]):
                    if cfg.kind == "tc":
                        err = poisoned_launch_error(partial(dispatch.launch_tc, x, packed, fmt, k, scales, axis, cfg),
                                                    x, packed, fmt, k, scales, axis)
                    else:
                        err = relative_error(dispatch.run_config(x, packed, fmt, k, scales, axis, cfg),
                                             _fp32_reference(x, packed, fmt, k, scales, axis))
                    assert err < tolerance(dtype), (n, k, m, p, axis, cfg, err)
        # the public entry point, 3-D and strided activations
        x = torch.randn(2, 3, 2 * k, dtype=dtype, device="cuda", generator=gen)[..., ::2]
        s = torch.rand(1, device="cuda", generator=gen) + 0.5
        y = ternary_matmul(x, packed, fmt, k, s, 0)
        ref = _fp32_reference(x.reshape(-1, k), packed, fmt, k, s, 0).reshape(2, 3, n)
        assert relative_error(y, ref) < tolerance(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
def test_gpu_stream_k_poisoned_outputs(fmt):
    gen = torch.Generator(device="cuda").manual_seed(11)
    cfgs = [configs.KernelConfig("sk", 128, 128, 32, 1, 8, 3), configs.KernelConfig("sk", 64, 128, 32, 1, 8, 3),
               configs.KernelConfig("sk", 64, 64, 64, 1, 4, 3, 7)]
    for n, k in ((515, 8192), (1000, 3001), (3072, 3072)):
        packed = get_format(fmt).pack(torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda", generator=gen))
        for m, dtype, (p, axis) in ((100, torch.float16, (3, 0)), (256, torch.float16, (1, 0)),
                                    (33, torch.float16, (2, 1)), (100, torch.bfloat16, (1, 0))):
            scales = torch.rand(p, device="cuda", generator=gen) + 0.5
            for cfg in cfgs:
                for _ in range(2):  # fresh inputs each time: a race shows as a changing error
                    x = torch.randn(m, k, dtype=dtype, device="cuda", generator=gen)
                    err = poisoned_launch_error(partial(dispatch.launch_sk, x, packed, fmt, k, scales, axis, cfg),
                                                x, packed, fmt, k, scales, axis)
                    assert err < tolerance(dtype), (n, k, m, p, axis, cfg, err)


@pytest.mark.gpu
def test_gpu_split_k_stress_many_launches():
    # Split-k and stream-K tiles are finished by whichever program arrives last. With float atomics into a
    # shared workspace this gave wrong tiles in 1 to 30 of 30 launches on H100 and H200 (rel. error up to
    # 0.59); many back-to-back launches on fresh inputs, each checked, and a repeated launch must give the
    # same bits (the slots are summed in a fixed order).
    gen = torch.Generator(device="cuda").manual_seed(13)
    n, k = 9216, 3072
    packed = get_format("tq2").pack(torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda", generator=gen))
    scales = torch.rand(6, device="cuda", generator=gen) + 0.5
    K = configs.KernelConfig
    cases = [(K("tc", 16, 64, 64, 8, 4, 4), 1), (K("tc", 16, 64, 64, 8, 4, 4), 16), (K("tc", 16, 64, 64, 4, 4, 4), 128),
             (K("tc", 128, 64, 32, 4, 4, 3), 256), (K("sk", 128, 64, 32, 1, 4, 3), 128),
             (K("sk", 128, 128, 32, 1, 8, 3), 256)]
    for cfg, m in cases:
        worst = 0.0
        for _ in range(25):
            x = torch.randn(m, k, dtype=torch.float16, device="cuda", generator=gen)
            y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
            launch = dispatch.launch_sk if cfg.kind == "sk" else dispatch.launch_tc
            launch(x, packed, "tq2", k, scales, 0, cfg, out=y)
            again = launch(x, packed, "tq2", k, scales, 0, cfg)
            assert torch.equal(y, again), (cfg, m)
            worst = max(worst, relative_error(y, _fp32_reference(x, packed, "tq2", k, scales, 0)))
        assert worst < 2e-3, (cfg, m, worst)


@pytest.mark.gpu
def test_gpu_cuda_graph_greedy_tokens_equal_reference_path(monkeypatch):
    from spectra import convert as convert_mod
    from spectra import packed as packed_mod
    from spectra.config import get_config
    from spectra.generate import generate, generate_cuda_graph
    from spectra.model import SpectraLM

    torch.manual_seed(0)
    model = SpectraLM(get_config("mini", weight_kind="ternary")).cuda().float().eval()
    convert_mod.pack_model(model, "tq2")
    model = model.half()
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    fast = generate_cuda_graph(model, prompt, max_new_tokens=24, temperature=0)
    # the reference path: plain eager forward, packed weights decoded by the PyTorch reference, rotary
    # embedding, cache writes and attention in PyTorch (SDPA with the position mask), not the decode kernels
    from spectra import model as model_mod

    monkeypatch.setattr(packed_mod, "ternary_matmul", ternary_matmul_reference)
    monkeypatch.setattr(model_mod, "uses_decode_kernel", lambda *args: False)
    ref = generate(model, prompt, max_new_tokens=24, temperature=0, fast=False)
    assert torch.equal(fast.cpu(), ref.cpu())


@pytest.mark.gpu
def test_gpu_cuda_graph_frozen_ternary_per_shard_scales_equal_eager():
    # an unpacked ternary checkpoint (int8 trits, 2 scales per matrix) under CUDA-graph capture: expand_scales
    # must not copy from the host inside the graph, and the replayed tokens must match plain eager decoding
    from spectra.config import get_config
    from spectra.convert import freeze_ternary
    from spectra.generate import generate, generate_cuda_graph
    from spectra.model import SpectraLM

    torch.manual_seed(1)
    model = SpectraLM(get_config("mini", weight_kind="ternary", model_parallel_size=2)).cuda().eval()
    model = freeze_ternary(model).half()
    prompt = torch.randint(0, model.config.vocab_size, (3, 4))
    fast = generate_cuda_graph(model, prompt, max_new_tokens=20, temperature=0)
    ref = generate(model, prompt, max_new_tokens=20, temperature=0, fast=False)
    assert torch.equal(fast.cpu(), ref.cpu())


@pytest.mark.gpu
def test_gpu_compiled_cuda_graph_step_matches_eager_step():
    # spectra generate --compile: the torch.compile-d step (our kernel as an opaque op, the rest fused by
    # inductor) replayed from a CUDA graph. Fused norms may round differently, so logits are compared with
    # a tolerance, and the greedy continuation must agree with the eager graph's.
    from spectra import convert as convert_mod
    from spectra.config import get_config
    from spectra.decode_graph import GraphDecodeStep
    from spectra.generate import generate_cuda_graph
    from spectra.model import SpectraLM

    torch.manual_seed(0)
    # two model-parallel shards: o/down carry column-shard scales, which the compiled step applies to x itself
    model = SpectraLM(get_config("mini", weight_kind="ternary", model_parallel_size=2)).cuda().float().eval()
    convert_mod.pack_model(model, "tq2")
    model = model.half()
    assert any(m.shard_axis == 1 and m.parts == 2 for m in model.linear_layers().values())
    tok = torch.randint(0, model.config.vocab_size, (2, 1), device="cuda")
    pos = torch.tensor([3], device="cuda")
    with GraphDecodeStep(model, 2, 32) as eager_step:
        want = eager_step(tok, pos).float().clone()
    with GraphDecodeStep(model, 2, 32, compile=True) as compiled_step:
        got = compiled_step(tok, pos).float().clone()
    assert float((got - want).abs().max()) <= 2e-2 * float(want.abs().max())
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    fast = generate_cuda_graph(model, prompt, max_new_tokens=12, temperature=0, compile=True)
    ref = generate_cuda_graph(model, prompt, max_new_tokens=12, temperature=0)
    torch._dynamo.reset()
    assert (fast.cpu() == ref.cpu()).float().mean() >= 0.9


@pytest.mark.gpu
def test_gpu_fused_projections_greedy_tokens_equal_separate():
    # What `spectra generate --device cuda` runs: a fused, graph-captured step. In fp32 the packed layers
    # decode to an exact fp32 weight, so fused and separate products differ only by fp32 rounding.
    import copy

    from spectra import convert as convert_mod
    from spectra.config import get_config
    from spectra.generate import generate, generate_cuda_graph
    from spectra.model import SpectraLM

    torch.manual_seed(2)
    model = SpectraLM(get_config("mini", weight_kind="ternary", model_parallel_size=2)).cuda().float().eval()
    convert_mod.pack_model(model, "tq1")
    fused = copy.deepcopy(model)
    assert fused.fuse_projections() == 2 * model.config.num_layers
    prompt = torch.randint(0, model.config.vocab_size, (2, 6))
    ref = generate(model, prompt, max_new_tokens=16, temperature=0, fast=False)
    fast = generate_cuda_graph(fused, prompt, max_new_tokens=16, temperature=0)
    assert torch.equal(fast.cpu(), ref.cpu())


def test_growing_workspace_keeps_the_buffers_a_captured_graph_may_use():
    from spectra.kernels import launch_support

    ws_pool = launch_support._Workspace()
    dev = torch.device("cpu")
    ws1, cnt1 = ws_pool.get(dev, 100, 10)
    assert ws_pool.get(dev, 50, 5)[0] is ws1           # big enough: reused
    ws2, cnt2 = ws_pool.get(dev, 1 << 20, 10)           # grows: the old pair stays referenced
    assert ws2.numel() >= 1 << 20 and ws2 is not ws1
    assert any(old is ws1 and c is cnt1 for old, c in ws_pool.retired)
    assert int(cnt2.abs().sum()) == 0 and ws2.numel() >= 2 * ws1.numel()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scale_columns_reference_broadcast_form_equals_per_column_form(dtype):
    # Equal shards take a [.., P, k / P] broadcast (what torch.compile fuses cleanly); it must give the same
    # bits as scaling each column by its shard's scale. Unequal shards take the per-column form itself.
    from spectra.kernels import scale_columns_reference
    from spectra.ternary import expand_scales

    gen = torch.Generator().manual_seed(7)
    for k, parts in ((3072, 6), (96, 8), (100, 3), (7, 7)):
        x = (torch.randn(2, 3, k, generator=gen) * 3).to(dtype)
        scales = torch.rand(parts, generator=gen) + 0.01
        want = (x.float() * expand_scales(scales, (1, k), 1)).to(dtype)
        assert torch.equal(scale_columns_reference(x, scales, k), want), (k, parts)


@pytest.mark.gpu
def test_gpu_tune_shapes_fills_the_user_cache_that_lookup_reads(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path))
    monkeypatch.setattr(configs, "_table", None)
    dev = torch.device("cuda")
    shape = (200, 136)  # (n, k): in no shipped table
    entries = tuning.tune_shapes([shape], ("tq2",), (3,), log=lambda msg: None)
    (key, cfg), = entries.items()
    assert (tmp_path / "kernel_configs.json").is_file()
    monkeypatch.setattr(configs, "_table", None)  # read back from the file
    assert configs.lookup_config("tq2", *shape, 3, torch.float16, 0, dev) == cfg


def _kernel_resources():
    """benchmarks/kernel_resources.py, which compiles kernels ahead of time for sm_90a with the installed Triton
    (no GPU needed); skips where this Triton has no NVIDIA backend."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "kernel_resources.py"
    spec = importlib.util.spec_from_file_location("kernel_resources", path)
    kernel_resources = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(kernel_resources)
    except ImportError as err:  # a Triton without the NVIDIA backend
        pytest.skip(f"cannot compile for sm_90a here: {err}")
    return kernel_resources


def test_shared_memory_plan_bounds_what_triton_allocates():
    # candidate_configs drops configs whose planned shared memory (smem_bytes) exceeds SMEM_LIMIT; the plan must
    # not be below what the compiler really allocates, or a kept candidate could fail to launch on the GPU.
    kernel_resources = _kernel_resources()
    for fmt, cfg in (("tq2", configs.KernelConfig("tc", 16, 64, 64, 1, 4, 3)),
                     ("tq2", configs.KernelConfig("tc", 16, 128, 64, 2, 8, 6)),
                     ("tq1", configs.KernelConfig("tc", 64, 64, 64, 1, 4, 3))):
        kernel = kernel_resources.compile_config(fmt, cfg)
        assert 0 < kernel.metadata.shared <= configs.smem_bytes(cfg, fmt), (fmt, cfg, kernel.metadata.shared)


def test_gluon_kernels_compile_for_sm90_as_designed():
    # The Gluon kernels cannot run here, but they compile: a Gluon API change in a new Triton shows up in CI
    # (the dispatcher would fall back to the portable kernel on a GPU, with one warning). The streaming kernel's
    # design is registers only: no shared-memory staging (the split-k epilogue's few bytes aside), no spills, and
    # mma.sync (HMMA) in its K loop; the wgmma kernel stages its activations in shared memory and runs HGMMA.
    kernel_resources = _kernel_resources()
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no Gluon")
    from spectra.kernels import gluon_launch, tq_gluon

    # the host side repeats the kernels' tile constants (it must import without Gluon): they must agree
    assert (gluon_launch.BN, gluon_launch.STREAM_BJ) == (tq_gluon.BN.value, tq_gluon.STREAM_BJ.value)
    for fmt, dtype in (("tq2", "fp16"), ("tq1", "bf16")):
        kernel = kernel_resources.compile_config(fmt, configs.KernelConfig("stream", 8, 64, 64, 2, 4), dtype)
        usage = kernel_resources.resource_usage(kernel.asm["cubin"])
        assert kernel.metadata.shared <= 64 and usage.get("LOCAL", 0) == 0, (fmt, usage, kernel.metadata.shared)
        assert kernel_resources.loop_op_counts(kernel.asm["cubin"])["HMMA"] > 0
    kernel = kernel_resources.compile_config("tq2", configs.KernelConfig("gluon", 8, 64, 64, 4), "fp16", 3072)
    usage = kernel_resources.resource_usage(kernel.asm["cubin"])
    assert kernel.metadata.shared > 0 and usage.get("LOCAL", 0) == 0, (usage, kernel.metadata.shared)
    assert kernel_resources.loop_op_counts(kernel.asm["cubin"])["HGMMA"] > 0
