"""Row-parallel matmul fused with the SP reduce-scatter, chunk by chunk (communication hides
behind the GEMM).

Papers: Wang et al., 2022, "Overlap Communication with Dependent Computation via Decomposition
in Large Deep Learning Models" (ASPLOS'23); PyTorch's async TP (``torch.ops.symm_mem.
fused_matmul_reduce_scatter``), which pulls peers' chunks and sums them with ``torch.sum``; here
the chunks are pushed and summed by the SP reduce-scatter kernel, in fp32, in rank order.

Math. Rank r holds ``x_r`` (..., S, ..., K/W) (the layer's input: the full sequence, its shard of
the inner dim) and ``w_r`` (N, K/W) (``nn.Linear`` layout, ``Shard(1)``); ``y_r = x_r @ w_r^T`` is
a partial sum and the layer's output is ``out_r = sum_p y_p[chunk r of dim S]``. Chunk c of
``y_r`` needs only chunk c of ``x_r``'s rows, so rank r computes the W chunks in the order
``c = r+1, r+2, ..., r (mod W)`` (:func:`chunk_order`): the peers' chunks first, its own last::

    GEMM (main stream):  [chunk r+1][chunk r+2] ... [chunk r -> own slot r]
    copy engine (side):            [push r+1 ][push r+2 ] ...
                                                          [barrier + fp32 sum of slots 0..W-1]

Each peer chunk c goes into a staging tensor (two, reused alternately), and a copy-engine copy on
a side stream pushes it into peer c's symmetric buffer, slot r, while the tensor cores compute the
next chunk (copy engines use no SMs). The own chunk is computed straight into slot r of the own
buffer. Then one launch of the SP reduce-scatter kernel in reduce-only mode (``triton_kernels/
sp_reduce_scatter.py``): its signal-pad barrier (every peer's copies are done), then
``out = sum_p slot p`` in fp32 in the order p = 0..W-1, rounded once: the unfused kernel's result
for the same chunk GEMMs, and NCCL's bit for bit at W = 2. Slot layout: the workspace half of
the call, ``(W slots, outer, S/W * inner, N)``, slot p holding rank p's partial of this rank's
chunk, exactly the unfused kernel's layout, so both share one workspace, one call counter and
its double buffering. ``push="gemm"`` (benchmarks): the GEMM writes the peer's slot itself over
NVLink, no staging and no copy.

Why the double buffering stays safe: the side stream waits for the main stream at the start of
each call, so the pushes of call N go after this rank's launch N-1, whose barrier means every
peer entered launch N-1, so its launch N-2 (the last reader of the half call N writes) is done.

Autograd: forward as above; backward ``g = all_gather(dout, dim)`` (NCCL), ``dx = g @ w``,
``dw = g^T x`` (the unfused layer's backward). The op is the custom op
``torch.ops.dtensor_parallel.matmul_reduce_scatter`` (local tensors, the group by name, a fake
implementation for shapes, ``register_autograd`` for the backward, whose all-gather is a
functional collective): dynamo traces :func:`rowwise_forward` without a graph break (one inside
a checkpointed block would run the whole block eagerly), and selective recompute saves the
op's output instead of rerunning the GEMM and its communication in backward. A bias (``Replicate``) is added after the
reduce-scatter, on the DTensor, so its gradient is ``Partial`` like the SP norm weights'.

Wiring: with ``kernels['sp_reduce_scatter']`` resolved to ``"triton"`` (or to ``"torch"`` under
selective recompute, with ``push="nccl"``: ``rowwise_nccl.py``), every row-parallel plain
``nn.Linear`` under SP becomes a :class:`FusedRowwiseLinear` (``apply_tensor_parallel``) whose
forward runs this op on the local tensors and returns the ``Shard(seq)`` DTensor the rowwise
output hook expects (which then has nothing to redistribute). Whenever the op cannot serve (same
rules as the unfused kernel, plus: input ``Shard(-1)`` and weight ``Shard(1)`` on one 1-D mesh,
scatter dim not the last), the forward is ``F.linear`` on the DTensors and the hook reduce-scatters
(Triton unfused, else NCCL). On CPU under ``TRITON_INTERPRET=1`` (tests) the chunks are exchanged
by a gloo all-gather and the reduce runs in the kernel's code.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from . import sp_reduce_scatter as sprs
from .local_linear import SwappedLinear
from .rowwise_nccl import forward_nccl, nccl_cannot_serve

#: "copy" (copy engine, the default) or "gemm" (the GEMM stores into the peer's slot)
PUSH_MODES = ("copy", "gemm")
#: the op's NCCL form: one GEMM, then a functional reduce-scatter (``rowwise_nccl.py``)
NCCL = "nccl"


def chunk_order(rank: int, world: int) -> list[int]:
    """The chunks rank ``rank`` computes, in order: the next peer's first, its own last."""
    return [(rank + i) % world for i in range(1, world + 1)]


