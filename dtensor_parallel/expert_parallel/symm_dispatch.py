"""Expert-parallel dispatch and combine over symmetric memory: no host sync, NCCL-free.

The drop-in for ``dispatch.dispatch_combine`` when ``plan.kernels["moe_dispatch"]`` is
"triton" (or "auto") on GPUs of one NVLink host. Kernels and their protocol:
``triton_kernels/moe_dispatch_symm.py``. Per MoE layer::

    exchange(counts)          one launch: counts to every peer, barrier, receive tables
    recv = to_expert(rows)    dispatch: my sorted rows into the owners' receive areas
                              (expert-major, then source: the NCCL path's regroup order)
    y = experts(recv, recv_counts)
    back = to_source(y)       combine: the expert outputs back to my sorted rows
    backward: to_expert and to_source swap (the gradient of a copy is the reverse copy)

The weighted sum of the k outputs of a token (the combine proper, fp32, fixed slot order)
is the local ``unpermute`` that follows (``dispatch.ParallelDispatch.combine``).

Receive bound. The rows a rank receives depend on the routing; the receive area has a size
fixed per call shape: ``recv_bound`` (``ParallelPlan.moe_recv_bound``, a multiple of this
rank's T*k rows; default ``ep``, the worst case: every rank's every row to one rank, so no
routing can exceed it, and larger values act as ``ep``; with k distinct experts per token
``ep * min(k, E/ep) / k`` is enough, less when k > E/ep). Every rank computes the largest
receive count on the device; if it exceeds the bound, every rank skips every store of that
layer (its output is then wrong) and the host raises ``ValueError`` at a later call, once
the count's copy to a pinned slot has arrived (an event, never a synchronisation;
:meth:`SymmExchange.check` forces it). The
bound sets the receive area, the dispatch output's shape ``(bound, H)`` and so the rows
over which the experts' element-wise ops run and their activations are kept: a tight bound
(1.25, say, for balanced routing) saves memory and time at the risk of that error.

Copies. The peers' rows land in this rank's symmetric areas, which the next call reuses, so
each push is followed by a copy into a fresh tensor (autograd keeps it); the rows a rank
sends to itself skip the area and the copy (``moe_dispatch_symm._copy_out_kernel``, whose
docstring says why it is a launch of its own). The dispatch output's rows past the received
count (``tables.info[0]``, on the device) are never written: copying the whole area, as a
clone did, moved ``bound`` rows (by default ep times T*k) for about T*k received.

Why nothing reads the rows past the count. ``experts(recv, recv_counts)`` takes only the
``sum(recv_counts)`` leading rows: the CPU loop slices them, and ``torch._grouped_mm`` with
offsets (the model's ``grouped_swiglu`` / ``grouped_glu``) computes and writes only the rows
of its groups. Their element-wise ops (SiLU, product) do touch the rest, row by row, so what
the rows past the count hold stays in those rows. Backward: the gradient of those rows (the
dispatch of ``_ToSource.backward``, unwritten there too) meets the same GEMMs; the weight
gradient ``x^T dy`` per group sums over the rows of that group only (it must stop exactly at
each group's end for the groups before the last to be right, and the last ends at the
count), and the input gradient is again row by row. ``_ToSource`` pushes back only the
received rows, ``_ToExpert.backward`` likewise. So a NaN there cannot reach an output or a
gradient (the emulation fills those rows with NaN in every test; the GPU tests set
``_POISON_UNWRITTEN``). One visible effect: ``torch.autograd.set_detect_anomaly`` may see a
NaN in those rows of an intermediate gradient and raise. An ``experts`` that reads every row
(a dense matmul over all of ``recv``) would be wrong here; ours never do.

Every ep rank must route the same number of tokens per call (true in this library's
layouts): the workspace is one symmetric allocation of the same size on every rank.

On CPU under ``TRITON_INTERPRET=1`` (tests) the same kernels run with the peers' areas
emulated: each push all-gathers its inputs and runs every rank's phase on stacked tensors
(``moe_dispatch_symm.simulate``'s method), so the wiring is tested on gloo ranks.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

import torch
import torch.distributed as dist

from ..warn_once import warn_once

logger = logging.getLogger(__name__)

_SLOT = 64  # signal-pad slots [64, 64 + W): the workspace's init barrier (channel 0) uses [0, W)
_WORKSPACES: dict[str, "_Workspace"] = {}
_POISON_UNWRITTEN = False  # tests: outputs start as NaN, so rows nothing writes show if read


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def choose_exchange(ep: int, device_type: str, requested: str = "auto") -> str:
    """"symm" (GPU symmetric memory), "emulated" (CPU, interpreter: tests) or "nccl".
    ``requested`` "symm" where it cannot run is a ``ValueError`` naming why; "auto" falls
    back to NCCL with one log line."""
    if requested == "nccl" or ep < 2:
        return "nccl"
    if device_type != "cuda" and _interpreted():
        return "emulated"
    from ..tensor_parallel.sp_reduce_scatter import symm_mem_unavailable

    reason = symm_mem_unavailable(ep, device_type, dim="ep")
    if reason is None:
        return "symm"
    if requested == "symm":
        raise ValueError(f"moe_dispatch over symmetric memory cannot run: {reason}. Use the NCCL all-to-all "
                         f"(kernels={{'moe_dispatch': 'auto'}} or 'torch')")
    warn_once(logger, "fallback", "kernels['moe_dispatch']: the expert-parallel exchange uses NCCL all-to-all, "
              "since %s", reason)
    return "nccl"


class _Workspace:
    """One symmetric allocation per ep group: count areas (W, E) int32 | receive area
    (bound, H) | return area (N, H), and the signal pads; grown (collectively: every rank at
    the same call, shapes agree) when a call needs more."""

    def __init__(self, group: dist.ProcessGroup, nbytes: int):
        import torch.distributed._symmetric_memory as symm_mem
        from torch._C._distributed_c10d import _SymmetricMemory

        name = group.group_name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                symm_mem.enable_symm_mem_for_group(name)
        device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world, self.nbytes = group.rank(), group.size(), nbytes
        self.buf = _SymmetricMemory.empty_strided_p2p((nbytes,), (1,), torch.uint8, device)
        self.hdl = symm_mem.rendezvous(self.buf, name)  # collective
        self.offset = self.buf.data_ptr() - int(self.hdl.buffer_ptrs[self.rank])
        pad_slots = int(self.hdl.signal_pad_size) // 4
        if pad_slots < _SLOT + self.world:
            raise RuntimeError(f"signal pad of {pad_slots} slots is too small for {self.world} ranks")
        self.pads = [self.hdl.get_signal_pad(p, (pad_slots,), dtype=torch.int32) for p in range(self.world)]
        self.ticket = torch.zeros(1, dtype=torch.int32, device=device)
        self.views: dict = {}
        self.last_direction: str | None = None
        self.max_programs = torch.cuda.get_device_properties(device).multi_processor_count
        self.pads[self.rank][_SLOT:].zero_()
        self.hdl.barrier(channel=0)
        torch.cuda.synchronize()

    def areas(self, byte_off: int, dtype: torch.dtype, numel: int) -> list[torch.Tensor]:
        key = (byte_off, dtype, numel)
        if key not in self.views:
            esize = torch.empty((), dtype=dtype).element_size()
            self.views[key] = [self.hdl.get_buffer(p, (numel,), dtype, (self.offset + byte_off) // esize)
                               for p in range(self.world)]
        return self.views[key]


def _align(n: int) -> int:
    return (n + 255) // 256 * 256


class SymmExchange:
    """One MoE layer call's exchange on the GPU (module docstring)."""

    streams = None  # overlap.py's stream pair when the exchange runs beside the experts

    def __init__(self, group: dist.ProcessGroup, counts: torch.Tensor, n_rows: int, h: int, dtype: torch.dtype,
                 bound: int, lane: int = 0, programs: int | None = None):
        """``lane``: which of the group's workspaces (the chunked exchanges of ``overlap.py``
        alternate two, so one chunk's rows may travel while another's are still in use);
        ``programs``: the push's grid cap (default one per SM; fewer leave SMs to a GEMM
        running beside it)."""
        from triton_kernels.moe_dispatch_symm import Tables, launch_exchange

        self.world, self.e, self.n, self.h, self.dtype, self.bound = group.size(), counts.numel(), n_rows, h, dtype, bound
        esize = torch.empty((), dtype=dtype).element_size()
        self.count_bytes = _align(self.world * self.e * 4)
        self.recv_bytes = _align(bound * h * esize)
        need = self.count_bytes + self.recv_bytes + _align(max(n_rows, 1) * h * esize)
        key = f"{group.group_name}/{lane}"
        ws = _WORKSPACES.get(key)
        if ws is None or ws.nbytes < need:
            if ws is not None:
                torch.cuda.synchronize()  # no rank may still use the old buffers
            _WORKSPACES[key] = ws = _Workspace(group, 1 << (need - 1).bit_length())
        self.ws = ws
        self.programs = min(programs or ws.max_programs, ws.max_programs)
        _raise_if_overflowed(key)
        self.tables = Tables(self.e, self.world, counts.device)
        launch_exchange(counts, ws.areas(0, torch.int32, self.world * self.e), ws.pads, ws.rank, self.tables,
                        slot=_SLOT)
        self.recv_counts = self.tables.recv_counts
        _remember_overflow(key, self.tables.info, bound)

    def _order(self, direction: str) -> None:
        if self.ws.last_direction == direction:  # keep pushes alternating (the reuse argument)
            self.ws.hdl.barrier(channel=1)
        self.ws.last_direction = direction

    def _output(self, rows: int) -> torch.Tensor:
        out = torch.empty(max(rows, 1), self.h, dtype=self.dtype, device=self.tables.info.device)
        return out.fill_(float("nan")) if _POISON_UNWRITTEN else out

    def to_expert(self, src: torch.Tensor) -> torch.Tensor:
        from triton_kernels.moe_dispatch_symm import launch_copy_out, launch_push

        self._order("expert")
        areas = self.ws.areas(self.count_bytes, self.dtype, self.bound * self.h)
        out = self._output(self.bound)  # (bound, H): the received rows; the rest never written
        launch_push(src.contiguous(), self.n, areas, self.bound, self.ws.pads, self.ws.ticket, self.tables,
                    self.ws.rank, to_expert=True, out=out, slot=_SLOT, max_programs=self.programs)
        return launch_copy_out(areas[self.ws.rank], out, self.tables, self.ws.rank, self.world, self.bound,
                               to_expert=True, max_programs=self.programs)

    def to_source(self, src: torch.Tensor) -> torch.Tensor:
        from triton_kernels.moe_dispatch_symm import launch_copy_out, launch_push

        self._order("source")
        areas = self.ws.areas(self.count_bytes + self.recv_bytes, self.dtype, max(self.n, 1) * self.h)
        out = self._output(self.n)  # (N, H): every row written (the own ones by the push)
        launch_push(src.contiguous(), 0, areas, self.bound, self.ws.pads, self.ws.ticket, self.tables,
                    self.ws.rank, to_expert=False, out=out, slot=_SLOT, max_programs=self.programs)
        launch_copy_out(areas[self.ws.rank], out, self.tables, self.ws.rank, self.world, self.bound,
                        to_expert=False, max_programs=self.programs)
        return out[:self.n]

    def check(self) -> None:
        """Synchronise and raise if this call's routing exceeded the bound."""
        torch.cuda.current_stream().synchronize()
        _raise_if_exceeded(int(self.tables.info[1]), self.bound)


