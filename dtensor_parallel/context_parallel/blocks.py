"""Attention on one (query block, key/value block) pair, with its log-sum-exp.

A backend gives ring attention two functions:

- ``forward_step(q, k, v, out, lse, causal, scale, accumulate, doc_q, doc_k) -> (out, lse)``: attend
  ``q`` to one key/value block and write the result into the fp32 buffers ``out``/``lse``
  **in place** (they may be views: the ring passes the second-chunk half of its
  buffers). ``accumulate=False`` overwrites them (the first step); ``True`` merges:
  ``lse' = logaddexp(lse, lse_b)``, ``out' = out e^(lse - lse') + out_b e^(lse_b - lse')``.
- ``backward_block(dout, q, k, v, out, lse, causal, scale, doc_q, doc_k, into, add_q,
  kv_ready) -> (dq, dk, dv)``: the FlashAttention backward of one block given the *final* out and lse,
  which is exactly that block's share of the gradients: P = exp(S - lse), dV = P^T dO,
  dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q. Without ``into``
  it returns fresh fp32 tensors; with ``into`` = (dq, dk, dv), the ring's fp32 accumulators
  (views), it writes them there (adding dQ to the buffer's values with ``add_q``), and
  returns those: the ring then needs no zero fill, no fp32 copy of a block's gradients and
  no add pass of its own for dQ (:func:`deliver`; the Triton dQ kernel adds in its epilogue). ``kv_ready()``, if
  given, is called once dK/dV are in ``into``: before dQ's kernel where a backend computes
  them apart (Triton), at the end otherwise; the ring sends the accumulator on from there.

Shapes: q (b, hq, s_q, d), k and v (b, hkv, s_k, d) with hq a multiple of hkv (GQA: the
key/value heads are not repeated on the wire; dK/dV sum over each group's query heads).
``causal`` masks key j > query i (top-left; blocks are square where it is used).
``doc_q`` (b, s_q) / ``doc_k`` (b, s_k), both or neither: document ids, non-decreasing
along each sequence; query i sees key j only when they match. ``pos_q`` / ``pos_k``
(with documents, ``causal=False``): global positions, increasing; key j is seen only when
pos_k[j] <= pos_q[i] (blocks of a sequence sharded per document, whose rows interleave). A row may then see no key of
a block: its block lse is -inf and its output 0, so a merge leaves it unchanged (never NaN).
"""

from __future__ import annotations

import torch


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float, offset: int = 0,
            doc_q: torch.Tensor | None = None, doc_k: torch.Tensor | None = None,
            pos_q: torch.Tensor | None = None, pos_k: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of q rows offset..offset+s_q against keys 0..s_k-1; causal masks key j > row,
    documents (``doc_q`` of these rows, ``doc_k`` of these keys) mask other documents' keys,
    global positions (``pos_q``, ``pos_k``) mask later keys."""
    rep = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(rep, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale  # (b, hq, s_q, s_k)
    if causal:
        sq, sk = s.shape[-2:]
        rows = torch.arange(offset, offset + sq, device=s.device)[:, None]
        s = s.masked_fill(torch.arange(sk, device=s.device)[None, :] > rows, float("-inf"))
    if doc_q is not None:
        s = s.masked_fill((doc_q[:, None, :, None] != doc_k[:, None, None, :]), float("-inf"))
    if pos_q is not None:
        s = s.masked_fill((pos_k[:, None, None, :] > pos_q[:, None, :, None]), float("-inf"))
    return s


def _no_key(lse: torch.Tensor) -> torch.Tensor:
    """Rows that saw no key (lse -inf), as a mask to keep exp() free of -inf - -inf."""
    return torch.isneginf(lse)


def merge(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Online-softmax merge of two partial attentions, in fp32 (a side with lse -inf, no key
    seen, weighs 0; both -inf stays -inf with output 0)."""
    new = torch.logaddexp(lse, lse_b)
    safe = new.masked_fill(_no_key(new), 0.0)
    return (out * torch.exp(lse - safe).unsqueeze(-1) + out_b * torch.exp(lse_b - safe).unsqueeze(-1), new)


def deliver(into, add_q: bool, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, kv_ready=None):
    """A block's gradients as ``backward_block`` returns them: fp32 (``into`` None), or written
    into / added to the caller's fp32 buffers ``into`` in one pass each (an add or a copy
    promotes a bf16 gradient in the same pass, computing in fp32: the sum equals adding its
    fp32 copy); then ``kv_ready()``, if given."""
    if into is None:
        grads = dq.float(), dk.float(), dv.float()
    else:
        into[0].add_(dq) if add_q else into[0].copy_(dq)
        into[1].copy_(dk)
        into[2].copy_(dv)
        grads = into
    if kv_ready is not None:
        kv_ready()
    return grads


