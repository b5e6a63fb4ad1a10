"""MoE routing fused with the permute copy: two launches from expert ids to sorted rows.

The math (stable counting sort of the T*k flat entries ``i = t*k + j`` by expert, as in
``moe_dispatch.py``'s docstring, equal to ``torch.argsort(ids.flatten(), stable=True)``)::

    counts[e] = #{i : ids[i] == e}          offsets = [0, cumsum(counts)]             (E + 1)
    pos[i]    = offsets[ids[i]] + #{i' < i : ids[i'] == ids[i]}       row_map[pos[i]] = i
    x_sorted[pos[t*k + j]] = x[t]

Every program owns a *chunk* of ``CT`` whole tokens (``CT*k`` consecutive entries) and a span
of hidden columns. It needs ``BASE[c, e] = offsets[e] + #{entries of e before chunk c}``; then
an entry's ``pos`` is ``BASE[c, id]`` plus its rank among the chunk's earlier entries of the
same id (a (CT*K_PAD)^2 comparison), and the program copies its tokens' span into their k
sorted rows (each token row read once). Programs of span 0 write ``pos`` and ``row_map``.
BASE comes from the first of the two launches:

  1. ``_count_kernel``, one program per chunk: the chunk's per-expert counts into
     ``CHUNK_COUNTS (nchunks, E)``, then a ticket (integer atomic). The program that draws
     the last ticket, which therefore runs after every other program has published its
     counts, scans over experts (offsets) and, per expert, over chunks (BASE), and resets
     the ticket to 0 for the next launch. Nothing waits on another program (no spin), so no
     program needs to be co-resident with any other: no deadlock whatever the grid, and the
     interpreter (programs one after another) runs the same code. Memory order: every
     thread fences (gpu scope) before the block barrier and the ticket's acq_rel atomic; the
     last program reads the counts bypassing L1 (``.cg``).
  2. ``_place_kernel``: rank + copy as above, BASE read from memory.

A one-launch variant (every program histogramming all N ids itself, no scratch, no ticket)
was built and measured on an H200 at 8192 tokens x top-2 of 8 (issue 22 item 3,
benchmarks/RESULTS.md): slower than these two launches both on the GPU (permute+unpermute
forward replayed in a CUDA graph, 169 against 117 us) and per call (293 against 219 us),
since every program counts all the ids again. It was removed.

No float atomics, no sort: the result is deterministic and bit-equal to the argsort
reference. The ticket is one int32 per (device, stream) kept here (the kernel resets it);
two launches at once on one stream cannot happen, on two streams they get two tickets. Under
CUDA-graph capture a fresh ticket is allocated (its zero-fill is captured with the kernels),
so a ticket is never first created, uninitialised, inside a capture and reused eagerly.

Host cost: the launch geometry of a (T, k, E, H) shape is computed once and cached
(``_Plan``); a call is the allocations and two ``kernel[grid]`` launches.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["route_and_permute", "route_counts"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_ENTRIES = 16 if _INTERPRET else 128  # entries (CT * K_PAD) per chunk: the rank tile is its square
_MAX_TILE = 64 if _INTERPRET else 16384  # elements of a (chunks, experts) scan tile
_TICKETS: dict[tuple, torch.Tensor] = {}


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _fence_gpu(FENCE: tl.constexpr):
    """Every thread: earlier memory operations ordered before later ones at gpu scope."""
    if FENCE:
        tl.inline_asm_elementwise("fence.acq_rel.gpu;\nmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _chunk_ids(IDS, c, T, K: tl.constexpr, K_PAD: tl.constexpr, CT: tl.constexpr, M: tl.constexpr):
    """Chunk c's ids (CT, K_PAD) (-1 where padded), flat entry indices, validity mask, and each
    entry's rank among the chunk's earlier entries with the same id (M = CT * K_PAD)."""
    offs_t = c * CT + tl.arange(0, CT)
    slots = tl.arange(0, K_PAD)
    ok = (offs_t[:, None] < T) & (slots[None, :] < K)  # (CT, K_PAD)
    flat = offs_t[:, None] * K + slots[None, :]  # (CT, K_PAD) = token * k + slot
    ids = tl.load(IDS + flat, mask=ok, other=-1).to(tl.int32)
    ids1 = tl.reshape(ids, (M,))  # row-major: the flat entry order (padding never matches)
    local = tl.arange(0, M)
    same = (ids1[:, None] == ids1[None, :]) & (local[None, :] < local[:, None])  # (M, M)
    rank = tl.reshape(tl.sum(same.to(tl.int32), axis=1), (CT, K_PAD))
    return ids, flat, ok, rank


@triton.jit
def _write_and_copy(X, POS, ROW_MAP, OUT, pos, flat, ok, c, s, T, H, stride_xt,
                    K_PAD: tl.constexpr, CT: tl.constexpr, SPAN: tl.constexpr, BLOCK_H: tl.constexpr,
                    COPY: tl.constexpr):
    """Span 0 writes POS and ROW_MAP of the chunk's entries; with COPY every program copies its
    tokens' hidden span into their k sorted rows, OUT[pos[t*K + j]] = X[t] (OUT (T*K, H))."""
    write = ok & ((flat * 0 + s) == 0)  # (CT, K_PAD): hidden span 0 writes the maps
    tl.store(POS + flat, pos, mask=write)
    tl.store(ROW_MAP + pos, flat.to(tl.int64), mask=write)
    if COPY:
        pos64 = pos.to(tl.int64)
        offs_t = c * CT + tl.arange(0, CT)
        t_ok = offs_t < T
        for h0 in tl.static_range(0, SPAN, BLOCK_H):
            offs_h = s * SPAN + h0 + tl.arange(0, BLOCK_H)
            h_ok = offs_h < H
            x = tl.load(X + offs_t[:, None].to(tl.int64) * stride_xt + offs_h[None, :],
                        mask=t_ok[:, None] & h_ok[None, :])  # (CT, BLOCK_H)
            tl.store(OUT + pos64[:, :, None] * H + offs_h[None, None, :],
                     tl.broadcast_to(x[:, None, :], (CT, K_PAD, BLOCK_H)),
                     mask=ok[:, :, None] & h_ok[None, None, :])


