"""Expert-parallel dispatch and combine over symmetric memory: P2P stores, signal-pad barrier.

Papers: GShard (Lepikhin et al. 2020, arXiv:2006.16668) for the all-to-all dispatch/combine
of expert parallelism; DeepEP (DeepSeek-AI 2025) for writing tokens straight into the
owning rank's buffer over NVLink; PyTorch's symmetric memory for peers' buffers mapped into
every GPU's address space (the same facts as ``sp_reduce_scatter.py``: plain loads, stores
and atomics on peers' memory; NVLink multicast is never used).

Layout. W ranks of an ep group, E global experts, ``EL = E / W`` local ones (rank d owns
experts [d*EL, (d+1)*EL)). Each rank holds N = T*k rows sorted by global expert (the local
permute) with ``cnt[s, g]`` rows of expert g on source s. Rank d receives, expert-major and
within an expert by source (the order of the NCCL path's regroup, so the grouped GEMM sees
the same rows in the same places)::

    first[d, g]  = sum_{g' of d, g' < g} sum_s cnt[s, g']               (row of expert g on d)
    send_base[g] = first[dest(g), g] + sum_{s < me} cnt[s, g]            (where my rows of g go)
    my row r of expert g  ->  row send_base[g] + (r - my_start[g]) on rank dest(g)

Kernels (one launch each; the host never waits):

1. ``_exchange_kernel`` (one program): my counts (E,) into slot ``me`` of every peer's
   count area (W, E); signal-pad barrier; from the whole (W, E) matrix the tables above,
   ``recv_counts`` (EL,) for the grouped GEMM, the receive segments (e, s) with their first
   source rows (for the way back), and ``info = [my received rows, the largest any rank
   receives]``. Every rank computes the same largest value, so when it exceeds the receive
   bound R every rank skips every store alike (no out-of-bounds write, no hang) and the
   host raises (``expert_parallel/symm_dispatch.py``).
2. ``_push_kernel``, TO_EXPERT: my sorted rows into the owners' receive areas (dispatch
   forward, combine backward); TO_SOURCE: my received rows back to their sources' return
   areas, at the source's sorted row (combine forward, dispatch backward). Grid-stride over
   row tiles; then every program fences (system scope) and draws a ticket; the program with
   the last ticket signals every peer and waits for every peer's signal (the barrier of
   ``sp_reduce_scatter._signal_barrier`` on one fixed slot). Only that one program spins, and
   it waits only for the peers' last programs of the same launch, which every rank makes
   (same calls, same order): no co-residency needed, no deadlock. When the kernel ends,
   every rank's stores into this rank are visible. Rows a rank sends to itself never enter
   its symmetric area: the push stores them straight into ``OUT``, the call's fresh output.
3. ``_copy_out_kernel``: the peers' rows of this rank's area into ``OUT`` (the area is reused
   by the next call, and autograd keeps the output). TO_EXPERT: the received rows
   ``[0, info[0])``, ``info[0]`` read on the device, less the segments of source ``me``;
   TO_SOURCE: the N return rows less those of my own experts (one contiguous range of my
   sorted rows). Grid-stride over row tiles up to the count: programs past it return at once,
   the grid is fixed by the host-known ``bound`` (no host sync, CUDA-graph capturable). Rows
   of ``OUT`` past ``info[0]`` are never written (see ``expert_parallel/symm_dispatch.py``
   for why nothing reads them). So a dispatch copies the ``info[0]`` rows it received less
   its own, about ``(ep - 1) / ep`` of T*k under balanced routing, where a clone of the
   area copied all ``bound`` rows (ep T*k by default: four times as many at ep 2).

   Why a second launch and not the push's tail: the area is complete only when the push's
   barrier has passed, and only its last program waits for that; every program waiting
   instead would need a grid-wide barrier (the whole grid co-resident) and hold every SM
   idle through the peers' wait. One more launch, which waits for nothing, is the cheaper
   trade (not yet measured apart: the benchmark times dispatch+combine whole), and the own
   rows, the part the push can place itself, already skip the area.

Reuse of the areas (no double buffering needed): pushes alternate TO_EXPERT / TO_SOURCE
(forward: dispatch, combine; backward: combine's, then dispatch's), and each area's reader
(the copy-out right after a push into it) runs before its rank enters the next push's
barrier, which every writer of the area's next push has passed. The caller inserts a bare
barrier when two pushes of one direction follow each other.

Interpreter (``TRITON_INTERPRET=1``): fences compiled out; the phases are constexpr flags,
so :func:`simulate` runs the exchange, push and copy-out code with stacked tensors standing
in for the peers' areas and no barrier (every rank's phase, then the next).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .sp_reduce_scatter import _fence_system, _pick, _signal_barrier, pad8

__all__ = ["MAX_WORLD", "Tables", "copy_out_ref", "launch_copy_out", "launch_exchange", "launch_push", "simulate",
           "tables_ref"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_WORLD = 8
_BIG = tl.constexpr(2 ** 30)  # padding of the ends tables (a constexpr: jit code reads no other globals)


@triton.jit
def _exchange_kernel(COUNTS, A0, A1, A2, A3, A4, A5, A6, A7, S0, S1, S2, S3, S4, S5, S6, S7,
                     SEND_BASE, MY_START, MY_END, RECV_COUNTS, SEG_START, SEG_END, SEG_SRC, INFO, SLOT,
                     RANK: tl.constexpr, WORLD: tl.constexpr, E: tl.constexpr, EL: tl.constexpr,
                     W_PAD: tl.constexpr, E_PAD: tl.constexpr, PUSH: tl.constexpr, BARRIER: tl.constexpr,
                     TABLES: tl.constexpr, FENCE: tl.constexpr):
    """A_p: rank p's count area (WORLD, E) int32; tables: module docstring. Segment q = e*WORLD + s."""
    g = tl.arange(0, E_PAD)
    g_ok = g < E
    if PUSH:
        mine = tl.load(COUNTS + g, mask=g_ok, other=0).to(tl.int32)
        for p in tl.static_range(WORLD):
            tl.store(_pick(p, A0, A1, A2, A3, A4, A5, A6, A7) + RANK * E + g, mine, mask=g_ok)
    if BARRIER:
        _signal_barrier(S0, S1, S2, S3, S4, S5, S6, S7, SLOT, RANK, WORLD, FENCE)
    if TABLES:
        own = _pick(RANK, A0, A1, A2, A3, A4, A5, A6, A7)
        s = tl.arange(0, W_PAD)
        m = (s[:, None] < WORLD) & g_ok[None, :]
        cnt = tl.load(own + s[:, None] * E + g[None, :], mask=m, other=0, cache_modifier=".cg")  # (W_PAD, E_PAD)
        total = tl.sum(cnt, axis=0)  # (E_PAD,) rows of expert g over all sources
        dmat = ((g[None, :] // EL) == s[:, None]) & m  # (W_PAD, E_PAD): expert g lives on rank s
        dsum = tl.sum(tl.where(dmat, total[None, :], 0), axis=1)  # (W_PAD,) rows each rank receives
        dexcl = tl.cumsum(dsum, axis=0) - dsum
        dexcl_g = tl.sum(tl.where(dmat, dexcl[:, None], 0), axis=0)  # (E_PAD,) first row of g's rank
        first = tl.cumsum(total, axis=0) - total - dexcl_g  # (E_PAD,) first row of expert g on its rank
        before_me = tl.sum(tl.where(s[:, None] < RANK, cnt, 0), axis=0)
        tl.store(SEND_BASE + g, first + before_me, mask=g_ok)
        mine = tl.sum(tl.where(s[:, None] == RANK, cnt, 0), axis=0)  # (E_PAD,) my own counts
        my_end = tl.cumsum(mine, axis=0)
        tl.store(MY_START + g, my_end - mine, mask=g_ok)
        tl.store(MY_END + g, tl.where(g_ok, my_end, _BIG))
        local = g_ok & (g // EL == RANK)
        tl.store(RECV_COUNTS + (g - RANK * EL), total.to(RECV_COUNTS.dtype.element_ty), mask=local)
        incl_s = tl.cumsum(cnt, axis=0)  # (W_PAD, E_PAD) over sources
        q = (g[None, :] - RANK * EL) * WORLD + s[:, None]  # segment index of (expert g, source s)
        seg_m = m & local[None, :]
        seg_end = first[None, :] + incl_s
        tl.store(SEG_END + q, seg_end, mask=seg_m)
        tl.store(SEG_START + q, seg_end - cnt, mask=seg_m)
        src_start = tl.cumsum(cnt, axis=1) - cnt  # (W_PAD, E_PAD): first row of g on source s
        tl.store(SEG_SRC + q, src_start, mask=seg_m)
        tl.store(INFO, tl.sum(tl.where(s == RANK, dsum, 0), axis=0))
        tl.store(INFO + 1, tl.max(dsum, axis=0))


@triton.jit
def _push_kernel(SRC, OUT, B0, B1, B2, B3, B4, B5, B6, B7, S0, S1, S2, S3, S4, S5, S6, S7, TICKET,
                 SEND_BASE, MY_START, MY_END, SEG_START, SEG_END, SEG_SRC, INFO, N, BOUND, stride_src, SLOT,
                 H: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr, EL: tl.constexpr,
                 E_PAD: tl.constexpr, SEG_PAD: tl.constexpr, TO_EXPERT: tl.constexpr, BARRIER: tl.constexpr,
                 FENCE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """SRC (rows, H) local with row stride stride_src; B_p: rank p's destination area (rows, H);
    OUT: this rank's output (rows, H), local, which takes the rows bound for this rank itself.
    TO_EXPERT: rows [0, N) of SRC (sorted by global expert) to their owners' receive areas
    (BOUND rows). TO_SOURCE: the INFO[0] received rows back to their sources' return areas.
    No store at all if some rank receives more than BOUND rows (INFO[1] > BOUND)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    fits = tl.load(INFO + 1) <= BOUND
    n_rows = N if TO_EXPERT else tl.load(INFO)
    n_rows = tl.where(fits, n_rows, 0)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_R), nprog):
        r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < n_rows
        if TO_EXPERT:
            ends = tl.load(MY_END + tl.arange(0, E_PAD))  # (E_PAD,), padding = 2**30
            idx = tl.sum((ends[None, :] <= r[:, None]).to(tl.int32), axis=1)  # (BLOCK_R,) global expert
            dst_row = tl.load(SEND_BASE + idx, mask=r_ok, other=0) + r - tl.load(MY_START + idx, mask=r_ok, other=0)
            dst_rank = idx // EL
        else:
            q_ok = tl.arange(0, SEG_PAD) < EL * WORLD
            ends = tl.load(SEG_END + tl.arange(0, SEG_PAD), mask=q_ok, other=_BIG)
            idx = tl.sum((ends[None, :] <= r[:, None]).to(tl.int32), axis=1)  # segment e*WORLD + s
            dst_row = tl.load(SEG_SRC + idx, mask=r_ok, other=0) + r - tl.load(SEG_START + idx, mask=r_ok, other=0)
            dst_rank = idx % WORLD
        dst64 = dst_row.to(tl.int64)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            c_ok = cols < H
            v = tl.load(SRC + r[:, None].to(tl.int64) * stride_src + cols[None, :], mask=r_ok[:, None] & c_ok[None, :])
            for p in tl.static_range(WORLD):
                dst = OUT if p == RANK else _pick(p, B0, B1, B2, B3, B4, B5, B6, B7)  # own rows skip the area
                tl.store(dst + dst64[:, None] * H + cols[None, :], v,
                         mask=(r_ok & (dst_rank == p))[:, None] & c_ok[None, :])
    if BARRIER:
        if FENCE:
            _fence_system()
        tl.debug_barrier()
        ticket = tl.atomic_add(TICKET, 1, sem="acq_rel", scope="gpu")
        if ticket == nprog - 1:  # every program of this launch has stored and fenced
            tl.atomic_xchg(TICKET, 0, sem="relaxed", scope="gpu")
            _signal_barrier(S0, S1, S2, S3, S4, S5, S6, S7, SLOT, RANK, WORLD, FENCE)


@triton.jit
def _copy_out_kernel(AREA, OUT, MY_START, MY_END, SEG_END, INFO, N, BOUND,
                     H: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr, EL: tl.constexpr,
                     SEG_PAD: tl.constexpr, TO_EXPERT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """AREA: this rank's area (rows, H) after a push into it; OUT (rows, H), both local and
    contiguous. Copies the rows the peers stored: TO_EXPERT rows [0, INFO[0]) whose segment's
    source is not RANK; TO_SOURCE rows [0, N) outside RANK's own experts' rows. Nothing if the
    push skipped its stores (INFO[1] > BOUND)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    fits = tl.load(INFO + 1) <= BOUND
    n_rows = tl.minimum(tl.load(INFO), BOUND) if TO_EXPERT else N
    n_rows = tl.where(fits, n_rows, 0)
    own_lo = tl.load(MY_START + RANK * EL)  # my sorted rows of my own experts: [own_lo, own_hi)
    own_hi = tl.load(MY_END + RANK * EL + EL - 1)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_R), nprog):  # none for programs past the count
        r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        if TO_EXPERT:
            q_ok = tl.arange(0, SEG_PAD) < EL * WORLD
            ends = tl.load(SEG_END + tl.arange(0, SEG_PAD), mask=q_ok, other=_BIG)
            seg = tl.sum((ends[None, :] <= r[:, None]).to(tl.int32), axis=1)  # segment e*WORLD + s
            peer = seg % WORLD != RANK
        else:
            peer = (r < own_lo) | (r >= own_hi)
        r_ok = (r < n_rows) & peer
        r64 = r.to(tl.int64)[:, None] * H
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            m = r_ok[:, None] & (cols < H)[None, :]
            tl.store(OUT + r64 + cols[None, :], tl.load(AREA + r64 + cols[None, :], mask=m), mask=m)


class Tables:
    """The exchange's outputs on one rank (regular device tensors, one set per call)."""

    def __init__(self, e: int, world: int, device, counts_dtype=torch.int64):
        el = e // world
        i32 = dict(device=device, dtype=torch.int32)
        self.send_base, self.my_start = torch.empty(e, **i32), torch.empty(e, **i32)
        self.my_end = torch.empty(max(2, triton.next_power_of_2(e)), **i32)  # padded with 2**30
        self.recv_counts = torch.empty(el, device=device, dtype=counts_dtype)  # (EL,)
        self.seg_start, self.seg_end, self.seg_src = (torch.empty(el * world, **i32) for _ in range(3))
        self.info = torch.empty(2, **i32)  # [rows I receive, the most any rank receives]

    def args(self) -> tuple:
        return (self.send_base, self.my_start, self.my_end, self.recv_counts, self.seg_start, self.seg_end,
                self.seg_src, self.info)


def _meta(e: int, world: int) -> dict:
    if not 1 <= world <= MAX_WORLD or e % world:
        raise ValueError(f"moe symmetric dispatch: {e} experts over {world} ranks: need 1 <= W <= {MAX_WORLD} "
                         f"dividing E")
    return dict(WORLD=world, E=e, EL=e // world, W_PAD=max(2, triton.next_power_of_2(world)),
                E_PAD=max(2, triton.next_power_of_2(e)))


def launch_exchange(counts: torch.Tensor, areas: list[torch.Tensor], pads: list[torch.Tensor] | None, rank: int,
                    tables: Tables, *, slot: int = 0, push: bool = True, barrier: bool = True,
                    make_tables: bool = True) -> Tables:
    """counts (E,) this rank's rows per global expert; areas: W count areas (W*E int32),
    rank p's at index p; pads: W int32 signal pads (None without the barrier)."""
    meta = _meta(counts.numel(), len(areas))
    pads8 = pad8(pads) if pads is not None else [None] * MAX_WORLD
    _exchange_kernel[(1,)](counts, *pad8(areas), *pads8, tables.send_base, tables.my_start, tables.my_end,
                           tables.recv_counts, tables.seg_start, tables.seg_end, tables.seg_src, tables.info, slot,
                           RANK=rank, PUSH=push, BARRIER=barrier, TABLES=make_tables, FENCE=not _INTERPRET,
                           num_warps=1 if _INTERPRET else 4, **meta)
    return tables


def _row_config(h: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, num_warps): a fixed heuristic (an autotuner would time configs per
    rank, and ranks launching different grids change nothing here but cost compiles)."""
    if _INTERPRET:
        return 4, 16, 1
    block_h = min(1024, max(64, triton.next_power_of_2(h)))
    return max(1, 4096 // block_h), block_h, 8


def launch_push(src: torch.Tensor, n_rows: int, areas: list[torch.Tensor], bound: int,
                pads: list[torch.Tensor] | None, ticket: torch.Tensor, tables: Tables, rank: int, *, to_expert: bool,
                out: torch.Tensor, slot: int = 0, max_programs: int = 132, barrier: bool = True) -> None:
    """src (rows, H) unit last stride; areas: W row areas in src's dtype, rank p's at index p:
    receive areas of ``bound`` rows (TO_EXPERT) or return areas of each source's rows
    (TO_SOURCE). TO_EXPERT pushes rows [0, n_rows) of src; TO_SOURCE the received rows
    (tables.info[0], on the device, at most ``bound``). ``out``: this rank's contiguous
    output (as many rows as its area), which takes the rows this rank sends to itself
    (:func:`launch_copy_out` adds the peers' rows after the push)."""
    world = len(areas)
    if not out.is_contiguous() or out.shape[1] != src.shape[1] or out.dtype != src.dtype:
        raise ValueError(f"moe symmetric push: out must be contiguous (rows, {src.shape[1]}) {src.dtype}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    e = tables.send_base.numel()
    h = src.shape[1]
    block_r, block_h, warps = _row_config(h)
    rows = n_rows if to_expert else bound
    grid = (max(1, min(max_programs, triton.cdiv(max(rows, 1), block_r))),)
    pads8 = pad8(pads) if pads is not None else [None] * MAX_WORLD
    _push_kernel[grid](src, out, *pad8(areas), *pads8, ticket, tables.send_base, tables.my_start, tables.my_end,
                       tables.seg_start, tables.seg_end, tables.seg_src, tables.info, n_rows, bound, src.stride(0),
                       slot, H=h, RANK=rank, WORLD=world, EL=e // world,
                       E_PAD=max(2, triton.next_power_of_2(e)),
                       SEG_PAD=max(2, triton.next_power_of_2(e)), TO_EXPERT=to_expert, BARRIER=barrier,
                       FENCE=not _INTERPRET, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps)


def launch_copy_out(area: torch.Tensor, out: torch.Tensor, tables: Tables, rank: int, world: int, bound: int,
                    *, to_expert: bool, max_programs: int = 132) -> torch.Tensor:
    """After :func:`launch_push` into this rank's ``area`` (rows * H, its symmetric area):
    the peers' rows into ``out`` (rows, H), contiguous. TO_EXPERT: the received rows
    [0, tables.info[0]) (a device count: no sync), rows past it untouched; TO_SOURCE: all
    ``out.shape[0]`` rows. Returns ``out``."""
    rows, h = out.shape
    if not out.is_contiguous() or area.numel() < rows * h or area.dtype != out.dtype:
        raise ValueError(f"moe symmetric copy-out: out {tuple(out.shape)} {out.dtype} (contiguous) from an area of "
                         f"{area.numel()} {area.dtype} elements")
    e = tables.send_base.numel()
    block_r, block_h, warps = _row_config(h)
    # a pure copy: a few programs per SM hide the loads' latency (a heuristic, not measured)
    grid = (max(1, min(4 * max_programs, triton.cdiv(max(rows, 1), block_r))),)
    _copy_out_kernel[grid](area, out, tables.my_start, tables.my_end, tables.seg_end, tables.info, rows, bound,
                           H=h, RANK=rank, WORLD=world, EL=e // world, SEG_PAD=max(2, triton.next_power_of_2(e)),
                           TO_EXPERT=to_expert, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps)
    return out


def simulate_tables(counts: list[torch.Tensor]) -> list[Tables]:
    """Every rank's count exchange and receive tables on one device (``counts[s]`` (E,) of
    rank s; stacked count areas stand in for the peers', no barrier: each phase on every
    rank, then the next)."""
    world, e, dev = len(counts), counts[0].numel(), counts[0].device
    count_areas = torch.zeros(world, world * e, dtype=torch.int32, device=dev)
    tabs = [Tables(e, world, dev) for _ in range(world)]
    for s in range(world):
        launch_exchange(counts[s], list(count_areas), None, s, tabs[s], barrier=False, make_tables=False)
    for s in range(world):
        launch_exchange(counts[s], list(count_areas), None, s, tabs[s], push=False, barrier=False)
    return tabs


def simulate(rows: list[torch.Tensor], counts: list[torch.Tensor], cap: int, experts=None, fill: float = 0.0):
    """Every rank's exchange, pushes and copy-outs on one device, stacked tensors standing in
    for the peers' areas, no barrier (each phase on every rank, then the next). rows[s]
    (N_s, H) sorted by expert with counts[s] (E,). ``experts(recv, recv_counts, rank)`` maps
    the received rows (default: identity). Areas and outputs start as ``fill`` (NaN shows
    what is never written). Returns per rank (recv (cap, H), recv_counts (EL,), info (2,),
    back (N_s, H): the expert outputs at the source's sorted rows)."""
    world, h = len(rows), rows[0].shape[1]
    dev, dtype = rows[0].device, rows[0].dtype
    tabs = simulate_tables(counts)
    areas = torch.full((world, cap * h), fill, dtype=dtype, device=dev)
    recv = torch.full((world, cap, h), fill, dtype=dtype, device=dev)
    ticket = torch.zeros(1, dtype=torch.int32, device=dev)
    for s in range(world):
        launch_push(rows[s], rows[s].shape[0], list(areas), cap, None, ticket, tabs[s], s, to_expert=True,
                    out=recv[s], max_programs=3, barrier=False)
    for d in range(world):
        launch_copy_out(areas[d], recv[d], tabs[d], d, world, cap, to_expert=True, max_programs=2)
    n_max = max(max(r.shape[0] for r in rows), 1)
    areas = torch.full((world, n_max * h), fill, dtype=dtype, device=dev)
    back = [torch.full((max(r.shape[0], 1), h), fill, dtype=dtype, device=dev) for r in rows]
    outs = []
    for d in range(world):
        y = recv[d] if experts is None else experts(recv[d], tabs[d].recv_counts, d)
        outs.append(y.contiguous())
    for d in range(world):
        launch_push(outs[d], 0, list(areas), cap, None, ticket, tabs[d], d, to_expert=False, out=back[d],
                    max_programs=3, barrier=False)
    for d in range(world):
        launch_copy_out(areas[d], back[d], tabs[d], d, world, cap, to_expert=False, max_programs=2)
    return [(recv[d], tabs[d].recv_counts, tabs[d].info, back[d][:rows[d].shape[0]]) for d in range(world)]


def copy_out_ref(area: torch.Tensor, out: torch.Tensor, tables: Tables, rank: int, world: int, bound: int, *,
                 to_expert: bool) -> torch.Tensor:
    """Plain-PyTorch :func:`launch_copy_out` (host reads of the tables): a new ``out``."""
    rows, h = out.shape
    out = out.clone()
    received, most = tables.info.tolist()
    if most > bound:
        return out
    el = tables.send_base.numel() // world
    r = torch.arange(rows, device=out.device)
    if to_expert:
        source = torch.searchsorted(tables.seg_end, r.to(tables.seg_end.dtype), right=True) % world
        keep = (r < min(received, bound)) & (source != rank)
    else:
        keep = (r < int(tables.my_start[rank * el])) | (r >= int(tables.my_end[rank * el + el - 1]))
    out[keep] = area[:rows * h].view(rows, h)[keep]
    return out


def tables_ref(counts: list[torch.Tensor], world: int) -> list[dict]:
    """Plain-PyTorch receive layout: per rank, ``recv_order`` the (source, source row) of each
    received row (expert-major, then source), and ``recv_counts`` (EL,)."""
    e = counts[0].numel()
    el = e // world
    starts = [torch.cumsum(c, 0) - c for c in counts]
    out = []
    for d in range(world):
        order = []
        for g in range(d * el, (d + 1) * el):
            for s in range(world):
                order += [(s, int(starts[s][g]) + i) for i in range(int(counts[s][g]))]
        out.append({"recv_order": order, "recv_counts": sum(c[d * el:(d + 1) * el] for c in counts)})
    return out