def _gemm(rows: torch.Tensor, wt: torch.Tensor, out: torch.Tensor) -> None:
    """out (b, R, N) = rows (b, R, K) @ wt (K, N); rows is a strided slice of x (no copy):
    one cuBLAS GEMM for b = 1, a strided-batched one (weight batch stride 0) otherwise."""
    if rows.shape[0] == 1:
        torch.mm(rows[0], wt, out=out[0])
    else:
        torch.matmul(rows, wt, out=out)


def produce_chunks(x3: torch.Tensor, wt: torch.Tensor, rank: int, world: int, own: torch.Tensor,
                   dst_for: Callable[[int, int], torch.Tensor],
                   after: Callable[[int, int, torch.Tensor], None] | None = None) -> None:
    """GEMM the W row chunks of ``x3`` (b, W*R, K) in :func:`chunk_order`: chunk ``rank`` into
    ``own`` (b, R, N); chunk c != rank (the i-th computed) into ``dst_for(i, c)``, then
    ``after(i, c, dst)`` (the push). Shared by the GPU path and the CPU emulations."""
    r_loc = x3.shape[1] // world
    for i, c in enumerate(chunk_order(rank, world)):
        rows = x3[:, c * r_loc:(c + 1) * r_loc]  # (b, R, K)
        if c == rank:
            _gemm(rows, wt, own)
        else:
            dst = dst_for(i, c)
            _gemm(rows, wt, dst)
            if after is not None:
                after(i, c, dst)