@triton.jit
def _count_kernel(IDS, CHUNK_COUNTS, BASE, COUNTS, OFFSETS, TICKET, N, CHUNK,
                  E: tl.constexpr, CHUNK_PAD: tl.constexpr, E_PAD: tl.constexpr, NCHUNK_PAD: tl.constexpr,
                  CB: tl.constexpr, FENCE: tl.constexpr):
    """Program c: entries [c*CHUNK, (c+1)*CHUNK) -> CHUNK_COUNTS[c] (E,); the last program to
    finish writes COUNTS (E,), OFFSETS (E+1,) and BASE (nchunks, E) (module docstring)."""
    c = tl.program_id(0)
    nchunks = tl.num_programs(0)
    offs = c * CHUNK + tl.arange(0, CHUNK_PAD)
    ids = tl.load(IDS + offs, mask=(offs < N) & (offs < (c + 1) * CHUNK), other=-1).to(tl.int32)
    experts = tl.arange(0, E_PAD)
    cnt = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)  # (E_PAD,)
    tl.store(CHUNK_COUNTS + c.to(tl.int64) * E + experts, cnt, mask=experts < E)
    _fence_gpu(FENCE)
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKET, 1, sem="acq_rel", scope="gpu")
    if ticket == nchunks - 1:  # every other program's counts are published
        tl.atomic_xchg(TICKET, 0, sem="relaxed", scope="gpu")  # ready for the next launch
        _fence_gpu(FENCE)
        e_ok = experts < E
        total = tl.zeros([E_PAD], tl.int32)
        for c0 in range(0, NCHUNK_PAD, CB):
            rows = c0 + tl.arange(0, CB)
            m = (rows[:, None] < nchunks) & e_ok[None, :]
            tile = tl.load(CHUNK_COUNTS + rows[:, None].to(tl.int64) * E + experts[None, :], mask=m, other=0,
                           cache_modifier=".cg")  # (CB, E_PAD)
            total += tl.sum(tile, axis=0)
        first = tl.cumsum(total, axis=0) - total  # (E_PAD,) exclusive scan over experts
        tl.store(COUNTS + experts, total.to(COUNTS.dtype.element_ty), mask=e_ok)
        tl.store(OFFSETS + experts, first, mask=e_ok)
        tl.store(OFFSETS + E, tl.sum(total, axis=0))
        run = first
        for c0 in range(0, NCHUNK_PAD, CB):  # BASE[c, e] = first[e] + sum_{c' < c} counts[c', e]
            rows = c0 + tl.arange(0, CB)
            m = (rows[:, None] < nchunks) & e_ok[None, :]
            ptrs = rows[:, None].to(tl.int64) * E + experts[None, :]
            tile = tl.load(CHUNK_COUNTS + ptrs, mask=m, other=0, cache_modifier=".cg")
            tl.store(BASE + ptrs, tl.cumsum(tile, axis=0) - tile + run[None, :], mask=m)
            run += tl.sum(tile, axis=0)