_PENDING: dict[str, list[tuple[torch.Tensor, int, torch.cuda.Event]]] = {}


def _remember_overflow(key: str, info: torch.Tensor, bound: int) -> None:
    """Copy this call's largest receive count to a pinned host slot, with an event after it;
    a later call of the same key checks it against this call's bound once the event has
    passed (no synchronisation). A slot of its own per call, so a count is never compared
    with another call's bound (the chunks of ``overlap.py`` have other bounds than a whole
    layer's)."""
    host = torch.empty(1, dtype=torch.int32, pin_memory=True)
    host.copy_(info[1:2], non_blocking=True)
    done = None  # inside a CUDA graph's capture: checked at the next synchronising check only
    if not torch.cuda.is_current_stream_capturing():
        done = torch.cuda.Event()
        done.record()
    _PENDING.setdefault(key, []).append((host, bound, done))


def _raise_if_overflowed(key: str, synced: bool = False) -> None:
    """Raise for an earlier call of ``key`` whose count has arrived (its event passed, or
    every one after a synchronize: ``synced``) and exceeded that call's bound."""
    arrived, waiting = [], []
    for p in _PENDING.get(key, []):
        (arrived if synced or (p[2] is not None and p[2].query()) else waiting).append(p)
    _PENDING[key] = waiting
    for host, bound, _ in arrived:
        _raise_if_exceeded(int(host[0]), bound)