MAX_SCORE_ELEMENTS = 1 << 27  # fp32 scores held at once: 512 MiB


def _row_chunks(q: torch.Tensor, s_k: int) -> list[tuple[int, int]]:
    """(start, end) query-row chunks so one chunk's scores stay under MAX_SCORE_ELEMENTS."""
    rows = max(1, MAX_SCORE_ELEMENTS // (q.shape[0] * q.shape[1] * s_k))
    return [(i, min(i + rows, q.shape[2])) for i in range(0, q.shape[2], rows)]


class TorchBlocks:
    """Reference backend: plain fp32 PyTorch. Query rows go in chunks, so only one chunk's
    scores are materialized; under a causal mask a chunk reads only the keys up to its last
    row (the others are masked anyway)."""

    name = "torch"

    @staticmethod
    def forward_step(q, k, v, out, lse, causal: bool, scale: float, accumulate: bool = True,
                     doc_q=None, doc_k=None, pos_q=None, pos_k=None):
        rep = q.shape[1] // k.shape[1]
        for i, j in _row_chunks(q, k.shape[2]):
            n = j if causal else k.shape[2]
            kk, vv = k[:, :, :n], v[:, :, :n]
            s = _scores(q[:, :, i:j], kk, causal, scale, offset=i, doc_q=_rows(doc_q, i, j), doc_k=_rows(doc_k, 0, n),
                        pos_q=_rows(pos_q, i, j), pos_k=_rows(pos_k, 0, n))
            lse_b = torch.logsumexp(s, dim=-1)  # (b, hq, rows); -inf where no key is seen
            p = torch.exp(s - lse_b.masked_fill(_no_key(lse_b), 0.0).unsqueeze(-1))
            out_b = torch.matmul(p, vv.float().repeat_interleave(rep, dim=1))
            if accumulate:
                out_b, lse_b = merge(out[:, :, i:j], lse[:, :, i:j], out_b, lse_b)
            out[:, :, i:j] = out_b
            lse[:, :, i:j] = lse_b
        return out, lse

    @staticmethod
    def backward_block(dout, q, k, v, out, lse, causal: bool, scale: float, doc_q=None, doc_k=None,
                       pos_q=None, pos_k=None, into=None, add_q: bool = False, kv_ready=None):
        rep = q.shape[1] // k.shape[1]
        b, hkv, sk, d = k.shape
        dq = []
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        for i, j in _row_chunks(q, sk):
            n = j if causal else sk
            kk, vv = k[:, :, :n], v[:, :, :n]
            s = _scores(q[:, :, i:j], kk, causal, scale, offset=i, doc_q=_rows(doc_q, i, j), doc_k=_rows(doc_k, 0, n),
                        pos_q=_rows(pos_q, i, j), pos_k=_rows(pos_k, 0, n))
            p = torch.exp(s - lse[:, :, i:j].unsqueeze(-1))  # the final lse: this block's share
            do, vf = dout[:, :, i:j].float(), vv.float().repeat_interleave(rep, dim=1)
            dv_c = torch.matmul(p.transpose(-1, -2), do)
            dp = torch.matmul(do, vf.transpose(-1, -2))
            delta = (do * out[:, :, i:j].float()).sum(-1, keepdim=True)
            ds = p * (dp - delta)
            dq.append(torch.matmul(ds, kk.float().repeat_interleave(rep, dim=1)) * scale)
            dk_c = torch.matmul(ds.transpose(-1, -2), q[:, :, i:j].float()) * scale
            dk[:, :, :n] += dk_c.view(b, hkv, rep, n, d).sum(2)
            dv[:, :, :n] += dv_c.view(b, hkv, rep, n, d).sum(2)
        return deliver(into, add_q, torch.cat(dq, 2), dk, dv, kv_ready)


def _rows(doc: torch.Tensor | None, i: int, j: int) -> torch.Tensor | None:
    return None if doc is None else doc[:, i:j]


def get_backend(name: str):
    if name == "torch":
        return TorchBlocks
    if name == "triton":
        from .triton_blocks import TritonBlocks
        return TritonBlocks
    if name == "sdpa":
        from .sdpa_blocks import SdpaBlocks
        return SdpaBlocks
    raise ValueError(f"attention backend {name!r}: choose 'torch', 'triton' or 'sdpa'")