@triton.jit
def _place_kernel(X, IDS, BASE, POS, ROW_MAP, OUT, T, H, stride_xt,
                  E: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, CT: tl.constexpr, M: tl.constexpr,
                  SPAN: tl.constexpr, BLOCK_H: tl.constexpr, COPY: tl.constexpr):
    """Program (c, s): tokens [c*CT, (c+1)*CT), hidden columns [s*SPAN, (s+1)*SPAN).
    pos of each entry = BASE[c, id] + its rank among the chunk's earlier entries of that id;
    OUT[pos[t*K + j]] = X[t]. COPY=False: routing only."""
    c = tl.program_id(0)
    s = tl.program_id(1)
    ids, flat, ok, rank = _chunk_ids(IDS, c, T, K, K_PAD, CT, M)
    base = tl.load(BASE + c.to(tl.int64) * E + ids, mask=ok, other=0)
    _write_and_copy(X, POS, ROW_MAP, OUT, base + rank, flat, ok, c, s, T, H, stride_xt,
                    K_PAD, CT, SPAN, BLOCK_H, COPY)


# ----------------------------------------------------------------------------------------
# Launch plans and launchers
# ----------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """The launch geometry of one (T, k, E, H) shape, computed once."""

    nchunks: int
    grid: tuple[int, int]  # (chunks, hidden spans) of the place step
    place_meta: dict  # constexprs (and num_warps) of _place_kernel
    count_meta: dict  # those of _count_kernel


_PLANS: dict[tuple, _Plan] = {}