def _as_3d(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x (*pre, S, *post, K) contiguous -> (outer, S*P, K) and the output shape (*pre, S/W, *post, N)
    without N: chunk c of dim S is the row range c of the middle dim (P = prod(post))."""
    outer = 1
    for s in x.shape[:dim]:
        outer *= s
    return x.view(outer, -1, x.shape[-1]), tuple(x.shape[:-1])


class _FusedPlan:
    """Per (shape, dtype, dim, N) on one workspace: both halves' slot views and the reduce's
    launch arguments (built once; see ``sp_reduce_scatter._CallPlan``)."""

    def __init__(self, ws, outer: int, rows: int, n: int, dtype: torch.dtype):
        from triton_kernels.sp_reduce_scatter import launch_config, pad8

        w, r_loc = ws.world, rows // ws.world
        self.cfg = launch_config(outer, r_loc * n, ws.max_programs)
        self.slots, self.bufs8 = [], []
        for h in (0, 1):
            bufs = ws.buffers(h, dtype, w * outer * r_loc * n)
            views = [b.view(w, outer, r_loc, n) for b in bufs]  # rank p's (W slots, b, R, N)
            # [peer c's slot `rank` for every c, own slot]
            self.slots.append(([v[ws.rank] for v in views], views[ws.rank][ws.rank]))
            self.bufs8.append(pad8(bufs))


def fused_plan(ws, outer: int, rows: int, n: int, dtype: torch.dtype) -> _FusedPlan:
    """The workspace's :class:`_FusedPlan` for this shape (built at the first call)."""
    key = ("fused", outer, rows, n, dtype)
    plan = ws.plans.get(key)
    if plan is None:
        plan = ws.plans[key] = _FusedPlan(ws, outer, rows, n, dtype)
    return plan


class StagedPush:
    """The copy-engine pushes of the peers' chunks: the GEMM of the i-th chunk writes staging
    tensor i % 2 on the main stream (from i = 2 after push i - 2 is done with it), then the
    side stream copies it into peer c's slot (the copy engine, over NVLink) while the next
    chunk's GEMM runs. ``dst_for`` and ``push`` are ``produce_chunks``' two callbacks;
    :meth:`finish` makes the main stream wait for the last push (the staging tensors are
    freed after it, so later main-stream work is ordered)."""

    def __init__(self, ws, peer_slots: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device):
        self.main, self.side, self.peer_slots = ws.stream, ws.side_stream(), peer_slots
        self.side.wait_stream(self.main)  # after the previous launch (double buffering) and the inputs' producers
        self.stage = torch.empty((min(ws.world - 1, 2), *shape), dtype=dtype, device=device)
        self.copied: list[torch.cuda.Event] = []

    def dst_for(self, i: int, c: int) -> torch.Tensor:
        if i >= 2:  # staging tensor i % 2 is free once push i - 2 is done
            self.main.wait_event(self.copied[i - 2])
        return self.stage[i % 2]

    def push(self, i: int, c: int, dst: torch.Tensor) -> None:
        self.side.wait_event(self.main.record_event())
        with torch.cuda.stream(self.side):
            self.peer_slots[c].copy_(dst)  # into peer c's slot `rank`
        self.copied.append(self.side.record_event())

    def finish(self) -> None:
        self.main.wait_stream(self.side)


def reduce_own(plan: _FusedPlan, ws, half: int, outer: int, r_loc: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """The reduce-only kernel: this rank's output (outer, R, N), the fp32 sum in rank order of
    its own slot and the peers' pushes into it (signal-pad barrier first)."""
    from triton_kernels.sp_reduce_scatter import launch

    out = torch.empty((outer, r_loc, n), dtype=like.dtype, device=like.device)
    launch(plan.cfg, out, out, 0, r_loc * n, plan.bufs8[half], ws.pads8, ws.rank, ws.world, sprs._SLOT0,
           push=False, own_from_buf=True)
    return out


def _forward_cuda(x3: torch.Tensor, wt: torch.Tensor, group: dist.ProcessGroup, push: str) -> torch.Tensor:
    outer, rows, _ = x3.shape
    n = wt.shape[1]
    ws = sprs._workspace(group, x3.shape[0] * rows * n * x3.element_size())
    plan = fused_plan(ws, outer, rows, n, x3.dtype)
    rank, world, r_loc = ws.rank, ws.world, rows // ws.world
    half = ws.begin()
    peer_slots, own = plan.slots[half]
    if push == "copy":
        pushes = StagedPush(ws, peer_slots, (outer, r_loc, n), x3.dtype, x3.device)
        produce_chunks(x3, wt, rank, world, own, pushes.dst_for, pushes.push)
        pushes.finish()
    else:  # "gemm": each GEMM stores straight into the peer's slot
        produce_chunks(x3, wt, rank, world, own, lambda i, c: peer_slots[c])
    return reduce_own(plan, ws, half, outer, r_loc, n, x3)


def _forward_emulated(x3: torch.Tensor, wt: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """CPU (interpreter): the same chunk GEMMs in the same order; a gloo all-gather stands in
    for the pushes; the reduce runs in the kernel's code (reduce-only mode)."""
    from triton_kernels.sp_reduce_scatter import launch_reduce_slots

    rank, world = group.rank(), group.size()
    outer, rows, _ = x3.shape
    r_loc, n = rows // world, wt.shape[1]
    send = torch.empty((world, outer, r_loc, n), dtype=x3.dtype, device=x3.device)  # chunk c for peer c
    produce_chunks(x3, wt, rank, world, send[rank], lambda i, c: send[c])
    slots = sprs._gather0(send, group)[:, rank].contiguous()  # (W, b, R, N): slot p = rank p's chunk `rank`
    out = torch.empty((outer, r_loc, n), dtype=x3.dtype, device=x3.device)
    own = slots.view(-1)
    launch_reduce_slots(out.view(outer, -1), [own] * world, None, rank, max_programs=3, barrier=False)
    return out


def _forward(x: torch.Tensor, weight: torch.Tensor, dim: int, group: dist.ProcessGroup,
             push: str = "copy") -> torch.Tensor:
    """Local forward: x (*pre, S, *post, K), weight (N, K) -> (*pre, S/W, *post, N)."""
    x = x.contiguous()
    x3, lead = _as_3d(x, dim)  # (outer, S*P, K)
    wt = weight.t()  # (K, N), a view: cuBLAS reads it transposed, as F.linear does
    if push == NCCL:
        out = forward_nccl(x3, wt, group)
    else:
        out = _forward_cuda(x3, wt, group, push) if x.is_cuda else _forward_emulated(x3, wt, group)
    shape = list(lead)
    shape[dim] //= group.size()
    return out.view(*shape, weight.shape[0])


@torch.library.custom_op("dtensor_parallel::matmul_reduce_scatter", mutates_args=())
def _matmul_reduce_scatter_op(x: torch.Tensor, weight: torch.Tensor, dim: int, group_name: str,
                              push: str) -> torch.Tensor:
    """The fused op on local tensors: opaque to dynamo and inductor (no graph break), and an op
    the selective recompute policy saves (``recompute.py``: no rerun of its communication).
    ``push``: one of :data:`PUSH_MODES` (Triton) or :data:`NCCL`."""
    return _forward(x, weight, dim, sprs._group(group_name), push)


@_matmul_reduce_scatter_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, dim: int, group_name: str, push: str) -> torch.Tensor:
    shape = list(x.shape[:-1])
    shape[dim] //= sprs._group(group_name).size()
    return x.new_empty((*shape, weight.shape[0]))  # (*pre, S/W, *post, N)


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, ctx.dim, ctx.group_name, _ = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad: torch.Tensor):
    """All-gather (functional collective, NCCL) + the two GEMMs: the unfused layer's backward."""
    x, weight = ctx.saved_tensors
    g = sprs._all_gather(grad.contiguous(), ctx.dim, ctx.group_name)  # (*pre, S, *post, N)
    gx = g @ weight if ctx.needs_input_grad[0] else None  # (*pre, S, *post, K)
    gw = None
    if ctx.needs_input_grad[1]:
        gw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # (N, K)
    return gx, gw, None, None, None


_matmul_reduce_scatter_op.register_autograd(_backward, setup_context=_setup_context)


def fused_cannot_serve(x: torch.Tensor, weight: torch.Tensor, dim: int, group: dist.ProcessGroup) -> str | None:
    """Why the fused op cannot take this call, or None; like ``cannot_serve`` it depends only on
    what all ranks share (shapes, dtypes, device type)."""
    if x.dim() < 2 or dim == x.dim() - 1:
        return f"scatter dim {dim} of a {x.dim()}-D input: needs a dim before the last"
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.dtype != x.dtype or weight.device != x.device:
        return f"weight {tuple(weight.shape)} {weight.dtype} for input {tuple(x.shape)} {x.dtype}"
    return sprs.cannot_serve(x, dim, group)


def _cannot_serve(x: torch.Tensor, weight: torch.Tensor, dim: int, group: dist.ProcessGroup, push: str) -> str | None:
    return nccl_cannot_serve(x, weight, dim, group) if push == NCCL else fused_cannot_serve(x, weight, dim, group)


def matmul_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, dim: int, group: dist.ProcessGroup,
                          *, push: str = "copy") -> torch.Tensor:
    """``reduce_scatter(x @ weight.T, dim)`` over ``group``, the communication hidden behind the GEMM.

    Args:
        x: (*pre, S, *post, K) this rank's input (fp16/bf16/fp32), ``S`` divisible by the group size.
        weight: (N, K) this rank's weight shard, ``nn.Linear`` layout, x's dtype.
        dim: the scattered dim of x (the sequence, 1, for SP); not the last.
        group: 2..8 ranks of one NVLink host (symmetric memory); CPU only under the interpreter.
        push: "copy" (copy engine) or "gemm" (GEMM stores into peers' buffers); or "nccl": one
            GEMM and a functional (NCCL, gloo) reduce-scatter, any group size, dtype and device.
    Returns (*pre, S/W, *post, N): this rank's chunk of the sum over ranks (fp32, rank order;
    "nccl": the collective's sum).
    """
    dim = dim % max(x.dim(), 1)
    if push not in (*PUSH_MODES, NCCL):
        raise ValueError(f"push={push!r}: use one of {(*PUSH_MODES, NCCL)}")
    reason = _cannot_serve(x, weight, dim, group, push)
    if reason is not None:
        raise ValueError(f"matmul_reduce_scatter cannot serve this call: {reason}")
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _matmul_reduce_scatter_op(x, weight, dim, group.group_name, push)
    return _forward(x, weight, dim, group, push)  # eager without autograd: no op dispatch


