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
arrives.

Transport (GPU): every rank pushes its shard into each peer's symmetric buffer (slot r) with a
copy-engine copy, then writes the call's sequence number into that peer's signal pad (slot
``_SLOT0 + r``) with a second, 4-byte copy on the same stream, so it lands after the data. The
receiver waits for it with a one-thread kernel (:func:`_wait_kernel`) on its main stream, right
before the GEMM that reads the chunk, straight from the buffer::

    side stream (copy engine): [push x_r to peer r-1][its seq][push to r-2][seq] ... [x_r -> gathered]
    main stream (tensor cores): [GEMM chunk r, from x_r     ][wait seq of r+1][GEMM r+1][wait][GEMM r+2] ...
    aux stream (copy engine):                                  [slot r+1 -> gathered]   [slot r+2 -> ...]

Nothing on the senders' side needs an SM: a barrier kernel there would wait behind the GEMM that
fills the GPU (PyTorch's ``_pipelined_all_gather_and_consume`` hits this and runs its copy and
barrier before the first GEMM instead, unhidden). The wait kernel runs between two GEMMs of the
same stream. Sequence numbers are the workspace's call count mod 2^16, compared serially (a
peer's may be one call ahead), so pads are never reset.

Why a push of call N+2 into peer p's half h of the workspace (calls alternate halves) comes after
p's last reads of that half (its GEMMs and copies of call N): p wrote its sequence number of
call N+1 on its side stream after its main stream finished call N (each call starts with the
side stream waiting for the main one, and ends with the main one waiting for both others); the
pusher's main stream waited for that number in call N+1; its side stream waits for its main
stream at the start of call N+2. So no barrier per call.