def _chunk_tokens(k: int) -> int:
    return max(1, _ENTRIES // triton.next_power_of_2(k))


def _copy_config(h: int, k_pad: int, ct: int) -> tuple[int, int, int]:
    """(BLOCK_H, SPAN, num_warps): a (CT, K_PAD, BLOCK_H) store tile of <= 16K elements,
    hidden spans of up to 1024 columns per program (more programs when H is small)."""
    if _INTERPRET:
        return 16, 32, 1
    block_h = max(16, min(triton.next_power_of_2(h), 16384 // (ct * k_pad), 256))
    span = max(block_h, min(1024, triton.next_power_of_2(h)))
    return block_h, span, 4


def _make_plan(t: int, k: int, e: int, h: int, copy: bool) -> _Plan:
    k_pad = triton.next_power_of_2(k)
    e_pad = max(2, triton.next_power_of_2(e))
    ct = _chunk_tokens(k)
    nchunks = triton.cdiv(t, ct)
    block_h, span, warps = _copy_config(h, k_pad, ct)
    grid = (nchunks, triton.cdiv(h, span) if copy else 1)
    nchunk_pad = triton.next_power_of_2(nchunks)
    count_meta = dict(E=e, CHUNK_PAD=max(2, triton.next_power_of_2(ct * k)), E_PAD=e_pad, NCHUNK_PAD=nchunk_pad,
                      CB=max(1, min(nchunk_pad, _MAX_TILE // e_pad)), FENCE=not _INTERPRET,
                      num_warps=1 if _INTERPRET else 8)
    place_meta = dict(E=e, K=k, K_PAD=k_pad, CT=ct, M=ct * k_pad, SPAN=span, BLOCK_H=block_h, COPY=copy,
                      num_warps=warps)
    return _Plan(nchunks, grid, place_meta, count_meta)


def _plan(t: int, k: int, e: int, h: int, copy: bool) -> _Plan:
    key = (t, k, e, h, copy)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _make_plan(*key)
    return plan


def _ticket(device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(1, dtype=torch.int32, device=device)  # zero-filled by the graph itself
    key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    t = _TICKETS.get(key)
    if t is None:
        t = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


def _count(flat: torch.Tensor, plan: _Plan, n_experts: int, k: int, counts: torch.Tensor,
           offsets: torch.Tensor) -> torch.Tensor:
    """The first launch: counts, offsets and BASE (nchunks, E) int32."""
    device = flat.device
    chunk_counts = torch.empty((plan.nchunks, n_experts), device=device, dtype=torch.int32)
    base = torch.empty((plan.nchunks, n_experts), device=device, dtype=torch.int32)  # (nchunks, E)
    _count_kernel[(plan.nchunks,)](flat, chunk_counts, base, counts, offsets, _ticket(device), flat.numel(),
                                   plan.place_meta["CT"] * k, **plan.count_meta)
    return base


def route_counts(flat: torch.Tensor, t: int, k: int, n_experts: int,
                 counts_dtype: torch.dtype = torch.int32) -> tuple[torch.Tensor, torch.Tensor]:
    """counts (E,) and offsets (E+1,) int32 of the flat (T*k,) ids: one launch."""
    counts = torch.empty(n_experts, device=flat.device, dtype=counts_dtype)  # (E,)
    offsets = torch.empty(n_experts + 1, device=flat.device, dtype=torch.int32)  # (E+1,)
    if flat.numel() == 0:
        return counts.zero_(), offsets.zero_()
    _count(flat, _plan(t, k, n_experts, 1, False), n_experts, k, counts, offsets)
    return counts, offsets


def route_and_permute(x: torch.Tensor | None, flat: torch.Tensor, t: int, k: int, n_experts: int,
                      counts_dtype: torch.dtype = torch.int32):
    """x (T, H) with a unit last stride (None: routing only), flat ids (T*k,) int32/int64 in
    [0, E). Returns x_sorted (T*k, H) or None, row_map (T*k,) int64, pos (T*k,) int32,
    counts (E,) ``counts_dtype``, offsets (E+1,) int32: two launches (module docstring)."""
    device = flat.device
    n = flat.numel()
    h = x.shape[1] if x is not None else 1
    counts = torch.empty(n_experts, device=device, dtype=counts_dtype)  # (E,)
    offsets = torch.empty(n_experts + 1, device=device, dtype=torch.int32)  # (E+1,)
    pos = torch.empty(n, device=device, dtype=torch.int32)  # (T*k,)
    row_map = torch.empty(n, device=device, dtype=torch.int64)  # (T*k,)
    out = torch.empty((n, h), device=device, dtype=x.dtype) if x is not None else None  # (T*k, H)
    if n == 0:
        return out, row_map, pos, counts.zero_(), offsets.zero_()
    copy = x is not None and h > 0
    plan = _plan(t, k, n_experts, h, copy)
    src, dst, stride = (x, out, x.stride(0)) if copy else (flat, flat, 0)
    base = _count(flat, plan, n_experts, k, counts, offsets)
    _place_kernel[plan.grid](src, flat, base, pos, row_map, dst, t, h, stride, **plan.place_meta)
    return out, row_map, pos, counts, offsets
