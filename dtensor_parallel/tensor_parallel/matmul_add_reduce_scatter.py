"""The input gradient of the fused all-gather + column-parallel matmul: a matmul, plus the
other readers' partial gradients, reduce-scattered over the sequence, fused as the row-parallel
layer's forward is.

Math. The forward (``all_gather_matmul.py``) gave rank r ``out_r = gathered @ w_r^T`` and
``gathered``, which other column-parallel layers read too (k, v after q). Backward:
``dgathered_r = dout_r @ w_r + add_r`` (``add_r``: the sum of those readers' partial gradients of
``gathered``, each rank's from its own weight rows) and ``dx_r`` = chunk r of ``sum_p dgathered_p``
along the sequence: the row-parallel layer's forward of ``matmul_reduce_scatter.py`` with an
addend. Its machinery serves as is: the SP workspace and slot layout (``_FusedPlan``), the
chunk order (peers' chunks first, own last), the copy-engine pushes into peers' slots while the
next chunk's GEMM runs, the reduce-only kernel (signal-pad barrier, fp32 sum in rank order);
only the chunk GEMM becomes ``addmm`` with the addend's chunk (cuBLAS adds it in the epilogue).

The op ``torch.ops.dtensor_parallel.all_gather_matmul_input_grad`` (a custom op, with a fake
implementation, so AOTAutograd traces it into a compiled backward). On CPU under
``TRITON_INTERPRET=1`` (tests) a gloo all-gather stands in for the pushes and the reduce runs in
the kernel's code.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from . import matmul_reduce_scatter as mrs
from . import sp_reduce_scatter as sprs

LOOP_OUTER = 8  # up to this many sequences: one GEMM (and one copy) per sequence, no strided copies


def gemm(rows: torch.Tensor, wt: torch.Tensor, out: torch.Tensor, add: torch.Tensor | None = None) -> None:
    """out (b, R, N) = rows (b, R, K) @ wt (K, N) [+ add (b, R, N)]; rows, out, add are row
    slices of (b, W*R, .) tensors: per sequence contiguous blocks, one cuBLAS call each."""
    if rows.shape[0] <= LOOP_OUTER:
        for o in range(rows.shape[0]):
            if add is None:
                torch.mm(rows[o], wt, out=out[o])
            else:
                torch.addmm(add[o], rows[o], wt, out=out[o])
    else:
        out.copy_(torch.matmul(rows, wt) if add is None else torch.baddbmm(add, rows, wt.expand(rows.shape[0], *wt.shape)))


def produce_partials(g3: torch.Tensor, w: torch.Tensor, add3: torch.Tensor | None, rank: int, world: int,
                     own: torch.Tensor, dst_for: Callable[[int, int], torch.Tensor],
                     after: Callable[[int, int, torch.Tensor], None] | None = None) -> None:
    """``matmul_reduce_scatter.produce_chunks`` with an addend: chunk c of g3 (b, W*R, N) @ w (N, K)
    (+ chunk c of add3) in ``chunk_order`` (peers' first, own last), own into ``own``."""
    r = g3.shape[1] // world
    for i, c in enumerate(mrs.chunk_order(rank, world)):
        rows = slice(c * r, (c + 1) * r)
        dst = own if c == rank else dst_for(i, c)
        gemm(g3[:, rows], w, dst, None if add3 is None else add3[:, rows])
        if c != rank and after is not None:
            after(i, c, dst)


def _input_grad_cuda(g3: torch.Tensor, w: torch.Tensor, add3: torch.Tensor | None, group: dist.ProcessGroup
                     ) -> torch.Tensor:
    """The copy-engine form of ``matmul_reduce_scatter._forward_cuda`` with the addend: the same
    plan (slot layout), staged pushes and reduce."""
    outer, rows, _ = g3.shape
    k = w.shape[1]
    ws = sprs._workspace(group, outer * rows * k * g3.element_size())
    plan = mrs.fused_plan(ws, outer, rows, k, g3.dtype)
    rank, world, r_loc = ws.rank, ws.world, rows // ws.world
    half = ws.begin()
    peer_slots, own = plan.slots[half]
    pushes = mrs.StagedPush(ws, peer_slots, (outer, r_loc, k), g3.dtype, g3.device)
    produce_partials(g3, w, add3, rank, world, own, pushes.dst_for, pushes.push)
    pushes.finish()
    return mrs.reduce_own(plan, ws, half, outer, r_loc, k, g3)


def _input_grad_emulated(g3: torch.Tensor, w: torch.Tensor, add3: torch.Tensor | None,
                         group: dist.ProcessGroup) -> torch.Tensor:
    """CPU (interpreter): the same partials; a gloo all-gather for the pushes; the kernel's reduce."""
    from triton_kernels.sp_reduce_scatter import launch_reduce_slots

    rank, world = group.rank(), group.size()
    outer, rows, _ = g3.shape
    r_loc, k = rows // world, w.shape[1]
    send = torch.empty((world, outer, r_loc, k), dtype=g3.dtype, device=g3.device)  # chunk c for peer c
    produce_partials(g3, w, add3, rank, world, send[rank], lambda i, c: send[c])
    slots = sprs._gather0(send, group)[:, rank].contiguous()  # (W, b, R, K): slot p = rank p's partial
    out = torch.empty((outer, r_loc, k), dtype=g3.dtype, device=g3.device)
    launch_reduce_slots(out.view(outer, -1), [slots.view(-1)] * world, None, rank, max_programs=3, barrier=False)
    return out


def input_grad(grad: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None, dim: int,
                group: dist.ProcessGroup) -> torch.Tensor:
    """grad (*pre, S, *post, N), weight (N, K), add (*pre, S, *post, K) or None -> this rank's
    (*pre, S/W, *post, K) chunk of the sum over ranks of ``grad @ weight + add`` (fp32, rank
    order). CUDA: symmetric memory (2..8 ranks of one host); CPU: the interpreter (tests)."""
    g3, lead = mrs._as_3d(grad.contiguous(), dim)
    add3 = None if add is None else mrs._as_3d(add.contiguous(), dim)[0]
    fn = _input_grad_cuda if grad.is_cuda else _input_grad_emulated
    out = fn(g3, weight.contiguous(), add3, group)
    shape = list(lead)
    shape[dim] //= group.size()
    return out.view(*shape, weight.shape[1])


@torch.library.custom_op("dtensor_parallel::all_gather_matmul_input_grad", mutates_args=())
def input_grad_op(grad: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None, dim: int,
                   group_name: str) -> torch.Tensor:
    """:func:`input_grad` as an op (the group by name)."""
    return input_grad(grad, weight, add, dim, sprs._group(group_name))


@input_grad_op.register_fake
def _(grad: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None, dim: int, group_name: str) -> torch.Tensor:
    shape = list(grad.shape[:-1])
    shape[dim] //= sprs._group(group_name).size()
    return grad.new_empty((*shape, weight.shape[1]))


def input_grad_ref(grads: torch.Tensor, ws: torch.Tensor, adds: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Plain PyTorch of the backward op: grads (W, *out shape), ws (W, N, K), adds (W, *gathered
    shape) or None -> (W, *shard shape): chunk r of the fp32 rank-order sum of grad_p @ w_p + add_p."""
    from triton_kernels.sp_reduce_scatter import sp_reduce_scatter_ref

    parts = [grads[p] @ ws[p] + (0 if adds is None else adds[p]) for p in range(grads.shape[0])]
    return sp_reduce_scatter_ref(torch.stack(parts), dim)


def input_grad_simulated(grads: torch.Tensor, ws: torch.Tensor, adds: torch.Tensor | None, dim: int) -> torch.Tensor:
    """The op on one device: grads (W, *out shape), ws (W, N, K), adds (W, *gathered shape) or
    None; every rank's partials (:func:`produce_partials`) into a stacked tensor of slots
    [owner, slot] (NaN-filled: an unwritten slot shows), then every rank's reduce (the kernel's
    reduce-only mode, interpreter on CPU). Returns (W, *shard shape)."""
    from triton_kernels.sp_reduce_scatter import launch_reduce_slots

    world = grads.shape[0]
    g3s = [mrs._as_3d(grads[p].contiguous(), dim)[0] for p in range(world)]
    a3s = [None if adds is None else mrs._as_3d(adds[p].contiguous(), dim)[0] for p in range(world)]
    outer, rows, _ = g3s[0].shape
    r_loc, k = rows // world, ws.shape[2]
    slots = torch.full((world, world, outer, r_loc, k), float("nan"), dtype=grads.dtype, device=grads.device)
    for p in range(world):
        produce_partials(g3s[p], ws[p], a3s[p], p, world, slots[p, p], lambda i, c, p=p: slots[c, p])
    outs = torch.empty((world, outer, r_loc, k), dtype=grads.dtype, device=grads.device)
    for r in range(world):
        launch_reduce_slots(outs[r].view(outer, -1), list(slots.view(world, -1)), None, r, max_programs=3,
                            barrier=False)
    shape = list(grads.shape[1:-1])
    shape[dim] //= world
    return outs.view(world, *shape, k)
