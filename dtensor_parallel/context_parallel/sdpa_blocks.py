"""The "sdpa" backend of the ring's block functions: PyTorch's own fused attention ops, the
ones that return the log-sum-exp (FlashAttention-2, Dao 2023; memory-efficient attention,
Rabe & Staats 2021 / xformers), called through ``torch.ops.aten``.

Which op runs (schemas read in torch 2.11's and 2.13's ``native_functions.yaml``: equal):

- CPU: ``_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward`` (any float
  dtype; the mask is an additive tensor of the query's dtype).
- CUDA sm80+ with cuDNN, fp16/bf16, no document mask, head dim a multiple of 8 up to 128,
  causal only on square blocks: ``_scaled_dot_product_cudnn_attention`` / ``_backward``
  (cuDNN's fused attention: on an H200, 548 TFLOP/s forward at 8K tokens, d128, causal,
  against 300 for the flash op, ``benchmarks/flash_attention_kernel.py``). Its lse is
  (b, h, s_q, 1); its backward gets out and dout contiguous in the same layout (cuDNN
  wants equal strides for the two) and None for the varlen and dropout tensors, as
  torch's own context parallel passes them.
- CUDA otherwise with fp16/bf16, no document mask, head dim a multiple of 8 up to 256, causal
  only on square blocks: ``_scaled_dot_product_flash_attention`` / ``_backward`` (its causal
  mask is bottom-right aligned when s_q != s_k, ours is top-left, so non-square causal goes on).
- CUDA otherwise (fp32, document masks, other head dims, non-square causal):
  ``_scaled_dot_product_efficient_attention`` / ``_backward``, which takes ``attn_bias``
  and whose causal mask is top-left. Its lse comes padded to a multiple of 32 rows: sliced
  here, and padded again for its backward.
- any other device, or fp64 on CUDA: ``NotImplementedError`` naming "torch".

Each block's output comes back in the input dtype and is merged into the running fp32
(out, lse) in place (they may be views): in bf16 a block's output is rounded once before
its merge, which the Triton backend (merging inside its kernel) avoids. The backward calls
the op's backward with the *final* out (cast to the input dtype) and lse, which is exactly
the block's share of the gradients (P = exp(S - lse_final)), as in ``blocks.py``.

GQA (hq = rep * hkv), without repeating k/v where it is exact: for a non-causal block
without a mask, the rep query heads of a group are folded into the query sequence,
q (b, hq, s, d) -> (b, hkv, rep * s, d), a free reshape; every folded row sees every key,
so the result is exact and the op's dK/dV are already summed over the group. Under a
causal or document mask a row's visible keys depend on its position, which the fold loses.
cuDNN's op takes the grouped k/v as they are (``_CUDNN_GQA``); for the other ops k/v are
repeated to hq heads (rep x their memory for the call) and dK/dV summed over each group
in fp32. In the ring only the diagonal step is causal.

Documents (``doc_q``/``doc_k``: (b, s) integer ids; a query sees a key of its own document,
and under ``causal`` only keys at or before it): an additive mask of the query's dtype,
-inf off the documents, passed as ``attn_mask`` (CPU) or ``attn_bias`` (efficient); flash
takes no mask, so a masked CUDA call always uses the efficient op. The mask is s_q x s_k per
sequence: query rows go in chunks to bound it (``MAX_SCORE_ELEMENTS``), and causal is folded
into it (the op then skips no masked tiles). A row that sees no key of the block merges as
lse = -inf, out = 0: its running values stay as they were, and no NaN is made.
"""

from __future__ import annotations

import logging

import torch

from ..warn_once import warn_once
from .blocks import MAX_SCORE_ELEMENTS, deliver

aten = torch.ops.aten
_NEG_INF = float("-inf")
_log = logging.getLogger(__name__)
# cuDNN's fused attention takes k/v with fewer heads than q (a divisor: grouped-query attention;
# pytorch/pytorch#150337), so an unmasked causal block needs no repeat of k/v, and its backward
# returns dK/dV already summed over each group. Cleared, with one log line, if cuDNN refuses.
_CUDNN_GQA = [True]


