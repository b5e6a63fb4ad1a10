"""Document masks for flash attention over packed sequences: the ids' checks, the key and
query ranges the kernels walk, and the dense mask of the plain-PyTorch reference.

Packed documents: ``doc_q`` (b, s_q) and ``doc_k`` (b, s_k) give each query and key the id
of its document; query i may attend key j only if ``doc_q[i] == doc_k[j]`` (and, when
causal, j <= i). The ids are non-decreasing along the sequence (documents in order; the
caller guarantees it, as checking would cost a host sync), so the keys query i sees are one
contiguous range, and the queries key j is seen by are one contiguous range::

    kv_lo[i] = first j with doc_k[j] >= doc_q[i]      kv_hi[i] = first j with doc_k[j] > doc_q[i]
    q_lo[j]  = first i with doc_q[i] >= doc_k[j]      q_hi[j]  = first i with doc_q[i] > doc_k[j]

(empty, lo == hi, when the other side holds no token of that document), all four
non-decreasing. Global positions (``pos_q`` (b, s_q), ``pos_k`` (b, s_k), strictly
increasing: rows that are any position-sorted subset of one sequence, as context parallelism
gives each rank) make the mask "same document and ``pos_k[j] <= pos_q[i]``", causal by
global position. Positions being increasing, that only cuts each range at one end::

    kv_hi[i] = min(first j with doc_k[j] > doc_q[i], first j with pos_k[j] > pos_q[i])
    q_lo[j]  = max(first i with doc_q[i] >= doc_k[j], first i with pos_q[i] >= pos_k[j])

and the bounds stay non-decreasing (a max or min of non-decreasing sequences). So a query
block [m0, m1) needs only the keys ``[kv_lo[m0], kv_hi[m1 - 1])`` and a key block [n0, n1)
only the queries ``[q_lo[n0], q_hi[n1 - 1])``: the kernels walk those spans and skip every
other block (a 32K sequence of 2K-token documents costs about 1/16 of causal attention).
Inside a span the element mask is the range test ``kv_lo[i] <= j < kv_hi[i]`` (the dK/dV
kernel: ``q_lo[j] <= i < q_hi[j]``), equal to the id test without positions. A key that no
row of the block sees (``[q_lo[j], q_hi[j])`` misses the block's rows; the mirror for
queries) is not loaded either: values the mask hides never meet a dot, NaN included. The
ranges are computed on the device with ``torch.searchsorted``: no host synchronisation.

A query row may see no key at all (a block of another document, or of later positions): its
lse is -inf and its output 0, which the ring's log-sum-exp merge leaves as is; the backward
gives it, and keys nobody sees, zero gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

_ID_DTYPES = (torch.int32, torch.int64)


class Documents(NamedTuple):
    """The ranges on the device, int32, contiguous: ``kv_lo``/``kv_hi`` (b, s_q) the keys
    query i sees, ``q_lo``/``q_hi`` (b, s_k) the queries that see key j."""

    kv_lo: torch.Tensor
    kv_hi: torch.Tensor
    q_lo: torch.Tensor
    q_hi: torch.Tensor


def _check_per_token(where: str, name: str, t: object, shape: tuple[int, int], device: torch.device,
                     what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where}: {name} must be a tensor of {what}, got {type(t).__name__}")
    if t.dtype not in _ID_DTYPES:
        raise ValueError(f"{where}: {name} must hold integer {what} (int32 or int64), got {t.dtype}; "
                         f"convert it with {name}.long()")
    if tuple(t.shape) != shape:
        raise ValueError(f"{where}: {name} must be (batch, seq) = {shape} (one per token, shared by "
                         f"all heads), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{where}: {name} is on {t.device} but q is on {device}; move it with "
                         f"{name}.to(q.device)")


def check_documents(doc_q: torch.Tensor | None, doc_k: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                    where: str, *, pos_q: torch.Tensor | None = None, pos_k: torch.Tensor | None = None,
                    causal: bool = False) -> bool:
    """Validate ids and positions against q (b, hq, s_q, d) and k (b, hkv, s_k, d); False when
    there are no ids (and no positions)."""
    b, s_q, s_k = q.shape[0], q.shape[2], k.shape[2]
    if pos_q is not None or pos_k is not None:
        if pos_q is None or pos_k is None:
            raise ValueError(f"{where}: pass both pos_q (global positions of the queries) and pos_k (of the "
                             f"keys), or neither; got only {'pos_q' if pos_k is None else 'pos_k'}")
        if doc_q is None and doc_k is None:
            raise ValueError(f"{where}: pos_q/pos_k refine a document mask: pass doc_q and doc_k too (one "
                             "document id for the whole row, e.g. torch.zeros_like(pos_q), if it is one "
                             "document)")
        if causal:
            raise ValueError(f"{where}: positions already make the mask causal (pos_k <= pos_q); pass "
                             "causal=False with pos_q/pos_k")
        _check_per_token(where, "pos_q", pos_q, (b, s_q), q.device, "global token positions")
        _check_per_token(where, "pos_k", pos_k, (b, s_k), q.device, "global token positions")
    if doc_q is None and doc_k is None:
        return False
    if doc_q is None or doc_k is None:
        raise ValueError(f"{where}: pass both doc_q (document ids of the queries) and doc_k (of the keys), "
                         f"or neither; got only {'doc_q' if doc_k is None else 'doc_k'}")
    _check_per_token(where, "doc_q", doc_q, (b, s_q), q.device, "document ids")
    _check_per_token(where, "doc_k", doc_k, (b, s_k), q.device, "document ids")
    return True


def _same_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def document_ranges(doc_q: torch.Tensor, doc_k: torch.Tensor, pos_q: torch.Tensor | None = None,
                    pos_k: torch.Tensor | None = None) -> Documents:
    """The per-query key ranges and per-key query ranges of the module docstring."""
    doc_q, doc_k = _same_dtype(doc_q, doc_k)  # (b, s_q), (b, s_k)
    kv_lo = torch.searchsorted(doc_k, doc_q, out_int32=True)  # (b, s_q)
    kv_hi = torch.searchsorted(doc_k, doc_q, right=True, out_int32=True)  # (b, s_q)
    q_lo = torch.searchsorted(doc_q, doc_k, out_int32=True)  # (b, s_k)
    q_hi = torch.searchsorted(doc_q, doc_k, right=True, out_int32=True)  # (b, s_k)
    if pos_q is not None:
        pos_q, pos_k = _same_dtype(pos_q, pos_k)
        kv_hi = torch.minimum(kv_hi, torch.searchsorted(pos_k, pos_q, right=True, out_int32=True))
        q_lo = torch.maximum(q_lo, torch.searchsorted(pos_q, pos_k, out_int32=True))
        kv_hi = torch.maximum(kv_hi, kv_lo)  # an empty range is lo == hi
        q_lo = torch.minimum(q_lo, q_hi)
    return Documents(kv_lo, kv_hi, q_lo, q_hi)


def document_mask(doc_q: torch.Tensor, doc_k: torch.Tensor, pos_q: torch.Tensor | None = None,
                  pos_k: torch.Tensor | None = None) -> torch.Tensor:
    """keep[b, 0, i, j] = doc_q[b, i] == doc_k[b, j] (and pos_k[b, j] <= pos_q[b, i]):
    (b, 1, s_q, s_k) bool, for the reference."""
    keep = doc_q[:, :, None] == doc_k[:, None, :]  # (b, s_q, s_k)
    if pos_q is not None:
        keep = keep & (pos_k[:, None, :] <= pos_q[:, :, None])
    return keep[:, None]


@triton.jit
def _doc_span(LO, HI, start, S, BLOCK: tl.constexpr):
    """Rows [start, start + BLOCK) of one batch row (clipped to S): the union of their ranges,
    [LO[start], HI[last]) since both bounds are non-decreasing."""
    last = tl.minimum(start + BLOCK, S) - 1
    return tl.load(LO + start), tl.load(HI + last)


@triton.jit
def _seen_by_block(LO, HI, offs, end, first, last, IS_CAUSAL: tl.constexpr, OF_KEYS: tl.constexpr):
    """(BLOCK,) bool: which of the tokens ``offs`` (those below ``end`` <= their count) meet some
    token of the other side's block [first, last), from their ranges LO/HI. OF_KEYS: ``offs``
    are keys, the block query rows (causal: rows >= the key); else ``offs`` are query rows,
    the block keys (causal: keys <= the row)."""
    ok = offs < end
    lo = tl.maximum(tl.load(LO + offs, mask=ok, other=0), first)
    hi = tl.minimum(tl.load(HI + offs, mask=ok, other=0), last)
    if IS_CAUSAL:
        if OF_KEYS:
            lo = tl.maximum(lo, offs)
        else:
            hi = tl.minimum(hi, offs + 1)
    return lo < hi


@triton.jit
def _row_ranges(LO, HI, offs_m, row_ok, IS_CAUSAL: tl.constexpr):
    """The key ranges of query rows ``offs_m`` (empty for padding rows) and which rows see a
    key at all (causal: a key <= the row); the others are never loaded."""
    lo = tl.load(LO + offs_m, mask=row_ok, other=0)
    hi = tl.load(HI + offs_m, mask=row_ok, other=0)
    if IS_CAUSAL:
        return lo, hi, lo < tl.minimum(hi, offs_m + 1)
    return lo, hi, lo < hi
