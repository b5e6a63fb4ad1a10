"""MoE routing fused with the permute copy: two launches from expert ids to sorted rows.

The math (stable counting sort of the T*k flat entries ``i = t*k + j`` by expert, as in
``moe_dispatch.py``'s docstring, equal to ``torch.argsort(ids.flatten(), stable=True)``)::

    counts[e] = #{i : ids[i] == e}          offsets = [0, cumsum(counts)]             (E + 1)
    pos[i]    = offsets[ids[i]] + #{i' < i : ids[i'] == ids[i]}       row_map[pos[i]] = i
    x_sorted[pos[t*k + j]] = x[t]

Launches (issue 22 item 3: the old path was 3 Triton launches and about 6 small torch ops,
launch-bound at H4096 top-2):

1. ``_count_kernel``, one program per *chunk* of ``CT`` whole tokens (``CT*k`` consecutive
   entries): the chunk's per-expert counts (a one-hot sum) into ``CHUNK_COUNTS (nchunks, E)``,
   then a ticket (integer atomic). The program that draws the last ticket, which therefore
   runs after every other program has published its counts, does the two scans in one
   program: over experts (``offsets``) and, per expert, over chunks (``BASE[c, e]``: the
   first sorted row of chunk c's entries of expert e) and resets the ticket to 0 for the
   next launch. Nothing waits on another program (no spin), so no program needs to be
   co-resident with any other: no deadlock whatever the grid, and the interpreter (programs
   one after another) runs the same code. Memory order: every thread fences (gpu scope)
   before the block barrier and the ticket's acq_rel atomic; the last program reads the
   counts bypassing L1 (``.cg``).
2. ``_place_kernel``, grid (chunk, hidden span): the chunk's entries' ranks among the
   chunk's earlier entries of the same expert (a (CT*K_PAD)^2 comparison), plus ``BASE``,
   give ``pos``; programs of hidden span 0 write ``pos`` and ``row_map``; every program then
   copies its tokens' hidden span into their k sorted rows (each token row read once).

No float atomics, no sort: the result is deterministic and bit-equal to the argsort
reference. The ticket is one int32 per (device, stream) kept here (the kernel resets it);
two launches at once on one stream cannot happen, on two streams they get two tickets.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["route_and_permute", "route_counts"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_ENTRIES = 16 if _INTERPRET else 128  # entries (CT * K_PAD) per chunk: the rank tile is its square
_MAX_TILE = 64 if _INTERPRET else 16384  # elements of a (chunks, experts) scan tile
_TICKETS: dict[tuple, torch.Tensor] = {}


@triton.jit
def _fence_gpu(FENCE: tl.constexpr):
    """Every thread: earlier memory operations ordered before later ones at gpu scope."""
    if FENCE:
        tl.inline_asm_elementwise("fence.acq_rel.gpu;\nmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


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
    OUT[pos[t*K + j]] = X[t] (OUT (T*K, H) contiguous). COPY=False: routing only."""
    c = tl.program_id(0)
    s = tl.program_id(1)  # M = CT * K_PAD entries
    offs_t = c * CT + tl.arange(0, CT)
    slots = tl.arange(0, K_PAD)
    ok = (offs_t[:, None] < T) & (slots[None, :] < K)  # (CT, K_PAD)
    flat = offs_t[:, None] * K + slots[None, :]  # (CT, K_PAD) = token * k + slot
    ids = tl.load(IDS + flat, mask=ok, other=-1).to(tl.int32)
    ids1 = tl.reshape(ids, (M,))  # row-major: the flat entry order (padding never matches)
    local = tl.arange(0, M)
    same = (ids1[:, None] == ids1[None, :]) & (local[None, :] < local[:, None])  # (M, M)
    rank = tl.reshape(tl.sum(same.to(tl.int32), axis=1), (CT, K_PAD))
    base = tl.load(BASE + c.to(tl.int64) * E + ids, mask=ok, other=0)
    pos = base + rank  # (CT, K_PAD)
    write = ok & ((flat * 0 + s) == 0)  # (CT, K_PAD): hidden span 0 writes the maps
    tl.store(POS + flat, pos, mask=write)
    tl.store(ROW_MAP + pos, flat.to(tl.int64), mask=write)
    if COPY:
        pos64 = pos.to(tl.int64)
        t_ok = offs_t < T
        for h0 in tl.static_range(0, SPAN, BLOCK_H):
            offs_h = s * SPAN + h0 + tl.arange(0, BLOCK_H)
            h_ok = offs_h < H
            x = tl.load(X + offs_t[:, None].to(tl.int64) * stride_xt + offs_h[None, :],
                        mask=t_ok[:, None] & h_ok[None, :])  # (CT, BLOCK_H)
            tl.store(OUT + pos64[:, :, None] * H + offs_h[None, None, :],
                     tl.broadcast_to(x[:, None, :], (CT, K_PAD, BLOCK_H)),
                     mask=ok[:, :, None] & h_ok[None, None, :])


