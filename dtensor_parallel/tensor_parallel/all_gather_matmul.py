"""The SP all-gather fused into the column-parallel matmul, chunk by chunk (the gather hides
behind the GEMM): the mirror of ``matmul_reduce_scatter.py``.

Papers: Wang et al., 2022, "Overlap Communication with Dependent Computation via Decomposition
in Large Deep Learning Models" (ASPLOS'23); Korthikanti et al., 2022 (sequence parallelism: an
all-gather of the sequence before each column-parallel layer); PyTorch's async TP
(``torch.ops.symm_mem.fused_all_gather_matmul``, the benchmark's baseline).

Math. Rank r holds ``x_r`` (*pre, S/W, *post, K), its sequence shard, and ``w_r`` (N, K), its
``Shard(0)`` rows of the weight (``nn.Linear`` layout). ``gathered = cat_p x_p`` along the
sequence and ``out_r = gathered @ w_r^T`` (*pre, S, *post, N). Row chunk c of ``out_r`` needs only
chunk c of ``gathered``, which is ``x_c``; so rank r multiplies its own shard first, straight from
``x_r`` (nothing to wait for), then c = r+1, r+2, ... (mod W) (:func:`gather_order`) as each
arrives. Peers' shards are pulled by copy-engine copies (no SMs) from their symmetric buffers::

    side stream (copy engine): [x_r -> own buffer][barrier][pull x_r+1][pull x_r+2] ... [x_r -> gathered]
    main stream (tensor cores): [GEMM chunk r, from x_r         ][GEMM r+1    ][GEMM r+2] ...
                                                 (each peer GEMM waits for its pull's event)

The barrier (``hdl.barrier``, one small kernel on the side stream) means every rank's shard sits
in its buffer. The workspace is its own symmetric allocation per group (``_GATHER_WORKSPACES``:
the SP kernels' workspace class, not its memory), two halves used alternately by the calls.
Why no second barrier: rank r next writes half h (call N+2) on its side stream after its barrier
of call N+1, which every peer p reaches on its side stream only after p's pulls of call N (the
last reads of r's half h) completed; streams run in order. The op ends with the main stream
waiting for the side stream, so ``gathered`` is complete for whatever reads it next, and
tensors the side stream used are freed in order.

Backward (the op ``all_gather_matmul_input_grad``, also a custom op so AOTAutograd can trace the
compiled backward): ``dgathered = dout @ w_r + dgathered_followers`` (the partial sums of the
other layers that read ``gathered``: k, v after q), and ``dx_r`` = chunk r of the sum over ranks
of ``dgathered``: the row-parallel layer's forward (``matmul_reduce_scatter.py``) with an
addend. Its machinery serves as is (the SP workspace and slot layout, ``_FusedPlan``, the
copy-engine pushes, the reduce-only kernel: fp32 sum in rank order); only the chunk GEMM
becomes ``addmm`` with the addend's chunk. ``dw_r = dout^T gathered`` (the gathered input is
the op's output, saved).

Sharing one gather (q/k/v, w1/w3): the op returns ``gathered`` too, and the wiring
(``gather_once.py``) keeps it on the input DTensor for the next layers that read the same input.
On CPU under ``TRITON_INTERPRET=1`` (tests) a gloo all-gather stands in for the pulls and the
backward's reduce runs in the kernel's code; :func:`all_gather_matmul_simulated` runs the chunk
logic on one device with a stacked tensor for the peers' buffers.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from . import matmul_reduce_scatter as mrs
from . import sp_reduce_scatter as sprs

_CHANNEL = 1  # hdl.barrier channel (signal slots [W, 2W)); the workspace's init barrier uses channel 0
_LOOP_OUTER = 8  # up to this many sequences: one GEMM (and one copy) per sequence, no strided copies
_GATHER_WORKSPACES: dict[str, "sprs._Workspace"] = {}


def gather_order(rank: int, world: int) -> list[int]:
    """The chunks rank ``rank`` multiplies, in order: its own (no wait), then the next peers'."""
    return [(rank + i) % world for i in range(world)]