Backward (``matmul_add_reduce_scatter.py``, also a custom op so AOTAutograd can trace the
compiled backward): ``dgathered = dout @ w_r + dgathered_followers`` (the partial sums of the
other layers that read ``gathered``: k, v after q), and ``dx_r`` = chunk r of the sum over ranks
of ``dgathered``, fused as the row-parallel layer's forward is, with the addend; ``dw_r = dout^T
gathered`` (the gathered input is the op's output, saved).

Sharing one gather (q/k/v, w1/w3): the op returns ``gathered`` too, and the wiring
(``gather_once.py``) keeps it on the input DTensor for the next layers that read the same input.
On CPU under ``TRITON_INTERPRET=1`` (tests) a gloo all-gather stands in for the pushes;
:func:`all_gather_matmul_simulated` runs the chunk logic on one device with a stacked tensor for
the peers' buffers, and the wait kernel's comparison runs in the interpreter against preset pads.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

import triton
import triton.language as tl

from . import matmul_reduce_scatter as mrs
from . import sp_reduce_scatter as sprs
from .matmul_add_reduce_scatter import LOOP_OUTER, gemm, input_grad_op

_SEQ_MOD = 1 << 16  # sequence numbers mod 2^16, compared serially (a window of 2^15)
_GATHER_STATES: dict[str, "_GatherState"] = {}


def gather_order(rank: int, world: int) -> list[int]:
    """The chunks rank ``rank`` multiplies, in order: its own (no wait), then the next peers'."""
    return [(rank + i) % world for i in range(world)]


def push_order(rank: int, world: int) -> list[int]:
    """The peers rank ``rank`` pushes its shard to, in order: the one that needs it soonest
    first (peer p multiplies chunk r at step (r - p) mod W of its :func:`gather_order`)."""
    return [(rank - i) % world for i in range(1, world)]


def _put_rows(dst3: torch.Tensor, c: int, src3: torch.Tensor) -> None:
    """dst3 (b, W*R, K)[:, chunk c] = src3 (b, R, K): contiguous block copies (copy engine)."""
    r = src3.shape[1]
    if src3.shape[0] <= LOOP_OUTER:
        for o in range(src3.shape[0]):
            dst3[o, c * r:(c + 1) * r].copy_(src3[o])
    else:
        dst3[:, c * r:(c + 1) * r].copy_(src3)


def consume_chunks(x3: torch.Tensor, wt: torch.Tensor, out3: torch.Tensor, rank: int, world: int,
                   chunk: Callable[[int], torch.Tensor], wait: Callable[[int, int], None] | None = None) -> None:
    """out3 (b, W*R, N) chunk by chunk in :func:`gather_order`: chunk ``rank`` from the own shard
    x3 (b, R, K); chunk c != rank (the i-th) from ``chunk(c)`` (b, R, K), after ``wait(i, c)``
    (its arrival). Shared by the GPU path, the CPU emulation and the simulation."""
    r = x3.shape[1]
    for i, c in enumerate(gather_order(rank, world)):
        if c != rank and wait is not None:
            wait(i, c)
        gemm(x3 if c == rank else chunk(c), wt, out3[:, c * r:(c + 1) * r])


@triton.jit(do_not_specialize=["slot", "expected"])  # one compiled kernel for every call
def _wait_kernel(PAD, slot, expected):
    """Spin (one thread; acquire loads at system scope) until sequence number ``PAD[slot]`` is
    ``expected`` or later: ``(seq - expected) mod 2^16 < 2^15`` (serial comparison)."""
    seq = tl.atomic_add(PAD + slot, 0, sem="acquire", scope="sys")
    while ((seq - expected) & 0xFFFF) >= 0x8000:
        seq = tl.atomic_add(PAD + slot, 0, sem="acquire", scope="sys")


def wait_for(pad: torch.Tensor, slot: int, expected: int) -> None:
    """Block the current stream until ``pad[slot]`` (int32) reaches ``expected`` (mod 2^16)."""
    _wait_kernel[(1,)](pad, slot, expected, num_warps=1)


class _GatherState:
    """One group's gather workspace (its own symmetric allocation: the SP kernels' workspace
    class, not their memory or signal pad), the sequence-number sources and the aux stream."""

    def __init__(self, group: dist.ProcessGroup, half_bytes: int):
        self.ws = sprs._Workspace(group, half_bytes)  # collective; zeroes the pad slots >= _SLOT0
        self.seqs = torch.arange(_SEQ_MOD, dtype=torch.int32, device=self.ws.buf.device)  # copy sources
        self.aux = torch.cuda.Stream()


def _gather_state(group: dist.ProcessGroup, nbytes: int) -> _GatherState:
    """This group's state, created (or grown) by a collective rendezvous on every rank at the
    same call (shapes agree)."""
    st = _GATHER_STATES.get(group.group_name)
    if st is None or st.ws.half_bytes < nbytes:
        if st is not None:  # (the new workspace's init barrier follows every peer's last copies)
            torch.cuda.synchronize()
        half = max(sprs._MIN_HALF_BYTES, 1 << (nbytes - 1).bit_length())
        st = _GATHER_STATES[group.group_name] = _GatherState(group, half)
    return st


def _forward_cuda(x3: torch.Tensor, wt: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    outer, r_loc, k = x3.shape
    world = group.size()
    st = _gather_state(group, world * x3.numel() * x3.element_size())
    ws = st.ws
    rank = ws.rank
    half = ws.begin()  # orders this call after the previous one's stream
    seq = ws.calls % _SEQ_MOD  # the same on every rank (every rank makes every call)
    bufs = [b.view(world, outer, r_loc, k) for b in ws.buffers(half, x3.dtype, world * x3.numel())]  # [rank][slot]
    g3 = torch.empty((outer, world * r_loc, k), dtype=x3.dtype, device=x3.device)
    out3 = torch.empty((outer, world * r_loc, wt.shape[1]), dtype=x3.dtype, device=x3.device)
    main, side, aux = torch.cuda.current_stream(), ws.side_stream(), st.aux
    side.wait_stream(main)  # x's producers; and the previous call (its reads of this half's slots)
    with torch.cuda.stream(side):
        for p in push_order(rank, world):
            bufs[p][rank].copy_(x3)  # copy engine, over NVLink, into peer p's slot `rank`
            ws.pads[p][sprs._SLOT0 + rank:sprs._SLOT0 + rank + 1].copy_(st.seqs[seq:seq + 1])  # after it
        _put_rows(g3, rank, x3)

    def wait(i: int, c: int) -> None:  # chunk c is in our slot c: to the GEMM, and copied into g3
        wait_for(ws.pads[rank], sprs._SLOT0 + c, seq)
        aux.wait_stream(main)
        with torch.cuda.stream(aux):
            _put_rows(g3, c, bufs[rank][c])

    consume_chunks(x3, wt, out3, rank, world, lambda c: bufs[rank][c], wait)
    main.wait_stream(side)
    main.wait_stream(aux)
    return out3, g3


def _forward_emulated(x3: torch.Tensor, wt: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU (interpreter): a gloo all-gather stands in for the pushes; the same chunk GEMMs."""
    outer, r_loc, k = x3.shape
    rank, world = group.rank(), group.size()
    slots = sprs._gather0(x3, group)  # (W, b, R, K): our buffer after every peer's push
    g3 = torch.empty((outer, world * r_loc, k), dtype=x3.dtype, device=x3.device)
    for c in range(world):
        _put_rows(g3, c, slots[c])
    out3 = torch.empty((outer, world * r_loc, wt.shape[1]), dtype=x3.dtype, device=x3.device)
    consume_chunks(x3, wt, out3, rank, world, lambda c: slots[c])
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
            gx = input_grad_op(grad_out, weight, grad_gathered, ctx.dim, ctx.group_name)
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
        raise ValueError(f"all_gather_matmul cannot serve this call: {reason}. Gather with DTensor instead "
                         f"(x.redistribute(placements=[Replicate()]), then F.linear), as the wiring does")
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _all_gather_matmul_op(x, weight, dim, group.group_name)
    return _forward(x, weight, dim, group)  # eager without autograd: no op dispatch


def all_gather_matmul_simulated(xs: torch.Tensor, ws: torch.Tensor, dim: int,
                                wait: Callable[[int, int, int], None] | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op on one device, a stacked tensor standing in for the symmetric buffers: ``xs``
    (W, *shard shape) and ``ws`` (W, N, K) hold every rank's shard and weight rows. Every rank
    pushes its shard into its peers' slots (in :func:`push_order`), then each rank r multiplies
    in :func:`gather_order`, reading peer chunks from its own slots (``wait(r, i, c)`` is called
    where the GPU path waits for chunk c's sequence number, the i-th). Returns (W, *out shape),
    (W, *gathered shape) and the slots [receiver, sender] (NaN where nothing was pushed)."""
    world = xs.shape[0]
    x3s = [mrs._as_3d(xs[p].contiguous(), dim)[0] for p in range(world)]
    b, r_loc, k = x3s[0].shape
    slots = torch.full((world, world, b, r_loc, k), float("nan"), dtype=xs.dtype, device=xs.device)
    for p in range(world):
        for q in push_order(p, world):
            slots[q, p] = x3s[p]
    outs, gs = [], []
    for r in range(world):
        g3 = torch.full((b, world * r_loc, k), float("nan"), dtype=xs.dtype, device=xs.device)
        out3 = torch.full((b, world * r_loc, ws.shape[1]), float("nan"), dtype=xs.dtype, device=xs.device)
        _put_rows(g3, r, x3s[r])

        def arrive(i: int, c: int, r=r, g3=g3) -> None:
            if wait is not None:
                wait(r, i, c)
            _put_rows(g3, c, slots[r, c])

        consume_chunks(x3s[r], ws[r].t(), out3, r, world, lambda c, r=r: slots[r, c], arrive)
        out_shape, g_shape = _shapes(xs[r], dim, world, ws.shape[1])
        outs.append(out3.view(out_shape))
        gs.append(g3.view(g_shape))
    return torch.stack(outs), torch.stack(gs), slots


def all_gather_matmul_ref(xs: torch.Tensor, ws: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: every rank's (gathered @ w_r^T, gathered) with one GEMM over the whole
    gathered input; xs (W, *shard shape), ws (W, N, K)."""
    gathered = torch.cat(list(xs), dim)
    return torch.stack([gathered @ ws[r].t() for r in range(xs.shape[0])]), gathered.expand(xs.shape[0], *gathered.shape)
