"""Document masks for flash attention over packed sequences: the ids' checks, the key and
query ranges the kernels walk, and the dense mask of the plain-PyTorch reference.

Packed documents: ``doc_q`` (b, s_q) and ``doc_k`` (b, s_k) give each query and key the id
of its document; query i may attend key j only if ``doc_q[i] == doc_k[j]`` (and, when
causal, j <= i). The ids are non-decreasing along the sequence (documents in order; the
caller guarantees it, as checking would cost a host sync), so the keys of query i's
document are one contiguous range::

    kv_lo[i] = first j with doc_k[j] >= doc_q[i]      kv_hi[i] = 1 + last j with doc_k[j] <= doc_q[i]

(empty, kv_lo == kv_hi, when the keys hold no token of that document), and both bounds are
non-decreasing in i. A query block [m0, m1) therefore needs only the keys
``[kv_lo[m0], kv_hi[m1 - 1])``, and a key block [n0, n1) only the queries
``[q_lo[n0], q_hi[n1 - 1])`` of the mirror ranges. The kernels walk those ranges and load
nothing outside them (blocks of other documents are skipped, not masked: a 32K sequence of
2K-token documents costs about 1/16 of causal attention); inside them the element mask
``doc_q[i] == doc_k[j]`` still applies. The ranges are computed on the device with
``torch.searchsorted``: no host synchronisation.

A query row may see no key at all (a block of another document): its lse is -inf and its
output 0, which the ring's log-sum-exp merge leaves as is; the backward gives it, and keys
nobody sees, zero gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

_ID_DTYPES = (torch.int32, torch.int64)


class Documents(NamedTuple):
    """Document ids and ranges on the device, contiguous (b, s). ``kv_lo``/``kv_hi`` (b, s_q)
    int32: the keys of query i's document; ``q_lo``/``q_hi`` (b, s_k) int32: the queries of
    key j's document (``None`` unless asked for: only the dK/dV kernel walks them)."""

    doc_q: torch.Tensor
    doc_k: torch.Tensor
    kv_lo: torch.Tensor
    kv_hi: torch.Tensor
    q_lo: torch.Tensor | None
    q_hi: torch.Tensor | None


def check_documents(doc_q: torch.Tensor | None, doc_k: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                    where: str) -> bool:
    """Validate the ids against q (b, hq, s_q, d) and k (b, hkv, s_k, d); False when both are None."""
    if doc_q is None and doc_k is None:
        return False
    if doc_q is None or doc_k is None:
        raise ValueError(f"{where}: pass both doc_q (document ids of the queries) and doc_k (of the keys), "
                         f"or neither; got only {'doc_q' if doc_k is None else 'doc_k'}")
    b, s_q, s_k = q.shape[0], q.shape[2], k.shape[2]
    for name, t, s in (("doc_q", doc_q, s_q), ("doc_k", doc_k, s_k)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {name} must be a tensor of document ids, got {type(t).__name__}")
        if t.dtype not in _ID_DTYPES:
            raise ValueError(f"{where}: {name} must hold integer document ids (int32 or int64), got {t.dtype}; "
                             f"convert it with {name}.long()")
        if tuple(t.shape) != (b, s):
            raise ValueError(f"{where}: {name} must be (batch, seq) = {(b, s)} (one id per token, shared by "
                             f"all heads), got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{where}: {name} is on {t.device} but q is on {q.device}; move it with "
                             f"{name}.to(q.device)")
    return True


def document_ranges(doc_q: torch.Tensor, doc_k: torch.Tensor, *, mirror: bool) -> Documents:
    """The ids in one dtype and the per-row ranges (module docstring); ``mirror`` adds the
    per-key query ranges of the dK/dV kernel."""
    ids = torch.promote_types(doc_q.dtype, doc_k.dtype)
    doc_q, doc_k = doc_q.to(ids).contiguous(), doc_k.to(ids).contiguous()  # (b, s_q), (b, s_k)
    kv_lo = torch.searchsorted(doc_k, doc_q, out_int32=True)  # (b, s_q)
    kv_hi = torch.searchsorted(doc_k, doc_q, right=True, out_int32=True)  # (b, s_q)
    docs = Documents(doc_q, doc_k, kv_lo, kv_hi, None, None)
    return with_mirror(docs) if mirror else docs


def with_mirror(docs: Documents) -> Documents:
    """``docs`` with the per-key query ranges (computed once, when the backward needs them)."""
    if docs.q_lo is not None:
        return docs
    q_lo = torch.searchsorted(docs.doc_q, docs.doc_k, out_int32=True)  # (b, s_k)
    q_hi = torch.searchsorted(docs.doc_q, docs.doc_k, right=True, out_int32=True)  # (b, s_k)
    return docs._replace(q_lo=q_lo, q_hi=q_hi)


def document_mask(doc_q: torch.Tensor, doc_k: torch.Tensor) -> torch.Tensor:
    """keep[b, 0, i, j] = doc_q[b, i] == doc_k[b, j]: (b, 1, s_q, s_k) bool, for the reference."""
    return (doc_q[:, :, None] == doc_k[:, None, :])[:, None]


@triton.jit
def _doc_span(LO, HI, start, S, BLOCK: tl.constexpr):
    """Rows [start, start + BLOCK) of one batch row (clipped to S): the union of their ranges,
    [LO[start], HI[last]) since both bounds are non-decreasing."""
    last = tl.minimum(start + BLOCK, S) - 1
    return tl.load(LO + start), tl.load(HI + last)
