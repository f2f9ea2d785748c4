"""The small kernels between a decode step's matmuls, fused: RMSNorm (optionally after the residual add) and
SwiGLU, each one launch.

Written with PyTorch ops, an eager step launches about seven kernels per RMSNorm (fp32 cast, square, mean,
rsqrt, products, casts), one per residual add and three per SwiGLU: about 17 of a block's 28 launches in a
CUDA-graph decode step, where each costs 1-3 us whatever its size. Every kernel rounds where the PyTorch ops
round (the residual sum and the normalised row to the activation dtype before the gain; silu(gate) before the
product), so results differ from the references only by the order of the fp32 sum of squares.

Under ``torch.compile`` the same kernels run as opaque ops (``spectra::rms_norm``, ``spectra::add_rms_norm``,
``spectra::swiglu``) rather than leaving the ops to inductor: inductor would fuse them into as many kernels,
but its kernels are not launched with PDL, so the packed product after each would wait for it to finish
before starting (compiled 3.9B TQ2 step on an H100: 628 steps/s with inductor's fusion, 684 with these ops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .launch_support import launch

try:
    import triton
    import triton.language as tl

    from .tq_triton import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - CPU-only installs use the references
    triton = None

ENABLED = True  # benchmarks switch the fused kernels off to time the PyTorch ops they replace


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm: normalise in fp32, cast back, then the learned gain."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, RMSNorm of that sum)."""
    total = x + residual
    return total, rms_norm_reference(total, weight, eps)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, N, stride_x, stride_r, eps,
                         BLOCK: tl.constexpr, ADD: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # launched with PDL: the next launch (a product) may start and prefetch its weights; this
            gdc_launch_dependents()  # one's own launch overlapped the kernel before it, whose output it waits for
            gdc_wait()
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        if ADD:
            r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * N + cols, x, mask=ok)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
        y = (xf * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * N + cols, (w.to(tl.float32) * y).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _swiglu_kernel(g_ptr, u_ptr, out_ptr, H, stride_g, stride_u, BLOCK: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # as in _rms_norm_kernel
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < H
        g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * H + cols, (act * u).to(out_ptr.dtype.element_ty), mask=ok)


def fused_pointwise_applies(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether the fused kernels take this call: inference (no autograd) on a CUDA tensor, the gain in the
    activation dtype (eager, or as opaque ops under torch.compile)."""
    return (ENABLED and triton is not None and x.is_cuda and not torch.is_grad_enabled()
            and (weight is None or weight.dtype == x.dtype))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, N] with unit stride along N (a view where possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] != weight.numel() or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm needs x [..., N], a gain of N values and a residual shaped like x; got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, "
                         f"{None if residual is None else tuple(residual.shape)}")
    n = x.shape[-1]
    x2 = _rows(x)
    r2 = x2 if residual is None else _rows(residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    if x2.shape[0]:
        launch(_rms_norm_kernel, (x2.shape[0],),
               dict(x_ptr=x2, r_ptr=r2, w_ptr=weight.contiguous(), out_ptr=out, sum_ptr=total),
               dict(N=n, stride_x=x2.stride(0), stride_r=r2.stride(0), eps=eps, BLOCK=triton.next_power_of_2(n),
                    ADD=residual is not None),
               dict(num_warps=4 if n <= 2048 else 8), pdl=True)
    return total, out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`rms_norm_reference` in one kernel (x [..., N] on a GPU, weight [N] of x's dtype)."""
    if torch.compiler.is_compiling():
        return rms_norm_op(x, weight, eps)
    return _norm(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_rms_norm_reference` in one kernel: (x + residual, RMSNorm of the sum)."""
    if torch.compiler.is_compiling():
        return add_rms_norm_op(x, residual, weight, eps)
    return _norm(x, residual, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one kernel (gate, up [..., H] of one dtype; e.g. the two halves of a fused gate/up)."""
    if torch.compiler.is_compiling():
        return swiglu_op(gate, up)
    return _swiglu(gate, up)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu needs gate and up of one shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
                         f"and {tuple(up.shape)} {up.dtype}")
    h = gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block = min(1024, triton.next_power_of_2(h))
    if g2.shape[0]:
        launch(_swiglu_kernel, (g2.shape[0], triton.cdiv(h, block)), dict(g_ptr=g2, u_ptr=u2, out_ptr=out),
               dict(H=h, stride_g=g2.stride(0), stride_u=u2.stride(0), BLOCK=block), dict(num_warps=4), pdl=True)
    return out


# The kernels as opaque ops for torch.compile (see the module docstring); the fakes give inductor the shapes.
@torch.library.custom_op("spectra::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, None, weight, eps)[1]


@rms_norm_op.register_fake
def _rms_norm_fake(x, weight, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("spectra::add_rms_norm", mutates_args=())
def add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(x, residual, weight, eps)


@add_rms_norm_op.register_fake
def _add_rms_norm_fake(x, residual, weight, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("spectra::swiglu", mutates_args=())
def swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _swiglu(gate, up)


@swiglu_op.register_fake
def _swiglu_fake(gate, up):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