def _ticket(device: torch.device) -> torch.Tensor:
    key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    t = _TICKETS.get(key)
    if t is None:
        t = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


def _chunk_tokens(k: int) -> int:
    return max(1, _ENTRIES // triton.next_power_of_2(k))


def _count(flat: torch.Tensor, t: int, k: int, n_experts: int, counts_dtype: torch.dtype):
    """counts (E,), offsets (E+1,) int32, BASE (nchunks, E) int32 for chunks of whole tokens."""
    device = flat.device
    n = flat.numel()
    ct = _chunk_tokens(k)
    nchunks = triton.cdiv(t, ct)
    counts = torch.empty(n_experts, device=device, dtype=counts_dtype)  # (E,)
    offsets = torch.empty(n_experts + 1, device=device, dtype=torch.int32)  # (E+1,)
    base = torch.empty((nchunks, n_experts), device=device, dtype=torch.int32)  # (nchunks, E)
    if n == 0:
        counts.zero_()
        offsets.zero_()
        return counts, offsets, base, ct
    chunk_counts = torch.empty((nchunks, n_experts), device=device, dtype=torch.int32)
    e_pad = max(2, triton.next_power_of_2(n_experts))
    nchunk_pad = triton.next_power_of_2(nchunks)
    cb = max(1, min(nchunk_pad, _MAX_TILE // e_pad))
    _count_kernel[(nchunks,)](flat, chunk_counts, base, counts, offsets, _ticket(device), n, ct * k,
                              E=n_experts, CHUNK_PAD=max(2, triton.next_power_of_2(ct * k)), E_PAD=e_pad,
                              NCHUNK_PAD=nchunk_pad, CB=cb, FENCE=not _INTERPRET,
                              num_warps=1 if _INTERPRET else 8)
    return counts, offsets, base, ct


def route_counts(flat: torch.Tensor, t: int, k: int, n_experts: int,
                 counts_dtype: torch.dtype = torch.int32) -> tuple[torch.Tensor, torch.Tensor]:
    """counts (E,) and offsets (E+1,) int32 of the flat (T*k,) ids: one launch."""
    counts, offsets, _, _ = _count(flat, t, k, n_experts, counts_dtype)
    return counts, offsets


def _copy_config(h: int, k_pad: int, ct: int) -> tuple[int, int, int]:
    """(BLOCK_H, SPAN, num_warps): a (CT, K_PAD, BLOCK_H) store tile of <= 16K elements,
    hidden spans of up to 1024 columns per program (more programs when H is small)."""
    if _INTERPRET:
        return 16, 32, 1
    block_h = max(16, min(triton.next_power_of_2(h), 16384 // (ct * k_pad), 256))
    span = max(block_h, min(1024, triton.next_power_of_2(h)))
    return block_h, span, 4


def route_and_permute(x: torch.Tensor | None, flat: torch.Tensor, t: int, k: int, n_experts: int,
                      counts_dtype: torch.dtype = torch.int32):
    """x (T, H) with a unit last stride (None: routing only), flat ids (T*k,) int32/int64 in
    [0, E). Returns x_sorted (T*k, H) or None, row_map (T*k,) int64, pos (T*k,) int32,
    counts (E,) ``counts_dtype``, offsets (E+1,) int32: two launches."""
    device = flat.device
    n = flat.numel()
    counts, offsets, base, ct = _count(flat, t, k, n_experts, counts_dtype)
    pos = torch.empty(n, device=device, dtype=torch.int32)  # (T*k,)
    row_map = torch.empty(n, device=device, dtype=torch.int64)  # (T*k,)
    h = x.shape[1] if x is not None else 1
    out = torch.empty((n, h), device=device, dtype=x.dtype) if x is not None else None  # (T*k, H)
    if n == 0:
        return out, row_map, pos, counts, offsets
    k_pad = triton.next_power_of_2(k)
    block_h, span, warps = _copy_config(h, k_pad, ct)
    copy = x is not None and h > 0
    grid = (triton.cdiv(t, ct), triton.cdiv(h, span) if copy else 1)
    _place_kernel[grid](x if copy else flat, flat, base, pos, row_map, out if copy else flat, t, h,
                        x.stride(0) if copy else 0, E=n_experts, K=k, K_PAD=k_pad, CT=ct, M=ct * k_pad, SPAN=span,
                        BLOCK_H=block_h, COPY=copy, num_warps=warps)
    return out, row_map, pos, counts, offsets
