"""What every launcher of the packed kernels shares (dispatch, cached plans, the Gluon launcher, decode
attention, the compiled CPU product): the split-k workspace, how per-shard scales reach a kernel, and the
switch that turns a fast path off at its first failure."""

from __future__ import annotations

import functools
import os
import warnings

import torch


class _Workspace:
    """Per-device fp32 slots for split-k / stream-K partial tiles and their arrival counters (the kernels
    leave the counters at zero; the slots are overwritten by every launch).

    A grown workspace never frees the buffers it replaces: a CUDA graph captured earlier (a decode step) keeps
    their addresses, and a later, larger launch (the prompt's prefill) must not hand that memory to other
    tensors while the graph can still replay into it.
    """

    def __init__(self) -> None:
        self.buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.retired: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, device: torch.device, numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        ws, cnt = self.buffers.get(device, (None, None))
        if ws is None or ws.numel() < numel or cnt.numel() < tiles:
            if ws is not None:
                self.retired.append((ws, cnt))
            # grow geometrically so a sequence of growing launches retires few buffers
            size = max(numel, 0 if ws is None else 2 * ws.numel(), 1 << 16)
            ntiles = max(tiles, 0 if cnt is None else 2 * cnt.numel(), 1024)
            ws = torch.zeros(size, dtype=torch.float32, device=device)
            cnt = torch.zeros(ntiles, dtype=torch.int32, device=device)
            self.buffers[device] = (ws, cnt)
        return ws, cnt


def split_k_slots(split: int, m: int, programs: int, rows: int) -> int:
    """fp32 workspace slots a split-k launch needs (1 unsplit): the kernels give every split, activation row and
    program row its own slot (programs x rows per program can pass n: SwiGLU pairs, a partial last program)."""
    return split * m * programs * rows if split > 1 else 1


def fused_slots(fusion) -> tuple[str, ...]:
    """A product kernel's tensor arguments past (x, w, s, y) that a plans.Fusion uses, in call order."""
    return ("xr_ptr",) * fusion.norm + ("res_ptr",) * fusion.residual + ("g_ptr", "y2_ptr") * fusion.gain


def fused_args(fusion, n: int, k: int, block_k: int) -> dict:
    """The fused-epilogue arguments of the product kernels for a plans.Fusion (None: none), row tensors
    contiguous; block_k: the most values per step of the norm's sum of squares (at most k's power of two)."""
    n_out = n // 2 if fusion is not None and fusion.swiglu else n
    args = dict(NORM=False, SWIGLU=False, RESIDUAL=False, GAIN=False, stride_xrm=k, stride_rm=n_out,
                stride_y2m=n_out, eps=0.0, BK=min(block_k, 1 << (k - 1).bit_length()))
    if fusion is not None:
        args.update(NORM=fusion.norm, SWIGLU=fusion.swiglu, RESIDUAL=fusion.residual, GAIN=fusion.gain,
                    eps=fusion.eps)
    return args


def scale_mode(scales: torch.Tensor, shard_axis: int) -> int:
    return 0 if scales.numel() == 1 else 1 if shard_axis == 0 else 2