def _native_gqa(kind: str, rep: int) -> bool:
    return rep > 1 and kind == "cudnn" and _CUDNN_GQA[0]


def _gqa_refused(err: RuntimeError) -> None:
    _CUDNN_GQA[0] = False
    warn_once(_log, "cudnn-gqa", "cuDNN attention refused k/v with fewer heads than q (%s); the ring's "
              "causal blocks repeat k/v instead", str(err).splitlines()[0][:200])


def _kind(q: torch.Tensor, masked: bool, causal: bool, s_k: int) -> str:
    """Which op runs: "cpu", "cudnn", "flash" or "efficient" (see the module docstring)."""
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type != "cuda":
        raise NotImplementedError(f"attention backend 'sdpa': no fused attention op with a log-sum-exp "
                                  f"on {q.device.type}; use the 'torch' backend")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise NotImplementedError(f"attention backend 'sdpa': no fused CUDA attention op for {q.dtype}; "
                                  f"use the 'torch' backend")
    d = q.shape[-1]
    if q.dtype == torch.float32 or masked or d % 8 or (causal and q.shape[2] != s_k):
        return "efficient"
    if d <= 128 and _has_cudnn_attention(q.device):
        return "cudnn"
    return "flash" if d <= 256 else "efficient"


def _has_cudnn_attention(device: torch.device) -> bool:
    """cuDNN's fused attention: cuDNN present and an sm80+ GPU (its SDPA support in torch)."""
    return torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(device)[0] >= 8


def _doc_mask(doc_q: torch.Tensor, doc_k: torch.Tensor, causal: bool, offset: int, heads: int,
              dtype: torch.dtype, pos_q: torch.Tensor | None = None,
              pos_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive mask (b, heads, s_q, s_k) of ``dtype`` (0 where query row offset + i sees
    key j, -inf elsewhere) and (b, s_q): whether the row sees any key. Rows are padded to a
    multiple of 16 elements and heads are a stride-0 expand: the efficient op's alignment."""
    b, s_q = doc_q.shape
    s_k = doc_k.shape[1]
    visible = doc_q[:, :, None] == doc_k[:, None, :]  # (b, s_q, s_k)
    if causal:
        rows = torch.arange(offset, offset + s_q, device=doc_q.device)[:, None]
        visible &= torch.arange(s_k, device=doc_q.device)[None, :] <= rows
    if pos_q is not None:  # global positions (a sequence sharded per document): later keys unseen
        visible &= pos_k[:, None, :] <= pos_q[:, :, None]
    padded = -(-s_k // 16) * 16
    mask = torch.full((b, 1, s_q, padded), _NEG_INF, dtype=dtype, device=doc_q.device)
    mask[..., :s_k].masked_fill_(visible[:, None], 0.0)
    return mask[..., :s_k].expand(b, heads, s_q, s_k), visible.any(-1)


def _positions(pos_q, pos_k, i: int, j: int) -> tuple:
    return (None, None) if pos_q is None else (pos_q[:, i:j], pos_k)


def _attend(kind: str, q, k, v, mask, causal: bool, scale: float):
    """The op's forward: (out (b, h, s_q, d) in q's dtype, lse (b, h, s_q) fp32)."""
    if kind == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                scale=scale)
    if kind == "cudnn":
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
        return out, lse[..., 0]  # (b, h, s_q, 1) -> (b, h, s_q)
    if kind == "flash":
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        return out, lse
    out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, mask, True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., :q.shape[2]]  # (b, h, s_q rounded up to 32) -> (b, h, s_q)


