"""Sequence-parallel reduce-scatter over symmetric memory: plain NVLink P2P, signal-pad barrier.

Papers:

- Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer Models"
  (arXiv:2205.05198): sequence parallelism turns the all-reduce after each row-parallel layer
  into a reduce-scatter along the sequence (and an all-gather before the next column-parallel
  one).
- Wang et al., 2022, "Overlap Communication with Dependent Computation via Decomposition in
  Large Deep Learning Models" (ASPLOS'23), and PyTorch's async TP / symmetric memory
  (``torch.distributed._symmetric_memory``): peers' buffers mapped into every GPU's address
  space, so a kernel reads and writes them with ordinary loads and stores over NVLink.

Math. Rank r holds a partial ``x_r`` of shape ``(outer, S, inner)`` (the scatter dim in the
middle, ``S = W * S_loc``). Seen as ``(outer, W, M)`` with ``M = S_loc * inner``, rank r's output
is ``out_r[o, :] = sum_{p=0..W-1} x_p[o, r, :]``, summed **in fp32 in the order p = 0..W-1**
and rounded once to the input dtype (NCCL sums bf16 pairwise in a ring order; for W > 2 this
is more accurate, and deterministic).

Protocol (one kernel launch per call, ``W`` <= 8 ranks; multicast is never used: only plain
loads, stores and atomics on peers' memory):

1. **push**: every program copies its tiles of the chunks ``c != r`` of its local ``x`` into
   peer c's symmetric buffer, slot r (``buf_c[r, o, :] = x_r[o, c, :]``). The buffers are
   double-buffered (call N uses half N mod 2).
2. **barrier** (per program, the "blockwise barrier" of PyTorch's symm-mem recipes): every
   thread fences its stores at system scope (``fence.acq_rel.sys``), the block synchronizes,
   then for each peer p one thread CASes ``pad_p[slot0 + pid*W + r]`` from 0 to 1 with
   *release* semantics at system scope, and then CASes its own ``pad_r[slot0 + pid*W + p]``
   from 1 back to 0 with *acquire* semantics, spinning until each succeeds; a block sync and
   a system fence follow. The pads are left zeroed (reusable without host resets).
3. **reduce**: every program sums, for its tiles, slot p of its own buffer for p != r and
   its own ``x`` for p == r, in fp32, and writes ``out``.

Reduce-only mode (``PUSH=False, OWN_FROM_BUF=True``: :func:`launch_reduce_slots`), the last step
of the fused row-parallel matmul (``dtensor_parallel/tensor_parallel/matmul_reduce_scatter.py``):
the peers' partials already arrived by copy-engine copies (or GEMM stores) stream-ordered before
the launch, and the own partial sits in slot r of the own buffer; the same barrier (now merely
"every peer's copies are done") and the same fp32 rank-order sum follow.

Why program ``pid`` may read what peers' programs ``pid`` pushed: tiles are assigned by the
same grid-stride loop on every rank (same shape, same grid). Why it is deadlock-free: the grid
is at most the number of SMs (and small blocks), so every program of the launch can be
resident at once; a program only waits for the program of the same id on each peer, which
every rank launches because every rank calls the collective in the same order (as with NCCL);
a CAS 0 -> 1 waits only for the peer to consume the previous call's signal. Why one barrier
per call suffices: rank r's push of call N+2 into peer c's half (N mod 2) starts after rank
r's launch N+1 completed, whose barrier means peer c entered launch N+1, so c's launch N (the
last reader of that half) is complete. This needs each rank's launches ordered (one stream,
or the caller waits on the previous stream: ``dtensor_parallel.tensor_parallel.sp_reduce_scatter``).

A lighter barrier (one program per rank signalling the peers after a grid-wide local count of
finished pushes, the others waiting on a local flag) would trade (programs x peers) remote CAS
for a local grid barrier that every program must still cross; not done until the benchmark's
``ours_barrier_only_cuda_graph`` rows show the barrier matters (the issue-6 floor looked like
host launch time: flat 0.13-0.17 ms whatever the size).

Launch configuration is a fixed heuristic, not autotuned: an autotuner would time configs
independently per rank, and ranks launching different grids would deadlock in the barrier.

Interpreter (``TRITON_INTERPRET=1``): the fences (inline PTX) are compiled out; the phases are
constexpr flags, so :func:`reduce_scatter_simulated` runs the same push and reduce code with a
stacked tensor standing in for the peers' buffers, and the barrier's CAS logic runs against
pre-set pads in the tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["MAX_WORLD", "SUPPORTED_DTYPES", "LaunchConfig", "launch", "launch_config", "launch_reduce_scatter",
           "launch_reduce_slots", "pad8", "reduce_scatter_simulated", "sp_reduce_scatter_ref"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_WORLD = 8
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _pick(p: tl.constexpr, P0, P1, P2, P3, P4, P5, P6, P7):
    """The pointer of rank p (p is a compile-time constant)."""
    ptr = P0
    if p == 1:
        ptr = P1
    if p == 2:
        ptr = P2
    if p == 3:
        ptr = P3
    if p == 4:
        ptr = P4
    if p == 5:
        ptr = P5
    if p == 6:
        ptr = P6
    if p == 7:
        ptr = P7
    return ptr


@triton.jit
def _fence_system():
    """Every thread: its earlier memory operations are ordered before its later ones at
    system scope (peers included)."""
    tl.inline_asm_elementwise("fence.acq_rel.sys;\nmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _signal_barrier(S0, S1, S2, S3, S4, S5, S6, S7, slot, RANK: tl.constexpr, WORLD: tl.constexpr,
                    FENCE: tl.constexpr):
    """Program-level barrier with the same program on every peer (see the module docstring).
    Scalar atomics run on one thread of the program; the spin result is broadcast."""
    if FENCE:
        _fence_system()
    tl.debug_barrier()
    for p in tl.static_range(WORLD):
        if p != RANK:  # tell peer p: our pushes for this program are visible
            pad = _pick(p, S0, S1, S2, S3, S4, S5, S6, S7)
            old = tl.atomic_cas(pad + slot + RANK, 0, 1, sem="release", scope="sys")
            while old != 0:
                old = tl.atomic_cas(pad + slot + RANK, 0, 1, sem="release", scope="sys")
    own = _pick(RANK, S0, S1, S2, S3, S4, S5, S6, S7)
    for p in tl.static_range(WORLD):
        if p != RANK:  # wait for peer p's signal and consume it (reset to 0)
            old = tl.atomic_cas(own + slot + p, 1, 0, sem="acquire", scope="sys")
            while old != 1:
                old = tl.atomic_cas(own + slot + p, 1, 0, sem="acquire", scope="sys")
    tl.debug_barrier()
    if FENCE:
        _fence_system()


@triton.jit(do_not_specialize=["OUTER"])  # an int arg equal to 1 would become a Python int
def _sp_reduce_scatter_kernel(
        X, OUT, B0, B1, B2, B3, B4, B5, B6, B7, S0, S1, S2, S3, S4, S5, S6, S7,
        OUTER, M, stride_xo, stride_oo, SLOT0,
        RANK: tl.constexpr, WORLD: tl.constexpr, PUSH: tl.constexpr, BARRIER: tl.constexpr,
        REDUCE: tl.constexpr, OWN_FROM_BUF: tl.constexpr, FENCE: tl.constexpr, BLOCK: tl.constexpr):
    """X (OUTER, WORLD*M) rows of stride stride_xo (unit inner stride); OUT (OUTER, M);
    B_p: rank p's buffer half, (WORLD slots, OUTER, M) contiguous; S_p: rank p's signal pad.
    OWN_FROM_BUF (reduce-only use by the fused matmul): this rank's own partial is slot RANK
    of its own buffer, not X (X is then never read)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    tiles_per_row = tl.cdiv(M, BLOCK)
    n_tiles = OUTER * tiles_per_row
    slot_elems = OUTER.to(tl.int64) * M  # elements of one (OUTER, M) slot
    if PUSH:
        for t in range(pid, n_tiles, nprog):
            row = (t // tiles_per_row).to(tl.int64)
            cols = (t % tiles_per_row) * BLOCK + tl.arange(0, BLOCK)
            mask = cols < M
            for c in tl.static_range(WORLD):
                if c != RANK:
                    v = tl.load(X + row * stride_xo + c * M + cols, mask=mask)
                    dst = _pick(c, B0, B1, B2, B3, B4, B5, B6, B7)
                    tl.store(dst + RANK * slot_elems + row * M + cols, v, mask=mask)
    if BARRIER:
        _signal_barrier(S0, S1, S2, S3, S4, S5, S6, S7, SLOT0 + pid * WORLD, RANK, WORLD, FENCE)
    if REDUCE:
        own = _pick(RANK, B0, B1, B2, B3, B4, B5, B6, B7)
        for t in range(pid, n_tiles, nprog):
            row = (t // tiles_per_row).to(tl.int64)
            cols = (t % tiles_per_row) * BLOCK + tl.arange(0, BLOCK)
            mask = cols < M
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for p in tl.static_range(WORLD):  # fixed order p = 0..W-1 on every rank
                if p == RANK and not OWN_FROM_BUF:
                    v = tl.load(X + row * stride_xo + RANK * M + cols, mask=mask, other=0.0)
                else:
                    v = tl.load(own + p * slot_elems + row * M + cols, mask=mask, other=0.0)
                acc += v.to(tl.float32)
            tl.store(OUT + row * stride_oo + cols, acc.to(OUT.dtype.element_ty), mask=mask)


def _config(m: int) -> tuple[int, int]:
    """(BLOCK elements, num_warps). Interpreter: tiles smaller than the test shapes (tails)."""
    if _INTERPRET:
        return min(64, triton.next_power_of_2(max(m, 1))), 1
    block = min(4096, max(512, triton.next_power_of_2(m)))
    return block, (16 if block >= 4096 else 8 if block >= 2048 else 4)


def pad8(ts: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """W per-rank tensors as the kernel's 8 pointer arguments. The unused ones are None:
    Triton makes a None argument a constexpr, so it is neither specialized (``data_ptr`` and
    alignment checks) nor passed by the launcher per call (was: rank 0's tensor repeated, 12
    extra tensor arguments per launch at W = 2); ``_pick`` never reaches them (p < WORLD)."""
    return list(ts) + [None] * (MAX_WORLD - len(ts))


@dataclass(frozen=True)
class LaunchConfig:
    """Grid and tile of one (outer, M) call shape: computed once per shape and cached by the
    caller, so the per-call path (:func:`launch`) does no checks and no arithmetic."""

    outer: int
    m: int
    block: int
    warps: int
    grid: tuple[int]


def launch_config(outer: int, m: int, max_programs: int) -> LaunchConfig:
    block, warps = _config(m)
    n_tiles = outer * triton.cdiv(m, block)
    return LaunchConfig(outer, m, block, warps, (max(1, min(n_tiles, max_programs)),))


def launch(cfg: LaunchConfig, x: torch.Tensor, out: torch.Tensor, stride_xo: int, stride_oo: int,
           buffers8: list[torch.Tensor], pads8: list[torch.Tensor], rank: int, world: int, slot0: int, *,
           push: bool = True, barrier: bool = True, reduce: bool = True, own_from_buf: bool = False) -> None:
    """The bare launch: arguments already validated (:func:`launch_reduce_scatter`,
    :func:`launch_reduce_slots`, or the caller's per-shape cache), buffers and pads already
    padded to 8 (:func:`pad8`); x and out may be N-D (only their pointers and the given row
    strides are used, so no per-call views). ``JITFunction.run`` directly: no ``kernel[grid]``
    closure per call."""
    _sp_reduce_scatter_kernel.run(
        x, out, *buffers8, *pads8, cfg.outer, cfg.m, stride_xo, stride_oo, slot0,
        RANK=rank, WORLD=world, PUSH=push, BARRIER=barrier, REDUCE=reduce, OWN_FROM_BUF=own_from_buf,
        FENCE=not _INTERPRET, BLOCK=cfg.block, num_warps=cfg.warps, grid=cfg.grid, warmup=False)


def _check_common(out: torch.Tensor, buffers: list[torch.Tensor], pads: list[torch.Tensor] | None, rank: int,
                  barrier: bool) -> int:
    world = len(buffers)
    if not 1 <= world <= MAX_WORLD or not 0 <= rank < world:
        raise ValueError(f"sp reduce-scatter: world size {world}, rank {rank}: need 1 <= W <= {MAX_WORLD}")
    if out.dim() != 2 or out.stride(1) != 1 or out.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"sp reduce-scatter: out {tuple(out.shape)} ({out.dtype}, strides {out.stride()}) must be "
                         f"(outer, M) with a unit last stride and one dtype of {SUPPORTED_DTYPES}")
    if barrier and (pads is None or len(pads) != world):
        raise ValueError("sp reduce-scatter: the barrier needs one signal pad per rank")
    return world


def launch_reduce_scatter(x: torch.Tensor, out: torch.Tensor, buffers: list[torch.Tensor],
                          pads: list[torch.Tensor] | None, rank: int, *, slot0: int = 0,
                          max_programs: int = 132, push: bool = True, barrier: bool = True,
                          reduce: bool = True) -> torch.Tensor:
    """One launch of the kernel (the protocol of the module docstring), with checks.

    Args:
        x: (outer, W*M) this rank's partial sums, unit stride in the last dim.
        out: (outer, M) this rank's result, unit stride in the last dim.
        buffers: W tensors, rank p's buffer half (at least W*outer*M elements, x's dtype,
            16-byte aligned): peers' symmetric memory, or rows of a stacked tensor.
        pads: W int32 signal pads (rank p's), or None with ``barrier=False``.
        rank: this rank (0 <= rank < W).
        slot0, max_programs: first signal slot used, and the grid cap; the caller guarantees
            ``slot0 + max_programs * W`` slots in every pad and identical values on all ranks.
        push / barrier / reduce: which phases run (all three for the real collective).
    """
    world = _check_common(out, buffers, pads, rank, barrier)
    if x.dim() != 2 or x.shape[0] != out.shape[0] or x.shape[1] != world * out.shape[1]:
        raise ValueError(f"sp reduce-scatter: x {tuple(x.shape)} must be (outer, W*M) and out "
                         f"{tuple(out.shape)} (outer, M) with W={world}")
    if x.stride(1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"sp reduce-scatter: x ({x.dtype}, strides {x.stride()}) and out ({out.dtype}, "
                         f"strides {out.stride()}) need unit last strides and one dtype of {SUPPORTED_DTYPES}")
    if out.numel() == 0:
        return out
    cfg = launch_config(out.shape[0], out.shape[1], max_programs)
    pads8 = pad8(pads) if pads is not None else [None] * MAX_WORLD
    launch(cfg, x, out, x.stride(0), out.stride(0), pad8(buffers), pads8, rank, world, slot0, push=push,
           barrier=barrier, reduce=reduce)
    return out


def launch_reduce_slots(out: torch.Tensor, buffers: list[torch.Tensor], pads: list[torch.Tensor] | None,
                        rank: int, *, slot0: int = 0, max_programs: int = 132, barrier: bool = True) -> torch.Tensor:
    """Barrier and reduce only (the fused matmul's last step): every rank's partial already
    sits in the buffers, slot p of rank r's buffer holding rank p's partial of chunk r (its
    own, p == r, included); ``out = sum_p slot p`` in fp32, rank order. Same kernel, same
    barrier as the full collective (``PUSH=False, OWN_FROM_BUF=True``)."""
    world = _check_common(out, buffers, pads, rank, barrier)
    if any(b.dtype != out.dtype or b.numel() < world * out.numel() for b in buffers):
        raise ValueError(f"sp reduce-scatter: buffers must be {out.dtype} with >= {world} x {out.numel()} elements")
    if out.numel() == 0:
        return out
    cfg = launch_config(out.shape[0], out.shape[1], max_programs)
    launch(cfg, out, out, 0, out.stride(0), pad8(buffers), pad8(pads) if pads is not None else [None] * MAX_WORLD,
           rank, world, slot0, push=False, barrier=barrier, own_from_buf=True)
    return out


def _as_chunks(x: torch.Tensor, dim: int, world: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x (..., S, ...) -> its (outer, W*M) view (contiguous) and the output shape."""
    dim = dim % x.dim()
    if x.shape[dim] % world:
        raise ValueError(f"sp reduce-scatter: dim {dim} of {tuple(x.shape)} is not divisible by {world}")
    out_shape = x.shape[:dim] + (x.shape[dim] // world,) + x.shape[dim + 1:]
    outer = 1
    for s in x.shape[:dim]:
        outer *= s
    return x.contiguous().view(outer, -1), out_shape


def reduce_scatter_simulated(xs: torch.Tensor, dim: int, max_programs: int = 3) -> torch.Tensor:
    """The kernel's push and reduce phases on one device, a stacked tensor standing in for
    the peers' symmetric buffers: ``xs`` (W, *shape) holds every rank's partial; returns
    (W, *chunk shape), rank r's reduce-scatter output in row r. No barrier (the phases are
    separate launches: every rank pushes, then every rank reduces)."""
    world = xs.shape[0]
    views = [_as_chunks(xs[p], dim, world) for p in range(world)]
    out_shape = views[0][1]
    outer, wm = views[0][0].shape
    bufs = torch.zeros(world, world * outer * (wm // world), dtype=xs.dtype, device=xs.device)  # (W, W*outer*M)
    outs = torch.empty((world, outer, wm // world), dtype=xs.dtype, device=xs.device)  # (W, outer, M)
    for p in range(world):
        launch_reduce_scatter(views[p][0], outs[p], list(bufs), None, p, max_programs=max_programs,
                              barrier=False, reduce=False)
    for p in range(world):
        launch_reduce_scatter(views[p][0], outs[p], list(bufs), None, p, max_programs=max_programs,
                              push=False, barrier=False)
    return outs.view(world, *out_shape)


def sp_reduce_scatter_ref(xs: torch.Tensor, dim: int, *, upcast: bool = True) -> torch.Tensor:
    """Plain-PyTorch reference: xs (W, *shape) -> (W, *chunk shape), chunk r of the sum over
    ranks, summed in fp32 in rank order (``upcast=False``: in the input dtype, PyTorch's own
    rounding, as a tolerance yardstick)."""
    world = xs.shape[0]
    acc_dtype = torch.promote_types(xs.dtype, torch.float32) if upcast else xs.dtype
    total = xs[0].to(acc_dtype)
    for p in range(1, world):
        total = total + xs[p].to(acc_dtype)
    return torch.stack(total.chunk(world, dim=dim % (xs.dim() - 1))).to(xs.dtype)