def scale_columns(x2: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """x2 [m, k] times the scale of each column's shard (P tensor_split shards of k), computed in fp32 and cast
    back to x2's dtype, in one kernel (reference: scale_columns_reference): how the tensor-core kernels take
    column-shard scales."""
    import triton

    from .tq_triton import tq_scale_columns_kernel  # optional: triton

    m = x2.shape[0]
    out = torch.empty((m, in_features), dtype=x2.dtype, device=x2.device)
    bk = 1024
    tq_scale_columns_kernel[(m, triton.cdiv(in_features, bk))](x2, scales, out, m, in_features, scales.numel(),
                                                                x2.stride(0), BK=bk, num_warps=4)
    return out


WORKSPACE = _Workspace()


def pdl_enabled(device: torch.device) -> bool:
    """Programmatic dependent launch: a Hopper-or-newer GPU and a Triton with the griddepcontrol intrinsics;
    SPECTRA_PDL=0 turns it off (to compare). Every kernel of a decode step is launched with it: it signals at
    its start that the next launch may begin, and waits for the kernels before it only where it first reads
    their output (the products load their first weights before that wait)."""
    return device.type == "cuda" and _pdl_supported(device.index, os.environ.get("SPECTRA_PDL"))


@functools.cache  # pointwise launches ask on every call
def _pdl_supported(index: int | None, switch: str | None) -> bool:
    from . import tq_triton  # optional: triton

    return (tq_triton.gdc_wait is not None and switch != "0"
            and torch.cuda.get_device_capability(index)[0] >= 9)


class FastPathSwitch:
    """A fast path that turns itself off for the rest of the process at its first failure (a compiler that
    cannot build it), with one warning line giving the first reason; callers then take `instead`."""

    def __init__(self, name: str, instead: str) -> None:
        self.name, self.instead = name, instead
        self.broken: str | None = None  # why the fast path is off in this process, or None

    def disable(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            warnings.warn(f"spectra: {self.name} is unavailable ({reason}); using {self.instead}", RuntimeWarning,
                          stacklevel=4)


# Calling the compiled kernel's launcher directly skips Triton's per-call argument binding. The GPU tests of the
# decode paths passed with it on an H100 (2026-12-07, Triton 3.6: generation, CUDA graphs, fused projections,
# the GEMV kernel with PDL), and it cut the host time of an eager call from 20.2 to 6.0 us, so it is on;
# SPECTRA_DIRECT_LAUNCH=0 sends every launch through Triton's JIT entry instead (=1 forces it where unverified).
DIRECT_LAUNCH_VERIFIED_ON_GPU = True


def direct_launch_enabled() -> bool:
    return os.environ.get("SPECTRA_DIRECT_LAUNCH", "1" if DIRECT_LAUNCH_VERIFIED_ON_GPU else "0") == "1"


class Launch:
    """One launch of a Triton kernel with a fixed grid and fixed non-tensor arguments; the tensors named in
    `slots` change per call. The first call goes through Triton's JIT (compiling if needed) and keeps the
    compiled kernel; later calls go straight to its launcher. Under TRITON_INTERPRET there is no compiled
    kernel and every call goes through the interpreter."""

    __slots__ = ("fn", "grid", "args", "slots", "options", "run", "function", "metadata", "compiled")

    def __init__(self, fn, grid: tuple[int, int, int], named: dict, slots: tuple[str, ...], options: dict):
        self.fn, self.grid, self.options = fn, grid, options
        self.args = [named.get(name) for name in fn.arg_names]
        self.slots = tuple(fn.arg_names.index(name) for name in slots)
        self.compiled = None
        # the compiled kernel's launcher; False: Triton's JIT entry launches (launcher not verified, or not ours)
        self.run = None if direct_launch_enabled() else False

    def compile(self, *tensors: torch.Tensor) -> None:
        """Compile now for these slot tensors (raises what the compiler raises) instead of at the first call."""
        args = list(self.args)
        for i, t in zip(self.slots, tensors):
            args[i] = t
        compiled = self.fn.warmup(*args, grid=self.grid, **self.options)
        if self.run is not False:
            self.run, self.function, self.metadata = compiled.run, compiled.function, compiled.packed_metadata
            self.compiled = compiled

    def __call__(self, *tensors: torch.Tensor) -> None:
        args = list(self.args)
        for i, t in zip(self.slots, tensors):
            args[i] = t
        if self.compiled is None:
            compiled = self.fn[self.grid](*args, **self.options)
            if compiled is not None and hasattr(compiled, "packed_metadata") and self.run is not False:
                self.run, self.function, self.metadata = compiled.run, compiled.function, compiled.packed_metadata
                self.compiled = compiled
            return
        from triton import knobs

        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        # the stream Triton's own launch path takes: the current one of the current device
        stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
        if _hooked(enter) or _hooked(leave):  # a profiler's hooks want the metadata Triton's path builds
            meta = self.compiled.launch_metadata(self.grid, stream, *args)
        else:  # no hooks (Triton >= 3.4 holds empty hook chains): the launcher calls none
            enter = leave = meta = None
        g0, g1, g2 = self.grid
        try:
            self.run(g0, g1, g2, stream, self.function, self.metadata, meta, enter, leave, *args)
        except TypeError:
            # a Triton whose launcher takes other arguments (it checks them before launching): use its JIT
            # path for this launch from now on
            self.compiled, self.run = None, False
            self.fn[self.grid](*args, **self.options)


def _hooked(hook) -> bool:
    """A launch hook is installed: a callable, or a non-empty ``triton.knobs.HookChain``."""
    return hook is not None and bool(getattr(hook, "calls", True))


_launches: dict[tuple, Launch] = {}
MAX_LAUNCHES = 4096  # prefill kernels see a grid per prompt length; a full memo is cleared, not grown


def launch(fn, grid: tuple[int, ...], tensors: dict[str, torch.Tensor], scalars: dict, options: dict,
           pdl: bool = False) -> None:
    """Launch the Triton kernel `fn` on `grid` with these tensor and non-tensor arguments, through a
    :class:`Launch` kept per (kernel, grid, non-tensor arguments, options, and each tensor's dtype and 16-byte
    alignment): everything Triton specialises a compiled kernel on, so later calls skip Triton's per-call
    argument binding (host time only; the small kernels between the products, in eager prefill and decoding).

    `pdl`: the kernel has a ``PDL`` constexpr that makes it signal at its start and wait before it reads its
    predecessor's output (the pointwise and attention kernels); it is set, and the kernel launched with PDL,
    where :func:`pdl_enabled` on the tensors' device."""
    values = tuple(tensors.values())
    if pdl:
        on = pdl_enabled(values[0].device)
        scalars = {**scalars, "PDL": on}
        if on:
            options = {**options, "launch_pdl": True}
    key = (fn, grid, tuple(scalars.items()), tuple(options.items()), values[0].device,
           tuple((t.dtype, t.data_ptr() & 15) for t in values))
    run = _launches.get(key)
    if run is None:
        if set(fn.arg_names) != set(tensors) | set(scalars):
            raise ValueError(f"internal: launch of {getattr(fn, '__name__', fn)} needs the arguments "
                             f"{fn.arg_names}, got {[*tensors, *scalars]}")
        if len(_launches) >= MAX_LAUNCHES:
            _launches.clear()
        run = Launch(fn, (*grid, 1, 1)[:3], scalars, tuple(tensors), options)
        _launches[key] = run
    run(*values)