def _gemm(rows: torch.Tensor, wt: torch.Tensor, out: torch.Tensor, add: torch.Tensor | None = None) -> None:
    """out (b, R, N) = rows (b, R, K) @ wt (K, N) [+ add (b, R, N)]; rows, out, add are row
    slices of (b, W*R, .) tensors: per sequence contiguous blocks, one cuBLAS call each."""
    if rows.shape[0] <= _LOOP_OUTER:
        for o in range(rows.shape[0]):
            if add is None:
                torch.mm(rows[o], wt, out=out[o])
            else:
                torch.addmm(add[o], rows[o], wt, out=out[o])
    else:
        out.copy_(torch.matmul(rows, wt) if add is None else torch.baddbmm(add, rows, wt.expand(rows.shape[0], *wt.shape)))


def _put_rows(dst3: torch.Tensor, c: int, src3: torch.Tensor) -> None:
    """dst3 (b, W*R, K)[:, chunk c] = src3 (b, R, K): contiguous block copies (copy engine)."""
    r = src3.shape[1]
    if src3.shape[0] <= _LOOP_OUTER:
        for o in range(src3.shape[0]):
            dst3[o, c * r:(c + 1) * r].copy_(src3[o])
    else:
        dst3[:, c * r:(c + 1) * r].copy_(src3)


def consume_chunks(x3: torch.Tensor, g3: torch.Tensor, wt: torch.Tensor, out3: torch.Tensor, rank: int, world: int,
                   wait: Callable[[int, int], None] | None = None) -> None:
    """out3 (b, W*R, N) chunk by chunk in :func:`gather_order`: chunk ``rank`` from the own shard
    x3 (b, R, K); chunk c != rank (the i-th) from g3 (b, W*R, K) after ``wait(i, c)`` (the
    pull's event). Shared by the GPU path, the CPU emulation and the simulation."""
    r = x3.shape[1]
    for i, c in enumerate(gather_order(rank, world)):
        if c == rank:
            _gemm(x3, wt, out3[:, c * r:(c + 1) * r])
        else:
            if wait is not None:
                wait(i, c)
            _gemm(g3[:, c * r:(c + 1) * r], wt, out3[:, c * r:(c + 1) * r])


def _gather_workspace(group: dist.ProcessGroup, nbytes: int):
    """This group's gather workspace (created, or grown, by a collective rendezvous on every rank
    at the same call: shapes agree)."""
    ws = _GATHER_WORKSPACES.get(group.group_name)
    if ws is None or ws.half_bytes < nbytes:
        if ws is not None:  # (the new workspace's init barrier follows every peer's last pulls)
            torch.cuda.synchronize()
        half = max(sprs._MIN_HALF_BYTES, 1 << (nbytes - 1).bit_length())
        ws = _GATHER_WORKSPACES[group.group_name] = sprs._Workspace(group, half)
    return ws