def matmul_reduce_scatter_simulated(xs: torch.Tensor, ws: torch.Tensor, dim: int,
                                    after: Callable[[int, int, torch.Tensor], None] | None = None,
                                    slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on one device, a stacked tensor standing in for the peers' symmetric buffers
    (the GEMMs store into the peers' slots, as ``push="gemm"``): ``xs`` (W, *x shape) and ``ws``
    (W, N, K) hold every rank's input and weight shard. Every rank produces its chunks
    (:func:`produce_chunks`, ``after(i, c, dst)`` called per pushed chunk), then every rank
    reduces (the kernel's reduce-only mode, interpreter on CPU). Returns (W, *out shape), rank
    r's output in row r, and the buffers ``slots`` (W owners, W slots, outer, R, N) (given, or
    new and NaN-filled, so an unwritten slot shows)."""
    from triton_kernels.sp_reduce_scatter import launch_reduce_slots

    world, n = xs.shape[0], ws.shape[1]
    x3s = [_as_3d(xs[p].contiguous(), dim)[0] for p in range(world)]
    outer, rows, _ = x3s[0].shape
    r_loc = rows // world
    if slots is None:
        slots = torch.full((world, world, outer, r_loc, n), float("nan"), dtype=xs.dtype, device=xs.device)
    bufs = slots.view(world, -1)  # [owner c], its (slot p, outer, R, N) flattened
    for p in range(world):
        produce_chunks(x3s[p], ws[p].t(), p, world, slots[p, p], lambda i, c, p=p: slots[c, p], after)
    outs = torch.empty((world, outer, r_loc, n), dtype=xs.dtype, device=xs.device)
    for r in range(world):
        launch_reduce_slots(outs[r].view(outer, -1), list(bufs), None, r, max_programs=3, barrier=False)
    shape = list(xs.shape[1:-1])
    shape[dim] //= world
    return outs.view(world, *shape, n), slots


def matmul_reduce_scatter_ref(xs: torch.Tensor, ws: torch.Tensor, dim: int) -> torch.Tensor:
    """Plain PyTorch: xs (W, *x shape), ws (W, N, K) -> (W, *out shape), rank r's output in row
    r: the chunk GEMMs as the op computes them, summed in fp32 in rank order."""
    from triton_kernels.sp_reduce_scatter import sp_reduce_scatter_ref

    world = xs.shape[0]
    ys = []
    for p in range(world):
        x3, lead = _as_3d(xs[p].contiguous(), dim)
        out = torch.empty((x3.shape[0], x3.shape[1], ws.shape[1]), dtype=xs.dtype)
        r_loc = x3.shape[1] // world
        for c in range(world):
            _gemm(x3[:, c * r_loc:(c + 1) * r_loc], ws[p].t(), out[:, c * r_loc:(c + 1) * r_loc])
        ys.append(out.view(*lead, ws.shape[1]))
    return sp_reduce_scatter_ref(torch.stack(ys), dim)


# ----------------------------------------------------------------------------------------
# Wiring: the row-parallel nn.Linear under SP
# ----------------------------------------------------------------------------------------


def _is_shard(placements: tuple, dim: int, ndim: int) -> bool:
    return len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim % ndim == dim


def rowwise_forward(mod: nn.Linear, x: torch.Tensor, dim: int, push: str = "copy") -> torch.Tensor:
    """The forward of a row-parallel Linear whose output is scattered on ``dim``: the fused
    op on the local tensors when it can serve (every rank decides alike), else ``F.linear``
    on the DTensors (then the output hook reduce-scatters). ``push="nccl"`` under
    ``torch.compile`` takes ``F.linear`` too (``rowwise_nccl.py`` says why).

    A plain ``x`` is this rank's ``Shard(-1)`` block, passed on by the style's input hook in
    eager (``styles._RowwiseParallel``: no DTensor round trip, about 60 us of host time a call);
    the fused op's output then stays a plain ``Shard(dim)`` block for the output hook."""
    w, b = mod.weight, mod.bias
    if not isinstance(x, DTensor) and isinstance(w, DTensor):
        if b is None and w.device_mesh.ndim == 1 and _is_shard(w.placements, 1, 2):
            out = _rowwise_local(x, w, dim, push)
            if out is not None:
                return out
        x = DTensor.from_local(x, w.device_mesh, [Shard(x.ndim - 1)], run_check=False)
    if (not isinstance(x, DTensor) or not isinstance(w, DTensor) or x.device_mesh.ndim != 1
            or w.device_mesh != x.device_mesh or (push == NCCL and torch.compiler.is_compiling())):
        return F.linear(x, w, b)
    mesh, ndim = x.device_mesh, x.ndim
    dim = dim % ndim
    if (not _is_shard(x.placements, ndim - 1, ndim) or not _is_shard(w.placements, 1, 2)
            or (b is not None and (not isinstance(b, DTensor) or b.placements != (Replicate(),)))):
        return F.linear(x, w, b)
    xl = x.to_local(grad_placements=[Shard(ndim - 1)])  # its gradient: this rank's K shard, complete
    wl = w.to_local(grad_placements=[Shard(1)])  # likewise
    if torch.is_autocast_enabled(xl.device.type):  # what F.linear does under autocast
        dtype = torch.get_autocast_dtype(xl.device.type)
        xl, wl = xl.to(dtype), wl.to(dtype)
    group = mesh.get_group()
    if _cannot_serve(xl, wl, dim, group, push) is not None:
        return F.linear(x, w, b)
    with torch.autocast(xl.device.type, enabled=False):
        out = matmul_reduce_scatter(xl, wl, dim, group, push=push)
    out = DTensor.from_local(out, mesh, [Shard(dim)], run_check=False)
    if b is not None:  # after the sum (Replicate); its gradient is Partial, reduced like the norms'
        out = out + (b if b.dtype == out.dtype else b.to(out.dtype))
    return out


def _rowwise_local(x: torch.Tensor, w: DTensor, dim: int, push: str) -> torch.Tensor | None:
    """The fused op on a plain ``Shard(-1)`` input block and the ``Shard(1)`` weight's local
    shard: the local ``Shard(dim)`` output, or None where the op cannot serve."""
    wl = w.to_local(grad_placements=[Shard(1)])  # its gradient: this rank's K shard, complete
    xl = x
    if torch.is_autocast_enabled(x.device.type):  # what F.linear does under autocast
        dtype = torch.get_autocast_dtype(x.device.type)
        xl, wl = xl.to(dtype), wl.to(dtype)
    group = w.device_mesh.get_group()
    if _cannot_serve(xl, wl, dim % x.ndim, group, push) is not None:
        return None
    with torch.autocast(x.device.type, enabled=False):
        return matmul_reduce_scatter(xl, wl, dim % x.ndim, group, push=push)


class FusedRowwiseLinear(SwappedLinear):
    """A row-parallel ``nn.Linear`` whose forward fuses the matmul with the SP reduce-scatter
    on ``scatter_dim`` (:func:`rowwise_forward`) into one op, communicating by ``push``
    ("copy": Triton over symmetric memory; "nccl": ``rowwise_nccl.py``); parameters, state
    dict and everything else are nn.Linear's. ``apply_tensor_parallel`` puts one in a plain
    Linear's place (holding that Linear's own parameters, so names and optimizer state are
    unchanged) when the style asks for the fused op."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scatter_dim: int = 1,
                 push: str = "copy", **kw):
        super().__init__(in_features, out_features, bias, **kw)
        self.scatter_dim, self.push = scatter_dim, push

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rowwise_forward(self, x, self.scatter_dim, self.push)