def _raise_if_exceeded(need: int, bound: int) -> None:
    if need > bound:
        raise ValueError(f"moe_dispatch: a rank received {need} expert rows but the receive bound is {bound}; that "
                         f"layer's output was skipped. Raise ParallelPlan(moe_recv_bound=...) ([plan] moe_recv_bound "
                         f"in a recipe; ParallelDispatch(recv_bound=...) directly): a multiple of T*k, None for the "
                         f"worst case ep, which never overflows; or use kernels={{'moe_dispatch': 'torch'}}")


def check_and_forget(group: dist.ProcessGroup, check: bool = True) -> None:
    """Raise if the group's pending calls (every lane) exceeded the receive bound (after a
    synchronize; ``check=False``: don't look), and forget them (benchmarks: each row starts
    clean, also after a row that failed)."""
    keys = [k for k in _PENDING if k.rpartition("/")[0] == group.group_name]
    try:
        if check:
            torch.cuda.synchronize()
            for k in keys:
                _raise_if_overflowed(k, synced=True)
    finally:
        for k in keys:
            _PENDING.pop(k, None)


class EmulatedExchange:
    """The same kernels on CPU ranks (interpreter): each push all-gathers its inputs and runs
    every rank's phase on stacked tensors; every rank computes every rank's tables."""

    streams = None

    def __init__(self, group: dist.ProcessGroup, counts: torch.Tensor, n_rows: int, h: int, dtype: torch.dtype,
                 bound: int, lane: int = 0, programs: int | None = None):  # (one emulated area: lanes alike)
        from triton_kernels.moe_dispatch_symm import Tables, launch_exchange

        self.group, self.world, self.rank = group, group.size(), group.rank()
        self.e, self.n, self.h, self.dtype, self.bound = counts.numel(), n_rows, h, dtype, bound
        sizes = _gather(torch.tensor([n_rows]), group)
        if len(set(sizes.flatten().tolist())) != 1:
            raise ValueError(f"moe_dispatch over symmetric memory: ep ranks route different token counts "
                             f"{sizes.flatten().tolist()}; every rank must route T*k = the same number of rows")
        all_counts = _gather(counts.reshape(-1), group)  # (W, E)
        areas = torch.zeros(self.world, self.world * self.e, dtype=torch.int32)
        self.tables = [Tables(self.e, self.world, counts.device) for _ in range(self.world)]
        for s in range(self.world):
            launch_exchange(all_counts[s], list(areas), None, s, self.tables[s], barrier=False, make_tables=False)
        for s in range(self.world):
            launch_exchange(all_counts[s], list(areas), None, s, self.tables[s], push=False, barrier=False)
        self.recv_counts = self.tables[self.rank].recv_counts
        _raise_if_exceeded(int(self.tables[self.rank].info[1]), bound)
        self.ticket = torch.zeros(1, dtype=torch.int32)

    def _push(self, src: torch.Tensor, to_expert: bool) -> torch.Tensor:
        from triton_kernels.moe_dispatch_symm import launch_copy_out, launch_push

        everyone = _gather(src.contiguous(), self.group)  # (W, rows, H)
        rows = max(self.bound if to_expert else self.n, 1)
        # areas and outputs start as NaN: a row that is read but never written shows up
        areas = torch.full((self.world, rows * self.h), float("nan"), dtype=self.dtype)
        outs = torch.full((self.world, rows, self.h), float("nan"), dtype=self.dtype)  # only ours is kept
        for s in range(self.world):
            launch_push(everyone[s], self.n, list(areas), self.bound, None, self.ticket, self.tables[s], s,
                        to_expert=to_expert, out=outs[s], max_programs=3, barrier=False)
        out = launch_copy_out(areas[self.rank], outs[self.rank], self.tables[self.rank], self.rank, self.world,
                              self.bound, to_expert=to_expert, max_programs=2)
        return out if to_expert else out[:self.n]

    def to_expert(self, src: torch.Tensor) -> torch.Tensor:
        return self._push(src, True)

    def to_source(self, src: torch.Tensor) -> torch.Tensor:
        if src.shape[0] < self.bound:  # the CPU experts return only the received rows: pad to
            src = torch.cat([src, src.new_zeros(self.bound - src.shape[0], self.h)])  # equal shapes
        return self._push(src, False)