def _attend_backward(kind: str, dout, q, k, v, out, lse, mask, causal: bool, scale: float):
    """The op's backward given the final out (q's dtype) and lse (fp32): (dq, dk, dv)."""
    if kind == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.contiguous(), 0.0, causal, attn_mask=mask, scale=scale)
    b, h, s_q, _ = q.shape
    if kind == "cudnn":
        seed = torch.empty((), dtype=torch.int64, device=q.device)  # no dropout: never read
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return aten._scaled_dot_product_cudnn_attention_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.reshape(b, h, s_q, 1).contiguous(), seed, seed,
            None, None, None, s_q, k.shape[2], 0.0, causal, scale=scale)
    if kind == "flash":
        # no dropout: the rng state is never read (shapes and dtypes as the forward returns them);
        # cum_seq_q/k None is the dense (not varlen) call, as the forward returns them
        rng_state = torch.empty(2, dtype=torch.uint64, device=q.device)
        unused = torch.empty((), dtype=torch.uint64, device=q.device)
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), None, None, s_q, k.shape[2], 0.0, causal,
            rng_state, unused, scale=scale)
    # the efficient op's layouts, as its forward returns them: out in (b, s, h, d) memory (its
    # kernel takes out's batch and head strides but derives the row stride as h * d), and lse
    # (b, h, s_q rounded up to 32), contiguous
    out = out.transpose(1, 2).contiguous().transpose(1, 2)
    lse_padded = torch.zeros(b, h, -(-s_q // 32) * 32, dtype=torch.float32, device=q.device)
    lse_padded[..., :s_q] = lse
    seed, offset = torch.empty((), dtype=torch.int64), torch.empty((), dtype=torch.int64)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, mask, out, lse_padded, seed, offset, 0.0, [True, True, True, False], causal,
        scale=scale)
    return dq, dk, dv


def _write(out, lse, out_b, lse_b, accumulate: bool) -> None:
    """out/lse (fp32) <- (out_b, lse_b) (out_b in the op's dtype), or their online-softmax
    merge, in place: ``out = out e^(lse - lse') + out_b e^(lse_b - lse')`` with lse' =
    logaddexp(lse, lse_b) (``blocks.merge``'s math; a row with lse = -inf on both sides
    stays out = 0, lse = -inf). Two passes over ``out`` (a scale, then a multiply-add that
    promotes out_b inside it), not a fp32 copy of out_b and five temporaries."""
    if not accumulate:
        out.copy_(out_b)
        lse.copy_(lse_b)
        return
    new = torch.logaddexp(lse, lse_b)
    safe = new.masked_fill(torch.isneginf(new), 0.0)
    out.mul_(torch.exp(lse - safe).unsqueeze(-1)).addcmul_(out_b, torch.exp(lse_b - safe).unsqueeze(-1))
    lse.copy_(new)


def _row_chunks(b: int, s_q: int, s_k: int) -> list[tuple[int, int]]:
    rows = max(1, MAX_SCORE_ELEMENTS // (b * s_k))
    return [(i, min(i + rows, s_q)) for i in range(0, s_q, rows)]


def _check_docs(q, k, doc_q, doc_k) -> bool:
    if doc_q is None and doc_k is None:
        return False
    if doc_q is None or doc_k is None:
        raise ValueError("document ids: pass both doc_q and doc_k, or neither")
    if doc_q.shape != (q.shape[0], q.shape[2]) or doc_k.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"document ids {tuple(doc_q.shape)} / {tuple(doc_k.shape)} do not match "
                         f"(batch, sequence) of q {tuple(q.shape)} / k {tuple(k.shape)}")
    return True


class SdpaBlocks:
    """Ring-attention block functions on PyTorch's fused SDPA ops (see the module docstring
    for which op runs where)."""

    name = "sdpa"

    @staticmethod
    def forward_step(q, k, v, out, lse, causal: bool, scale: float, accumulate: bool = True,
                     doc_q=None, doc_k=None, pos_q=None, pos_k=None):
        masked = _check_docs(q, k, doc_q, doc_k)
        kind = _kind(q, masked, causal, k.shape[2])
        b, hq, s_q, d = q.shape
        hkv = k.shape[1]
        rep = hq // hkv
        if not masked:
            if rep > 1 and not causal:  # fold the group into the query sequence: exact, no repeat
                o, l = _attend(kind, q.reshape(b, hkv, rep * s_q, d), k, v, None, False, scale)
                o, l = o.reshape(b, hq, s_q, d), l.reshape(b, hq, s_q)
            else:
                o = None
                if _native_gqa(kind, rep):
                    try:
                        o, l = _attend(kind, q, k, v, None, causal, scale)
                    except torch.OutOfMemoryError:
                        raise  # not a refusal of the grouped k/v (and repeating them needs more)
                    except RuntimeError as err:
                        _gqa_refused(err)
                if o is None:
                    if rep > 1:
                        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                    o, l = _attend(kind, q, k, v, None, causal, scale)
            _write(out, lse, o, l.float(), accumulate)
            return out, lse
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        for i, j in _row_chunks(b, s_q, k.shape[2]):
            mask, seen = _doc_mask(doc_q[:, i:j], doc_k, causal, i, hq, q.dtype, *_positions(pos_q, pos_k, i, j))
            o, l = _attend(kind, q[:, :, i:j], k, v, mask, False, scale)
            seen = seen[:, None, :]  # (b, 1, rows)
            o = o.float().masked_fill(~seen[..., None], 0.0)
            l = l.float().masked_fill(~seen, _NEG_INF)
            _write(out[:, :, i:j], lse[:, :, i:j], o, l, accumulate)
        return out, lse

    @staticmethod
    def backward_block(dout, q, k, v, out, lse, causal: bool, scale: float, doc_q=None, doc_k=None,
                       pos_q=None, pos_k=None, into=None, add_q: bool = False, kv_ready=None):
        masked = _check_docs(q, k, doc_q, doc_k)
        kind = _kind(q, masked, causal, k.shape[2])
        b, hq, s_q, d = q.shape
        hkv, s_k = k.shape[1], k.shape[2]
        rep = hq // hkv
        dout = dout.to(q.dtype).contiguous()
        out = out.to(q.dtype).contiguous()
        # a row no key reached anywhere (lse = -inf, out = 0) gets zero gradients, not NaN
        lse = lse.float().masked_fill(lse == _NEG_INF, float("inf"))
        if not masked and rep > 1 and not causal:  # folded as in the forward
            fold = (b, hkv, rep * s_q)
            dq, dk, dv = _attend_backward(kind, dout.reshape(*fold, d), q.reshape(*fold, d), k, v,
                                          out.reshape(*fold, d), lse.reshape(fold), None, False, scale)
            return deliver(into, add_q, dq.reshape(b, hq, s_q, d), dk, dv, kv_ready=kv_ready)
        if not masked and _native_gqa(kind, rep):  # dK/dV come back summed over each group
            try:
                grads = _attend_backward(kind, dout, q, k, v, out, lse, None, causal, scale)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:
                _gqa_refused(err)
            else:
                return deliver(into, add_q, *grads, kv_ready=kv_ready)
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if not masked:  # the op's dtype: promoted where it is summed or delivered
            dq, dk, dv = _attend_backward(kind, dout, q, k, v, out, lse, None, causal, scale)
        else:
            dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
            dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
            dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
            for i, j in _row_chunks(b, s_q, s_k):
                mask, _ = _doc_mask(doc_q[:, i:j], doc_k, causal, i, hq, q.dtype, *_positions(pos_q, pos_k, i, j))
                gq, gk, gv = _attend_backward(kind, dout[:, :, i:j], q[:, :, i:j], k, v, out[:, :, i:j],
                                              lse[:, :, i:j], mask, False, scale)
                dq[:, :, i:j] = gq
                dk += gk
                dv += gv
        if rep > 1:  # sum each group's query heads into its key/value head, in fp32
            dk = dk.reshape(b, hkv, rep, s_k, d).sum(2, dtype=torch.float32)
            dv = dv.reshape(b, hkv, rep, s_k, d).sum(2, dtype=torch.float32)
        return deliver(into, add_q, dq, dk, dv, kv_ready=kv_ready)
