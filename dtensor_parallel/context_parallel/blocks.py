"""Attention on one (query block, key/value block) pair, with its log-sum-exp.

A backend gives ring attention two functions:

- ``forward_step(q, k, v, out, lse, causal, scale) -> (out, lse)``: attend ``q`` to one
  key/value block and merge into the running fp32 ``(out, lse)``:
  ``lse' = logaddexp(lse, lse_b)``, ``out' = out e^(lse - lse') + out_b e^(lse_b - lse')``.
- ``backward_block(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)``: the
  FlashAttention backward of one block given the *final* out and lse, which is exactly
  that block's share of the gradients: P = exp(S - lse), dV = P^T dO,
  dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q.

Shapes: q (b, hq, s_q, d), k and v (b, hkv, s_k, d) with hq a multiple of hkv (GQA: the
key/value heads are not repeated on the wire; dK/dV sum over each group's query heads).
``causal`` masks key j > query i (top-left; blocks are square where it is used).
"""

from __future__ import annotations

import torch


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    rep = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(rep, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale  # (b, hq, s_q, s_k)
    if causal:
        sq, sk = s.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    return s


def merge(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Online-softmax merge of two partial attentions, in fp32."""
    new = torch.logaddexp(lse, lse_b)
    return (out * torch.exp(lse - new).unsqueeze(-1) + out_b * torch.exp(lse_b - new).unsqueeze(-1), new)


MAX_SCORE_ELEMENTS = 1 << 27  # fp32 scores held at once: 512 MiB


def _row_chunks(q: torch.Tensor, s_k: int) -> int:
    """Query rows per chunk so one chunk's scores stay under MAX_SCORE_ELEMENTS."""
    return max(1, MAX_SCORE_ELEMENTS // (q.shape[0] * q.shape[1] * s_k))


class TorchBlocks:
    """Reference backend: plain fp32 PyTorch, query rows in chunks so the scores of one
    chunk (not of the whole block) are materialized."""

    name = "torch"

    @staticmethod
    def forward_step(q, k, v, out, lse, causal: bool, scale: float):
        rows = _row_chunks(q, k.shape[2])
        if q.shape[2] > rows and not causal:
            parts = [TorchBlocks.forward_step(q[:, :, i:i + rows], k, v, out[:, :, i:i + rows],
                                              lse[:, :, i:i + rows], False, scale)
                     for i in range(0, q.shape[2], rows)]
            return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)
        s = _scores(q, k, causal, scale)
        lse_b = torch.logsumexp(s, dim=-1)  # (b, hq, s_q)
        rep = q.shape[1] // k.shape[1]
        p = torch.exp(s - lse_b.unsqueeze(-1))
        out_b = torch.matmul(p, v.float().repeat_interleave(rep, dim=1))
        return merge(out, lse, out_b, lse_b)

    @staticmethod
    def backward_block(dout, q, k, v, out, lse, causal: bool, scale: float):
        rows = _row_chunks(q, k.shape[2])
        if q.shape[2] > rows and not causal:
            dq, dk, dv = [], 0.0, 0.0
            for i in range(0, q.shape[2], rows):
                gq, gk, gv = TorchBlocks.backward_block(dout[:, :, i:i + rows], q[:, :, i:i + rows], k, v,
                                                        out[:, :, i:i + rows], lse[:, :, i:i + rows], False, scale)
                dq.append(gq)
                dk, dv = dk + gk, dv + gv
            return torch.cat(dq, 2), dk, dv
        rep = q.shape[1] // k.shape[1]
        s = _scores(q, k, causal, scale)
        p = torch.exp(s - lse.unsqueeze(-1))  # uses the final lse: this block's share
        do, vf = dout.float(), v.float().repeat_interleave(rep, dim=1)
        dv = torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, vf.transpose(-1, -2))
        delta = (do * out.float()).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq = torch.matmul(ds, k.float().repeat_interleave(rep, dim=1)) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
        b, hkv, sk, d = k.shape
        dk = dk.view(b, hkv, rep, sk, d).sum(2)
        dv = dv.view(b, hkv, rep, sk, d).sum(2)
        return dq, dk, dv


def get_backend(name: str):
    if name == "torch":
        return TorchBlocks
    if name == "triton":
        from .triton_blocks import TritonBlocks
        return TritonBlocks
    raise ValueError(f"attention backend {name!r}: choose 'torch' or 'triton'")