def _gather(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(out, t, group=group)
    return torch.stack(out)


def _crossing(ex, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Under ``overlap.py``'s two streams (``ex.streams``) this backward runs on the side
    stream (its forward's): the incoming gradient was made on the main one and the result is
    read there; each is marked for the stream that reads it (``record_stream``)."""
    if ex.streams is not None:
        ex.streams.read_on_side(grad)
        ex.streams.read_on_main(out)
    return out


class _ToExpert(torch.autograd.Function):
    """Dispatch: rows to their experts' ranks; backward: the gradient rows back (reverse copy)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, ex) -> torch.Tensor:
        ctx.ex = ex
        return ex.to_expert(rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _crossing(ctx.ex, grad, ctx.ex.to_source(grad)), None


class _ToSource(torch.autograd.Function):
    """Combine's way back: expert outputs to their sources' sorted rows; backward: dispatch."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, ex) -> torch.Tensor:
        ctx.ex, ctx.y_rows = ex, y.shape[0]  # y may stop at the received rows (experts' CPU loop)
        return ex.to_source(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _crossing(ctx.ex, grad, ctx.ex.to_expert(grad))[:ctx.y_rows], None


def open_exchange(rows: torch.Tensor, counts: torch.Tensor, group: dist.ProcessGroup, exchange: str,
                  recv_bound: float | None = None, lane: int = 0, programs: int | None = None):
    """One call's exchange (its counts sent, its tables on the device): a :class:`SymmExchange`
    or, on CPU ranks, an :class:`EmulatedExchange`, for ``rows`` (N, d) with ``counts`` (E,)."""
    world = group.size()
    factor = min(recv_bound, world) if recv_bound is not None else float(world)  # ep: the worst case
    bound = max(1, math.ceil(factor * rows.shape[0]))
    cls = SymmExchange if exchange == "symm" else EmulatedExchange
    return cls(group, counts, rows.shape[0], rows.shape[1], rows.dtype, bound, lane, programs)


def to_experts(rows: torch.Tensor, ex) -> torch.Tensor:
    """Dispatch (autograd): (bound, d) rows of this rank's experts, expert-major, then source."""
    return _ToExpert.apply(rows, ex)


def to_sources(y: torch.Tensor, ex) -> torch.Tensor:
    """Combine's way back (autograd): the expert outputs to their sources' sorted rows (N, d)."""
    return _ToSource.apply(y, ex)


def symm_dispatch_combine(rows: torch.Tensor, counts: torch.Tensor, experts, group: dist.ProcessGroup,
                          exchange: str, recv_bound: float | None = None) -> torch.Tensor:
    """``dispatch.dispatch_combine`` over symmetric memory (or its CPU emulation): rows (N, d)
    sorted by global expert with ``counts`` (E,); returns the expert outputs in rows' order."""
    ex = open_exchange(rows, counts, group, exchange, recv_bound)
    recv = _ToExpert.apply(rows, ex)  # (bound, d): expert-major, then source
    y = experts(recv, ex.recv_counts)  # reads only the received rows (module docstring)
    return _ToSource.apply(y, ex)