def _forward_cuda(x3: torch.Tensor, wt: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    outer, r_loc, k = x3.shape
    ws = _gather_workspace(group, x3.numel() * x3.element_size())
    rank, world = ws.rank, ws.world
    half = ws.begin()  # orders this call after the previous one's stream
    bufs = [b.view(outer, r_loc, k) for b in ws.buffers(half, x3.dtype, x3.numel())]  # rank p's shard slot
    g3 = torch.empty((outer, world * r_loc, k), dtype=x3.dtype, device=x3.device)
    out3 = torch.empty((outer, world * r_loc, wt.shape[1]), dtype=x3.dtype, device=x3.device)
    main, side = torch.cuda.current_stream(), ws.side_stream()
    side.wait_stream(main)  # x's producers, and the previous call
    arrived: dict[int, torch.cuda.Event] = {}
    with torch.cuda.stream(side):
        bufs[rank].copy_(x3)
        ws.hdl.barrier(channel=_CHANNEL)  # every rank's shard is in its buffer
        for c in gather_order(rank, world)[1:]:
            _put_rows(g3, c, bufs[c])  # pull over NVLink
            arrived[c] = side.record_event()
        _put_rows(g3, rank, x3)
    consume_chunks(x3, g3, wt, out3, rank, world, lambda i, c: main.wait_event(arrived[c]))
    main.wait_stream(side)
    return out3, g3


def _forward_emulated(x3: torch.Tensor, wt: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU (interpreter): a gloo all-gather stands in for the pulls; the same chunk GEMMs."""
    outer, r_loc, k = x3.shape
    rank, world = group.rank(), group.size()
    shards = sprs._gather0(x3, group)  # (W, b, R, K)
    g3 = torch.empty((outer, world * r_loc, k), dtype=x3.dtype, device=x3.device)
    for c in range(world):
        _put_rows(g3, c, shards[c])
    out3 = torch.empty((outer, world * r_loc, wt.shape[1]), dtype=x3.dtype, device=x3.device)
    consume_chunks(x3, g3, wt, out3, rank, world)
    return out3, g3


def _shapes(x: torch.Tensor, dim: int, world: int, n: int) -> tuple[list[int], list[int]]:
    gathered = list(x.shape)
    gathered[dim] *= world
    return gathered[:-1] + [n], gathered  # out (*pre, S, *post, N), gathered (*pre, S, *post, K)


def _forward(x: torch.Tensor, weight: torch.Tensor, dim: int, group: dist.ProcessGroup
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Local forward: x (*pre, S/W, *post, K), weight (N, K) -> out (*pre, S, *post, N), gathered."""
    x3, _ = mrs._as_3d(x.contiguous(), dim)  # (outer, S/W*P, K)
    wt = weight.t()  # (K, N), a view (cuBLAS reads it transposed, as F.linear does)
    out3, g3 = _forward_cuda(x3, wt, group) if x.is_cuda else _forward_emulated(x3, wt, group)
    out_shape, g_shape = _shapes(x, dim, group.size(), weight.shape[0])
    return out3.view(out_shape), g3.view(g_shape)


# ----------------------------------------------------------------------------------------
# Backward: dx = chunk r of sum_p (dout_p @ w_p + add_p), the row-parallel machinery + addend
# ----------------------------------------------------------------------------------------


def produce_partials(g3: torch.Tensor, w: torch.Tensor, add3: torch.Tensor | None, rank: int, world: int,
                     own: torch.Tensor, dst_for: Callable[[int, int], torch.Tensor],
                     after: Callable[[int, int, torch.Tensor], None] | None = None) -> None:
    """``matmul_reduce_scatter.produce_chunks`` with an addend: chunk c of g3 (b, W*R, N) @ w (N, K)
    (+ chunk c of add3) in ``chunk_order`` (peers' first, own last), own into ``own``."""
    r = g3.shape[1] // world
    for i, c in enumerate(mrs.chunk_order(rank, world)):
        rows = slice(c * r, (c + 1) * r)
        dst = own if c == rank else dst_for(i, c)
        _gemm(g3[:, rows], w, dst, None if add3 is None else add3[:, rows])
        if c != rank and after is not None:
            after(i, c, dst)


def _input_grad_cuda(g3: torch.Tensor, w: torch.Tensor, add3: torch.Tensor | None, group: dist.ProcessGroup
                     ) -> torch.Tensor:
    """The copy-engine form of ``matmul_reduce_scatter._forward_cuda`` with the addend."""
    from triton_kernels.sp_reduce_scatter import launch

    outer, rows, _ = g3.shape
    k = w.shape[1]
    ws = sprs._workspace(group, outer * rows * k * g3.element_size())
    key = ("fused", outer, rows, k, g3.dtype)  # the row-parallel op's plan: same slot layout
    plan = ws.plans.get(key)
    if plan is None:
        plan = ws.plans[key] = mrs._FusedPlan(ws, outer, rows, k, g3.dtype)
    rank, world, r_loc = ws.rank, ws.world, rows // ws.world
    half = ws.begin()
    main, side = ws.stream, ws.side_stream()
    peer_slots, own = plan.slots[half]
    side.wait_stream(main)  # after the previous launch (double buffering) and the inputs' producers
    stage = torch.empty((min(world - 1, 2), outer, r_loc, k), dtype=g3.dtype, device=g3.device)
    copied: list[torch.cuda.Event] = []

    def dst_for(i: int, c: int) -> torch.Tensor:
        if i >= 2:  # staging tensor i % 2 is free once push i-2 is done
            main.wait_event(copied[i - 2])
        return stage[i % 2]

    def push(i: int, c: int, dst: torch.Tensor) -> None:
        side.wait_event(main.record_event())
        with torch.cuda.stream(side):
            peer_slots[c].copy_(dst)  # copy engine, over NVLink, into peer c's slot `rank`
        copied.append(side.record_event())

    produce_partials(g3, w, add3, rank, world, own, dst_for, push)
    main.wait_stream(side)
    out = torch.empty((outer, r_loc, k), dtype=g3.dtype, device=g3.device)
    launch(plan.cfg, out, out, 0, r_loc * k, plan.bufs8[half], ws.pads8, rank, world, sprs._SLOT0,
           push=False, own_from_buf=True)
    return out


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


def _input_grad(grad: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None, dim: int,
                group: dist.ProcessGroup) -> torch.Tensor:
    """grad (*pre, S, *post, N), weight (N, K), add (*pre, S, *post, K) or None -> this rank's
    (*pre, S/W, *post, K) chunk of sum over ranks of ``grad @ weight + add``."""
    g3, lead = mrs._as_3d(grad.contiguous(), dim)
    add3 = None if add is None else mrs._as_3d(add.contiguous(), dim)[0]
    fn = _input_grad_cuda if grad.is_cuda else _input_grad_emulated
    out = fn(g3, weight.contiguous(), add3, group)
    shape = list(lead)
    shape[dim] //= group.size()
    return out.view(*shape, weight.shape[1])


@torch.library.custom_op("dtensor_parallel::all_gather_matmul_input_grad", mutates_args=())
def _input_grad_op(grad: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None, dim: int,
                   group_name: str) -> torch.Tensor:
    """The forward op's input gradient (matmul + addend + reduce-scatter, fused)."""
    return _input_grad(grad, weight, add, dim, sprs._group(group_name))


@_input_grad_op.register_fake
def _(grad: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None, dim: int, group_name: str) -> torch.Tensor:
    shape = list(grad.shape[:-1])
    shape[dim] //= sprs._group(group_name).size()
    return grad.new_empty((*shape, weight.shape[1]))


# ----------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("dtensor_parallel::all_gather_matmul", mutates_args=())
def _all_gather_matmul_op(x: torch.Tensor, weight: torch.Tensor, dim: int, group_name: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, gathered): opaque to dynamo and inductor (no graph break), one op for the
    selective recompute policy to save."""
    return _forward(x, weight, dim, sprs._group(group_name))


@_all_gather_matmul_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, dim: int, group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    out_shape, g_shape = _shapes(x, dim, sprs._group(group_name).size(), weight.shape[0])
    return x.new_empty(out_shape), x.new_empty(g_shape)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    _, weight, ctx.dim, ctx.group_name = inputs
    ctx.save_for_backward(weight, output[1])
    ctx.set_materialize_grads(False)  # no followers: no zero addend to add


def _backward(ctx, grad_out: torch.Tensor | None, grad_gathered: torch.Tensor | None):
    weight, gathered = ctx.saved_tensors
    gx = gw = None
    if ctx.needs_input_grad[0] and (grad_out is not None or grad_gathered is not None):
        if grad_out is None:  # only the followers used the gathered input: a plain reduce-scatter
            gx = sprs._sequence_reduce_scatter_op(grad_gathered.contiguous(), ctx.dim, ctx.group_name)
        else:
            gx = _input_grad_op(grad_out, weight, grad_gathered, ctx.dim, ctx.group_name)
    if ctx.needs_input_grad[1] and grad_out is not None:
        gw = grad_out.reshape(-1, grad_out.shape[-1]).t() @ gathered.reshape(-1, gathered.shape[-1])  # (N, K)
    return gx, gw, None, None


_all_gather_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def cannot_serve(x: torch.Tensor, weight: torch.Tensor, dim: int, group: dist.ProcessGroup) -> str | None:
    """Why the fused op cannot take this call, or None; depends only on what every rank shares
    (shapes, dtypes, device type, group), so all ranks decide alike."""
    from triton_kernels.sp_reduce_scatter import MAX_WORLD, SUPPORTED_DTYPES

    if x.dim() < 2 or dim == x.dim() - 1:
        return f"gather dim {dim} of a {x.dim()}-D input: needs a dim before the last"
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.dtype != x.dtype or weight.device != x.device:
        return f"weight {tuple(weight.shape)} {weight.dtype} for input {tuple(x.shape)} {x.dtype}"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} (the kernels take {', '.join(map(str, SUPPORTED_DTYPES))})"
    if not 2 <= group.size() <= MAX_WORLD:
        return f"group of {group.size()} ranks (symmetric memory serves 2..{MAX_WORLD})"
    if dist.get_backend(group) == "fake":
        return "the fake process group: no communication inside an op"
    if x.device.type != "cuda" and not sprs._interpreted():
        return f"{x.device.type} tensors outside the Triton interpreter"
    return None


def all_gather_matmul(x: torch.Tensor, weight: torch.Tensor, dim: int, group: dist.ProcessGroup
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(all_gather(x, dim) @ weight.T, all_gather(x, dim))`` over ``group``, the gather hidden
    behind the GEMM.

    Args:
        x: (*pre, S/W, *post, K) this rank's shard of the gathered dim (fp16/bf16/fp32).
        weight: (N, K) this rank's weight rows, ``nn.Linear`` layout, x's dtype.
        dim: the gathered dim of x (the sequence, 1, for SP); not the last.
        group: 2..8 ranks of one NVLink host (symmetric memory); CPU only under the interpreter.
    Returns ``out`` (*pre, S, *post, N) and ``gathered`` (*pre, S, *post, K), both differentiable
    (with autograd or under ``torch.compile`` it is the custom op
    ``torch.ops.dtensor_parallel.all_gather_matmul``). Raises a ValueError, before any
    communication, for a call :func:`cannot_serve` rejects.
    """
    dim = dim % max(x.dim(), 1)
    reason = cannot_serve(x, weight, dim, group)
    if reason is not None:
        raise ValueError(f"all_gather_matmul cannot serve this call: {reason}")
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _all_gather_matmul_op(x, weight, dim, group.group_name)
    return _forward(x, weight, dim, group)  # eager without autograd: no op dispatch


def all_gather_matmul_simulated(xs: torch.Tensor, ws: torch.Tensor, dim: int,
                                wait: Callable[[int, int, int], None] | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on one device, a stacked tensor standing in for the symmetric buffers: ``xs``
    (W, *shard shape) and ``ws`` (W, N, K) hold every rank's shard and weight rows. Every rank
    copies its shard into its buffer, then each rank r pulls the peers' chunks in
    :func:`gather_order` and multiplies (``wait(r, i, c)`` is called where the GPU path waits
    for pull i, of chunk c, before its GEMM). Returns (W, *out shape) and (W, *gathered shape)."""
    world = xs.shape[0]
    x3s = [mrs._as_3d(xs[p].contiguous(), dim)[0] for p in range(world)]
    bufs = torch.stack(x3s)  # (W, b, R, K): every rank's buffer, after its copy and the barrier
    outs, gs = [], []
    for r in range(world):
        b, r_loc, k = x3s[r].shape
        g3 = torch.full((b, world * r_loc, k), float("nan"), dtype=xs.dtype, device=xs.device)
        out3 = torch.full((b, world * r_loc, ws.shape[1]), float("nan"), dtype=xs.dtype, device=xs.device)

        def pull(i: int, c: int, r=r, g3=g3) -> None:
            if wait is not None:
                wait(r, i, c)
            _put_rows(g3, c, bufs[c])

        consume_chunks(x3s[r], g3, ws[r].t(), out3, r, world, pull)
        _put_rows(g3, r, x3s[r])
        out_shape, g_shape = _shapes(xs[r], dim, world, ws.shape[1])
        outs.append(out3.view(out_shape))
        gs.append(g3.view(g_shape))
    return torch.stack(outs), torch.stack(gs)


def all_gather_matmul_ref(xs: torch.Tensor, ws: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: every rank's (gathered @ w_r^T, gathered) with one GEMM over the whole
    gathered input; xs (W, *shard shape), ws (W, N, K)."""
    gathered = torch.cat(list(xs), dim)
    return torch.stack([gathered @ ws[r].t() for r in range(xs.shape[0])]), gathered.expand(xs.shape[0], *gathered.shape)


def input_grad_ref(grads: torch.Tensor, ws: torch.Tensor, adds: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Plain PyTorch of the backward op: grads (W, *out shape), ws (W, N, K), adds (W, *gathered
    shape) or None -> (W, *shard shape): chunk r of the fp32 rank-order sum of grad_p @ w_p + add_p."""
    from triton_kernels.sp_reduce_scatter import sp_reduce_scatter_ref

    parts = [grads[p] @ ws[p] + (0 if adds is None else adds[p]) for p in range(grads.shape[0])]
    return sp_reduce_scatter_ref(torch.stack(parts), dim)
