"""Launch plans: what one eager call of ``ternary_matmul`` needs, worked out once per call signature.

A call signature is everything that decides the launch: format, in_features, shard axis, and the shape,
strides, dtype, device and 16-byte alignment of the activations, packed weights and scales. The first call
with a signature validates the inputs, looks up the kernel config, sizes the grid and the split-k workspace,
and builds the kernels' argument lists (:func:`build_plan`); every later call only allocates its output and
hands the argument list to the launcher of the compiled kernel (Triton's ``CompiledKernel.run``), skipping
Triton's per-call argument binding and specialisation (about 20 us of Python per launch on an H100 host) and
our own validation and config lookup. The saving is host time only: the same kernels run.

Why a signature may reuse a compiled kernel: Triton specialises a kernel on its integer arguments (== 1,
multiple of 16) and on its pointers' 16-byte alignment. The integers of a plan are fixed by the signature,
and the pointers' alignment is part of it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..formats import get_format
from . import configs, dispatch, gluon_launch, launch_support
from .launch_support import Launch


class Fusion(NamedTuple):
    """What a decode product takes into its kernel (``tq_triton.tq_gemv_kernel``'s fused epilogue): the RMSNorm
    factor of its input row (`norm`), SwiGLU over [gate; up] rows (`swiglu`), the residual add (`residual`) and
    the next norm's gain on that sum (`gain`, with `residual`); `eps`: the norm's."""

    norm: bool = False
    swiglu: bool = False
    residual: bool = False
    gain: bool = False
    eps: float = 0.0


NO_FUSION = Fusion()
MAX_PLANS = 4096  # prefill sees many distinct m; a full memo is cleared rather than grown without bound
_plans: dict[tuple, Plan] = {}
_lock = threading.Lock()


def plan_key(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
             shard_axis: int) -> tuple:
    """Everything a launch depends on (see the module docstring), cheap to compute for every call."""
    return (fmt, in_features, shard_axis, x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15,
            packed.shape, packed.stride(), packed.dtype, packed.device, packed.data_ptr() & 15,
            scales.shape, scales.stride(), scales.dtype, scales.device, scales.data_ptr() & 15)


def get_plan(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
             shard_axis: int, builder: Callable[..., Plan] | None = None, fusion: Fusion = NO_FUSION) -> Plan:
    """The cached plan of this call signature, built (inputs validated, config chosen) on first use."""
    key = plan_key(x, packed, fmt, in_features, scales, shard_axis)
    if fusion != NO_FUSION:
        key = (*key, fusion)
    plan = _plans.get(key)
    if plan is None:
        if fusion != NO_FUSION:
            plan = build_plan(x, packed, fmt, in_features, scales, shard_axis, fusion)
        else:
            plan = (builder or build_plan)(x, packed, fmt, in_features, scales, shard_axis)
        with _lock:
            if len(_plans) >= MAX_PLANS:
                _plans.clear()
            _plans[key] = plan
    return plan


def clear_plans() -> None:
    """Forget every plan (after tuning changed the configs, or a test changed the dispatch)."""
    with _lock:
        _plans.clear()


class Plan:
    """A callable ``plan(x, packed, scales) -> y`` for one call signature (see :func:`get_plan`)."""

    __slots__ = ("cfg", "out_shape", "dtype", "device", "flat", "stride_xm", "m", "k", "n", "pre", "main",
                 "dense", "fusion", "fmt", "shard_axis")

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:  # dequantize into cached scratch, then cuBLAS
            w = self.dense(packed, scales)
            return torch.matmul(self._rows(x), w.t()).view(self.out_shape)
        y = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        self.main(self._kernel_rows(x, scales), packed, scales, y)
        return y

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.flat else x.reshape(self.m, self.k).contiguous()

    def _kernel_rows(self, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The activations the kernel reads: x's rows, times the column-shard scales where the plan has them."""
        x2 = self._rows(x)
        if self.pre is not None:  # column-shard scales applied to the activations first
            xs = torch.empty((self.m, self.k), dtype=self.dtype, device=self.device)
            self.pre(x2, scales, xs)
            x2 = xs
        return x2

    def fused(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, norm_of: torch.Tensor | None,
              residual: torch.Tensor | None, gain: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """A plan built with a :class:`Fusion`: y, or (y, y times `gain`) where the fusion has a gain. The
        row tensors are contiguous (``kernels.ternary_matmul_fused`` checks)."""
        if self.main is None:  # no kernel with the epilogue (see build_plan): the separate operations
            from . import ternary_matmul, ternary_matmul_fused_reference

            f = self.fusion
            return ternary_matmul_fused_reference(x, packed, self.fmt, self.k, scales, self.shard_axis,
                                                  norm_of=norm_of, eps=f.eps, swiglu=f.swiglu, residual=residual,
                                                  gain=gain, matmul=ternary_matmul)
        y = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        tensors = [self._kernel_rows(x, scales), packed, scales, y]
        if self.fusion.norm:
            tensors.append(norm_of)
        if self.fusion.residual:
            tensors.append(residual)
        if self.fusion.gain:
            y2 = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
            tensors += [gain, y2]
            self.main(*tensors)
            return y, y2
        self.main(*tensors)
        return y


class _Scratch:
    """Per (device, dtype) dense-weight buffer of the dequantize path, grown geometrically. Like the split-k
    workspace, a replaced buffer is kept alive: a captured CUDA graph may still write into it."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.retired: list[torch.Tensor] = []

    def get(self, device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
        buf = self.buffers.get((device, dtype))
        if buf is None or buf.numel() < numel:
            if buf is not None:
                self.retired.append(buf)
            buf = torch.empty(max(numel, 0 if buf is None else 2 * buf.numel()), dtype=dtype, device=device)
            self.buffers[(device, dtype)] = buf
        return buf


SCRATCH = _Scratch()


def _dense(packed_n: int, fmt: str, k: int, scales_n: int, shard_axis: int, dtype: torch.dtype,
           device: torch.device) -> Callable:
    """Dequantize launch into the cached scratch (same kernel and grid as dispatch.dequantize)."""
    import triton

    from .tq_triton import tq_dequant_kernel  # optional: triton

    q = get_format(fmt).row_bytes(k)
    bn, bj = 32, 128
    mode = 0 if scales_n == 1 else 1 if shard_axis == 0 else 2
    named = dict(N=packed_n, K=k, Q=q, P=scales_n, G=get_format(fmt).trits_per_byte, SCALE_MODE=mode, BN=bn, BJ=bj)
    launch = Launch(tq_dequant_kernel, (triton.cdiv(packed_n, bn), triton.cdiv(q, bj), 1), named,
                    ("w_ptr", "s_ptr", "out_ptr"), dict(num_warps=4))

    def dense(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        w = SCRATCH.get(device, dtype, packed_n * k)[:packed_n * k].view(packed_n, k)
        launch(packed, scales, w)
        return w

    return dense


def _gluon(x: torch.Tensor, packed: torch.Tensor, fmt: str, scales: torch.Tensor, mode: int, cfg, plan: Plan,
           fusion: Fusion = NO_FUSION):
    """The Gluon kernel's launch (`cfg.kind` "gluon" or "stream"), compiled now; None where it cannot run (after
    gluon_launch's one warning if it failed to compile)."""
    if not gluon_launch.runs(cfg.kind, x.device, plan.m, plan.k, x.dtype):
        return None
    if (x.data_ptr() | packed.data_ptr() | scales.data_ptr()) & 15:
        return None  # compiled for 16-byte aligned pointers; rare: this signature runs the portable kernel
    from .tq_gluon import tq_gemv_gluon_kernel, tq_stream_gluon_kernel  # optional: triton's Gluon

    stride_xm = plan.stride_xm
    if mode == 2:
        import triton

        from .tq_triton import tq_scale_columns_kernel  # optional: triton

        bk = 1024
        plan.pre = Launch(tq_scale_columns_kernel, (plan.m, triton.cdiv(plan.k, bk), 1),
                          dict(M=plan.m, K=plan.k, P=scales.numel(), stride_xm=stride_xm, BK=bk),
                          ("x_ptr", "s_ptr", "out_ptr"), dict(num_warps=4))
        stride_xm = plan.k
    # stand-ins with the shapes and alignment of the real tensors; the plan keeps no reference to the weights
    x2 = torch.empty((plan.m, plan.k), dtype=x.dtype, device=x.device)
    n_out = plan.out_shape[-1]
    y = torch.empty((plan.m, n_out), dtype=x.dtype, device=x.device)
    fused = dict(xr_ptr=x2, res_ptr=y, g_ptr=y[0], y2_ptr=y)  # stand-ins of the fused epilogue's row tensors
    slots = ("x_ptr", "w_ptr", "s_ptr", "y_ptr") + launch_support.fused_slots(fusion)
    if cfg.kind == "stream":
        kernel = tq_stream_gluon_kernel
        grid, named, options = gluon_launch.stream_launch_args(x2, packed, fmt, scales, mode, cfg.num_warps,
                                                               cfg.split, y, fusion=fusion)
    elif fusion != NO_FUSION:
        raise ValueError(f"internal: the Gluon kernel {cfg.kind!r} has no fused epilogue")
    else:
        kernel = tq_gemv_gluon_kernel
        grid, named, options = gluon_launch.launch_args(x2, packed, fmt, scales, mode, cfg.block_m, cfg.split, y,
                                                        cfg.block_j)
    named.update({name: None for name in slots}, stride_xm=stride_xm)
    launch = Launch(kernel, grid, named, slots, options)
    try:
        launch.compile(x2, packed, scales, y, *[fused[name] for name in slots[4:]])
    except Exception as exc:  # noqa: BLE001 - any compiler failure: the portable kernel runs instead
        gluon_launch.disable(f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        plan.pre = None
        return None
    return launch


def build_plan(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
               shard_axis: int, fusion: Fusion = NO_FUSION) -> Plan:
    """Validate, choose the config, and precompute every launch argument of this call signature (with a
    `fusion`: the GEMV kernel's, which the caller made sure can take it: ``kernels.fused_matmul_applies``)."""
    import triton

    from . import KERNEL_DTYPES  # the package __init__ defines it after importing this module
    from .tq_triton import (  # optional: triton
        tq_gemv_kernel,
        tq_matmul_kernel,
        tq_matmul_sk_kernel,
        tq_scale_columns_kernel,
    )

    dispatch.check_inputs(x, packed, fmt, in_features, scales, shard_axis)
    if not scales.is_contiguous():
        raise ValueError("internal: ternary_matmul passes contiguous scales")
    n, q = packed.shape
    k = in_features
    m = x.numel() // k
    plan = Plan()
    n_out = n // 2 if fusion.swiglu else n
    plan.out_shape, plan.dtype, plan.device, plan.m, plan.k, plan.n = (*x.shape[:-1], n_out), x.dtype, x.device, m, k, n
    plan.fusion, plan.fmt, plan.shard_axis = fusion, fmt, shard_axis
    # The kernels read rows of x at a fixed stride: a contiguous x of any rank, or a 2-D x with unit column stride.
    plan.flat = x.is_contiguous() or (x.dim() == 2 and x.stride(1) == 1)
    plan.stride_xm = x.stride(0) if plan.flat and x.dim() == 2 else k
    plan.pre = plan.main = plan.dense = None
    mode = launch_support.scale_mode(scales, shard_axis)
    if fusion != NO_FUSION:
        cfg = configs.fused_config(fmt, n, k, m, x.dtype, mode, x.device)
        if cfg is not None and cfg.kind == "stream":
            plan.main = _gluon(x, packed, fmt, scales, mode, cfg, plan, fusion)
            if plan.main is not None:
                plan.cfg = cfg
                return plan
            cfg = configs.fused_config(fmt, n, k, m, x.dtype, mode, x.device, gluon=False)
        if cfg is None or cfg.kind not in ("gemv", "tc"):
            # no kernel with the epilogue takes it (e.g. the Gluon kernel failed to compile): Plan.fused runs the
            # separate operations
            plan.cfg = None
            return plan
    elif x.dtype not in KERNEL_DTYPES:
        # fp32 activations: decode the exact weights, then an fp32 cuBLAS product
        cfg = configs.KernelConfig("dequant")
    else:
        cfg = configs.lookup_config(fmt, n, k, m, x.dtype, mode, x.device)
    if cfg.kind in gluon_launch.KINDS:
        plan.main = _gluon(x, packed, fmt, scales, mode, cfg, plan)
        if plan.main is not None:
            plan.cfg = cfg
            return plan
        # the Gluon kernel cannot take this call (no Gluon here, a failed compile, or pointers not 16-byte
        # aligned): the portable kernel's own tuned entry (a Gluon entry's tiles do not fit that kernel)
        cfg = configs.lookup_config(fmt, n, k, m, x.dtype, mode, x.device, gluon=False)
    if cfg.kind == "gemv" and not dispatch.gemv_usable(packed):
        cfg = configs.heuristic_config(n, k, m, fmt, configs.num_sms(x.device) if x.is_cuda else 4)
    plan.cfg = cfg
    if cfg.kind == "dequant":
        plan.dense = _dense(n, fmt, k, scales.numel(), shard_axis, x.dtype, x.device)
        return plan
    stride_xm = plan.stride_xm
    if mode == 2:
        bk = 1024
        plan.pre = Launch(tq_scale_columns_kernel, (m, triton.cdiv(k, bk), 1),
                          dict(M=m, K=k, P=scales.numel(), stride_xm=stride_xm, BK=bk),
                          ("x_ptr", "s_ptr", "out_ptr"), dict(num_warps=4))
        stride_xm = k
    slots = ("x_ptr", "w_ptr", "s_ptr", "y_ptr")
    if cfg.kind == "gemv":
        grid, _ = dispatch.gemv_grid(m, n, q, cfg, fusion.swiglu)
        ws, cnt = launch_support.WORKSPACE.get(x.device, dispatch.workspace_slots(grid, m, cfg), grid[0] * grid[1])
        pdl = launch_support.pdl_enabled(x.device)
        # the kernel reads x itself, a contiguous copy (not flat) or the column-scaled copy (pre)
        x_vec = dispatch.x_vec_aligned(x, stride_xm, fresh=plan.pre is not None or not plan.flat)
        named = dispatch.gemv_args(fmt, cfg, m, n, k, q, mode, dispatch.FENCE_MODE if x.is_cuda else 0, x_vec,
                                   x.dtype if x.is_cuda else None, pdl, scales.numel(), fusion)
        named.update(ws_ptr=ws, cnt_ptr=cnt, stride_xm=stride_xm, stride_ym=n_out)
        options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **(dict(launch_pdl=True) if pdl else {}))
        plan.main = Launch(tq_gemv_kernel, grid, named, slots + launch_support.fused_slots(fusion), options)
        return plan
    if fusion != NO_FUSION and cfg.kind != "tc":
        raise ValueError(f"internal: a fused product needs a kernel with the epilogue, its config is {cfg}")
    masks = dispatch._column_masks(q, k, get_format(fmt).trits_per_byte, cfg.block_j)
    # the inline-PTX decode and the fences exist on the GPU only (not under TRITON_INTERPRET)
    named = dispatch.kernel_constexprs(fmt, cfg, x.dtype, mode, masks, x.is_cuda,
                                       dispatch.FENCE_MODE if x.is_cuda else 0)
    named.update(M=m, N=n, K=k, Q=q, stride_xm=stride_xm, stride_ym=n, P=scales.numel())
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.kind == "sk":
        programs, tiles_m, tiles_n, steps, total = dispatch.stream_k_grid(m, n, q, cfg, x.device)
        ws, cnt = launch_support.WORKSPACE.get(x.device, programs * 2 * cfg.block_m * cfg.block_n, tiles_m * tiles_n)
        named.update(ws_ptr=ws, cnt_ptr=cnt, TILES_M=tiles_m, STEPS=steps, TOTAL=total)
        plan.main = Launch(tq_matmul_sk_kernel, (programs, 1, 1), named, slots, options)
        return plan
    # the same grid with SWIGLU (a program takes block_n / 2 row pairs)
    grid, j_per_split = dispatch.split_k_grid(m, n, q, cfg)
    ws, cnt = launch_support.WORKSPACE.get(x.device, dispatch.workspace_slots(grid, m, cfg), grid[0] * grid[1])
    named.update(launch_support.fused_args(fusion, n, k, 128), ws_ptr=ws, cnt_ptr=cnt, J_PER_SPLIT=j_per_split,
                 SPLIT_K=grid[2] > 1, stride_ym=n_out)
    plan.main = Launch(tq_matmul_kernel, grid, named, slots + launch_support.fused_slots(fusion), options)
    return plan
