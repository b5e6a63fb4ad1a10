"""Flash attention with log-sum-exp, the local compute of ring attention: launchers,
input checks, autograd and the public ops. The forward kernel and the math are in
``flash_attention_kernels.py``, the backward kernels in ``flash_attention_bwd_kernels.py``.

Head dims: any d in 1..128. The kernels take a power of two >= 16 (``tl.dot`` needs a
K of at least 16); other sizes (8 in the tests' tiny models, 80 or 96 in some real ones)
are zero-padded on the way in and sliced on the way out. Zero columns change no score and
give zero output and gradient columns, so the result is exact; the cost is the padded
FLOPs.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
import triton

from .flash_attention_bwd_fused import _attn_bwd_fused
from .flash_attention_bwd_kernels import _attn_bwd_dkdv, _attn_bwd_dq, _bwd_preprocess
from .flash_attention_documents import Documents, check_documents, document_mask, document_ranges
from .flash_attention_hopper import ensure_allocator, forward_tma, hopper_eligible
from .flash_attention_kernels import _INTERPRET, _SUPPORTED_DTYPES, _attn_fwd

# The TMA forward (flash_attention_hopper.py) runs where it can; DTP_FLASH_TMA=0 keeps every
# forward on the pointer-based kernel (a way to tell the two apart if a result looks wrong).
_TMA_FORWARD = os.environ.get("DTP_FLASH_TMA", "1") != "0"
# The backward kernels' TMA loads: correct (interpreter and GPU tests) but slower on an H200
# (triton 3.6, b1 hq32 hkv8 causal bf16, benchmarks/results/flash_backward_d128.json): the split
# backward at d128 took 3.98 ms with them against 3.63 at 8K tokens, 52.5 against 49.7 at 32K;
# at d64 the same within 1%. Off; benchmarks/flash_attention_kernel.py times them again.
_TMA_BACKWARD = False
# Which backward runs: "split" (two kernels, seven matmuls, deterministic) or "fused" (one pass,
# five matmuls, dQ summed with fp32 atomics, so its last bits vary from run to run;
# flash_attention_bwd_fused.py). "fused" yields to "split" under
# torch.use_deterministic_algorithms(True) and with document masks. DTP_FLASH_BWD overrides.
# "split" is the default because it is the faster one on an H200 (the fused kernel's docstring
# has the numbers).
_BACKWARD = os.environ.get("DTP_FLASH_BWD", "split")
if _BACKWARD not in ("split", "fused"):
    raise ValueError(f"DTP_FLASH_BWD={_BACKWARD!r}: choose 'split' or 'fused'")
# The fused backward adds dQ shares with one bulk TMA reduction per tile on Hopper instead of
# one atomic per element: 0.89x the time of per-element atomics with TMA loads at d128, the same at
# d64, never faster than the fused kernel without TMA (same file). Off.
_TMA_REDUCE_DQ = False

__all__ = [
    "attention_ref",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_ring_step",
]


# ----------------------------------------------------------------------------------------
# Launchers and checks
# ----------------------------------------------------------------------------------------


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides but need the head dim contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Validate q (b, hq, s_q, d), k/v (b, hkv, s_k, d); return (b, hq, hkv, s_q, s_k, d)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be 4-D (batch, heads, seq, head_dim), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"flash_attention: {name}.dtype is {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"flash_attention: tensors are on {q.device}; the Triton kernels need CUDA "
                         "(or TRITON_INTERPRET=1 set before triton is imported, for CPU tensors)")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    b, hq, s_q, d = q.shape
    bk, hkv, s_k, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch "
                         "or head_dim (layout is (batch, heads, seq, head_dim))")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"flash_attention: query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if not 1 <= d <= 128:
        raise ValueError(f"flash_attention: head_dim {d} unsupported: the kernels take 1..128")
    if s_q == 0 or s_k == 0:
        raise ValueError(f"flash_attention: empty sequence (s_q={s_q}, s_k={s_k})")
    return b, hq, hkv, s_q, s_k, d


def _kernel_head_dim(d: int) -> int:
    """The head dim the kernels run at: a power of two, at least 16 (``tl.dot``'s minimum K)."""
    return max(16, triton.next_power_of_2(d))


def _pad_head(t: torch.Tensor, d_kernel: int) -> torch.Tensor:
    """Zero-pad the head dim to ``d_kernel`` (a no-op when it already is)."""
    return t if t.shape[-1] == d_kernel else F.pad(t, (0, d_kernel - t.shape[-1]))


def _flags(dtype: torch.dtype) -> dict:
    # The interpreter's bf16 tl.dot is wrong: upcast bf16 loads to fp32 there. fp32 (or
    # upcast) operands use IEEE fp32 dots, never TF32.
    upcast = _INTERPRET and dtype == torch.bfloat16
    return {"UPCAST": upcast, "PRECISION": "ieee" if (upcast or dtype == torch.float32) else "tf32"}


def _documents(q: torch.Tensor, k: torch.Tensor, causal: bool, where: str, doc_q: torch.Tensor | None,
               doc_k: torch.Tensor | None, pos_q: torch.Tensor | None, pos_k: torch.Tensor | None
               ) -> Documents | None:
    """Checked ids (and positions) turned into their ranges on the device, or None (no document mask)."""
    if not check_documents(doc_q, doc_k, q, k, where, pos_q=pos_q, pos_k=pos_k, causal=causal):
        return None
    return document_ranges(doc_q, doc_k, pos_q, pos_k)


def _doc_args(docs: Documents | None, dummy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """KV_LO, KV_HI, Q_LO, Q_HI pointer arguments (``dummy`` stands in for all four without documents)."""
    return (dummy,) * 4 if docs is None else tuple(docs)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
             causal: bool, scale: float, has_acc: bool, docs: Documents | None = None,
             dims: tuple[int, ...] | None = None) -> None:
    """Write attention of (q, k, v) into ``out``/``lse`` (merge into them when ``has_acc``).
    ``dims``: what :func:`_check_qkv` returned for these inputs, when the caller checked them."""
    b, hq, hkv, s_q, s_k, d = dims or _check_qkv(q, k, v)
    d_kernel = _kernel_head_dim(d)
    if d_kernel != d:  # run padded, copy the real columns back into the caller's buffer
        out_padded = _pad_head(out, d_kernel) if has_acc else out.new_empty((*out.shape[:3], d_kernel))
        _forward(*(_pad_head(t, d_kernel) for t in (q, k, v)), out_padded, lse, causal, scale, has_acc, docs)
        out.copy_(out_padded[..., :d])
        return

    if _TMA_FORWARD and hopper_eligible(q, k, v, docs is not None):
        forward_tma(q, k, v, out, lse, causal, scale, has_acc)
        return

    def grid(meta: dict) -> tuple[int, int]:
        return (b * hq, triton.cdiv(s_q, meta["BLOCK_M"]))

    _attn_fwd[grid](
        q, k, v, out, lse, *_doc_args(docs, lse), scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
        hq, hq // hkv, s_q, s_k,
        HEAD_DIM=d, IS_CAUSAL=bool(causal), HAS_ACC=has_acc, HAS_DOCS=docs is not None, **_flags(q.dtype),
    )


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
              dout: torch.Tensor, dlse: torch.Tensor | None, causal: bool, scale: float,
              grad_dtype: torch.dtype | None = None, docs: Documents | None = None,
              into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, add_q: bool = False,
              kv_ready: Callable[[], None] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, hq, hkv, s_q, s_k, d = _check_qkv(q, k, v)
    for name, t in (("out", out), ("dout", dout)):
        if t.shape != q.shape:
            raise ValueError(f"flash_attention backward: {name} shape {tuple(t.shape)} != q shape {tuple(q.shape)}")
    if lse.shape != (b, hq, s_q):
        raise ValueError(f"flash_attention backward: lse shape {tuple(lse.shape)} != {(b, hq, s_q)}")
    d_kernel = _kernel_head_dim(d)
    if into is not None and (d_kernel != d or _fused_backward(docs)):  # those paths write fresh tensors
        grads = _backward(q, k, v, out, lse, dout, dlse, causal, scale, torch.float32, docs)
        into[0].add_(grads[0]) if add_q else into[0].copy_(grads[0])
        into[1].copy_(grads[1])
        into[2].copy_(grads[2])
        if kv_ready is not None:
            kv_ready()
        return into
    if d_kernel != d:
        grads = _backward(*(_pad_head(t, d_kernel) for t in (q, k, v, out)), lse, _pad_head(dout, d_kernel),
                          dlse, causal, scale, grad_dtype, docs)
        if kv_ready is not None:
            kv_ready()
        return tuple(g[..., :d] for g in grads)
    out, dout = _unit_last(out), _unit_last(dout)
    lse = lse.float().contiguous()
    delta = torch.empty((b, hq, s_q), device=q.device, dtype=torch.float32)  # (b, hq, s_q)
    pre_block = 32 if _INTERPRET else 64
    _bwd_preprocess[(triton.cdiv(s_q, pre_block), b * hq)](
        out, dout, dlse.float().contiguous() if dlse is not None else delta, delta,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        hq, s_q, HEAD_DIM=d, HAS_DLSE=dlse is not None, BLOCK_M=pre_block,
    )
    if into is None:
        dk = torch.empty(k.shape, device=k.device, dtype=grad_dtype or k.dtype)  # (b, hkv, s_k, d)
        dv = torch.empty(v.shape, device=v.device, dtype=grad_dtype or v.dtype)  # (b, hkv, s_k, d)
    else:
        dk, dv = into[1], into[2]
    flags = _flags(q.dtype)
    eligible = hopper_eligible(q, k, v, docs is not None, dout)
    flags["TMA"] = _TMA_BACKWARD and eligible
    fused = _fused_backward(docs)
    tma_reduce = _TMA_REDUCE_DQ and eligible and fused
    if flags["TMA"] or tma_reduce:  # device-side descriptors need Triton's scratch allocator
        ensure_allocator()
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    if fused:
        dq_sum = torch.zeros(q.shape, device=q.device, dtype=torch.float32)  # unscaled dQ, atomics add here
        _attn_bwd_fused[lambda meta: (b * hkv, triton.cdiv(s_k, meta["BLOCK_N"]))](
            q, k, v, dout, lse, delta, dk, dv, dq_sum, scale, *common,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            dq_sum.stride(0), dq_sum.stride(1), dq_sum.stride(2),
            hq, hkv, hq // hkv, s_q, s_k, HEAD_DIM=d, IS_CAUSAL=bool(causal),
            TMA_REDUCE=tma_reduce, **flags,
        )
        if kv_ready is not None:
            kv_ready()
        return dq_sum.mul_(scale).to(grad_dtype or q.dtype), dk, dv
    dq = torch.empty(q.shape, device=q.device, dtype=grad_dtype or q.dtype) if into is None else into[0]
    _attn_bwd_dkdv[lambda meta: (b * hkv, triton.cdiv(s_k, meta["BLOCK_N"]))](
        q, k, v, dout, lse, delta, dk, dv, *_doc_args(docs, lse), scale, *common,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        hq, hkv, hq // hkv, s_q, s_k, HEAD_DIM=d, IS_CAUSAL=bool(causal), HAS_DOCS=docs is not None, **flags,
    )
    if kv_ready is not None:  # dK/dV are written: the caller's next work goes between the two kernels
        kv_ready()
    _attn_bwd_dq[lambda meta: (b * hq, triton.cdiv(s_q, meta["BLOCK_M"]))](
        q, k, v, dout, lse, delta, dq, *_doc_args(docs, lse), scale, *common,
        dq.stride(0), dq.stride(1), dq.stride(2),
        hq, hq // hkv, s_q, s_k, HEAD_DIM=d, IS_CAUSAL=bool(causal), HAS_DOCS=docs is not None, **flags,
        ACCUMULATE=into is not None and add_q,
    )
    return dq, dk, dv


def _fused_backward(docs: Documents | None) -> bool:
    """Whether the one-pass backward runs: chosen, no document mask, determinism not asked for."""
    return _BACKWARD == "fused" and docs is None and not torch.are_deterministic_algorithms_enabled()


class _FlashAttention(torch.autograd.Function):
    """out, lse = attention(q, k, v); gradients flow from both out and lse."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                scale: float, docs: Documents | None, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)  # strides only: ``dims`` still hold
        b, hq, _, s_q, _, _ = dims
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)  # (b, hq, s_q, d)
        lse = torch.empty((b, hq, s_q), device=q.device, dtype=torch.float32)  # (b, hq, s_q)
        _forward(q, k, v, out, lse, causal, scale, has_acc=False, docs=docs, dims=dims)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.docs = causal, scale, docs  # docs: integer ranges, no grad
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, ctx.causal, ctx.scale, docs=ctx.docs)
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------


def _scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    softmax_scale: float | None = None, doc_q: torch.Tensor | None = None,
                    doc_k: torch.Tensor | None = None, pos_q: torch.Tensor | None = None,
                    pos_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its row log-sum-exp; differentiable in q, k, v (through both outputs).

    Args:
        q: (b, hq, s_q, d); k, v: (b, hkv, s_k, d) with hq a multiple of hkv (GQA);
            fp16/bf16/fp32, any head dim d in 1..128 (see the module docstring).
        causal: top-left aligned mask, query i sees keys j <= i (see the module docstring).
        softmax_scale: defaults to 1 / sqrt(d).
        doc_q, doc_k: document ids (b, s_q) and (b, s_k), int32/int64, non-decreasing along
            the sequence (packed documents, in order); query i sees key j only if
            ``doc_q[i] == doc_k[j]`` (and the causal mask). Both or neither. Only the keys of
            each query block's documents are computed (``flash_attention_documents.py``).
        pos_q, pos_k: global token positions (b, s_q) and (b, s_k), int32/int64, strictly
            increasing along the sequence (rows that are position-sorted subsets of one
            sequence, e.g. a context-parallel rank's tokens): query i sees key j only if also
            ``pos_k[j] <= pos_q[i]``, causal by global position. Both or neither, only with
            doc_q/doc_k, and with ``causal=False`` (they replace the local causal mask).

    Returns:
        out (b, hq, s_q, d) in the input dtype, lse (b, hq, s_q) fp32, natural log. A row that
        sees no key (its document has no token among the keys, or with positions none at or
        before its own) gets out 0 and lse -inf, and zero gradients; it is never read.
    """
    dims = _check_qkv(q, k, v)
    docs = _documents(q, k, causal, "flash_attention", doc_q, doc_k, pos_q, pos_k)
    return _FlashAttention.apply(q, k, v, bool(causal), _scale(q, softmax_scale), docs, dims)


def flash_attention_ring_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor | None, lse: torch.Tensor | None, *, causal: bool,
                              softmax_scale: float | None = None, accumulate: bool = True,
                              doc_q: torch.Tensor | None = None, doc_k: torch.Tensor | None = None,
                              pos_q: torch.Tensor | None = None, pos_k: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One ring-attention step: attend q to this K/V block and merge into the running result.

    In the kernel, in fp32: ``new_lse = logaddexp(lse, lse_blk)``,
    ``out = out * exp(lse - new_lse) + out_blk * exp(lse_blk - new_lse)``.
    ``out`` (b, hq, s_q, d) fp32 and ``lse`` (b, hq, s_q) fp32 are updated **in place** and
    returned. They may be strided views (unit stride along the head dim of ``out`` and the
    sequence of ``lse``), so a ring can merge into half of its buffers without a copy.
    ``accumulate=False`` overwrites them instead (the first step: no zero fill, no merge);
    ``None`` for both allocates them (and implies ``accumulate=False``).
    Forward only: the ring backward calls :func:`flash_attention_backward` with the final
    out/lse. Causal follows :func:`flash_attention` (pass ``causal=True`` for the diagonal block).
    ``doc_q``/``doc_k`` (and ``pos_q``/``pos_k``): the document ids (and global positions) of
    q and of this K/V block, as in :func:`flash_attention`. Rows that see no key of this block
    keep their running (out, lse) unchanged (``accumulate=False``: they get out 0, lse -inf); a
    block that shares no document with q costs almost nothing. Context parallelism over
    position-sorted shards passes each rank's global positions and ``causal=False`` for every
    block, its own included.
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, hq, _, s_q, _, d = _check_qkv(q, k, v)
    if (out is None) != (lse is None):
        raise ValueError("flash_attention_ring_step: pass both out and lse, or neither (first step)")
    if out is None:
        out = torch.empty((b, hq, s_q, d), device=q.device, dtype=torch.float32)  # (b, hq, s_q, d)
        lse = torch.empty((b, hq, s_q), device=q.device, dtype=torch.float32)
        accumulate = False
    if out.shape != q.shape or out.dtype != torch.float32 or out.stride(-1) != 1 or out.device != q.device:
        raise ValueError(f"flash_attention_ring_step: out must be fp32 {tuple(q.shape)} on {q.device} with a "
                         f"contiguous head dim; got {out.dtype} {tuple(out.shape)} stride {out.stride()}")
    if lse.shape != (b, hq, s_q) or lse.dtype != torch.float32 or lse.stride(-1) != 1 \
            or lse.device != q.device:
        raise ValueError(f"flash_attention_ring_step: lse must be fp32 {(b, hq, s_q)} on {q.device} with a "
                         f"unit stride along the sequence; got {lse.dtype} {tuple(lse.shape)} stride {lse.stride()}")
    docs = _documents(q, k, causal, "flash_attention_ring_step", doc_q, doc_k, pos_q, pos_k)
    _forward(q, k, v, out, lse, causal, _scale(q, softmax_scale), has_acc=accumulate, docs=docs)
    return out, lse


def flash_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, dout: torch.Tensor, *, causal: bool,
                             softmax_scale: float | None = None,
                             grad_dtype: torch.dtype | None = None, doc_q: torch.Tensor | None = None,
                             doc_k: torch.Tensor | None = None, pos_q: torch.Tensor | None = None,
                             pos_k: torch.Tensor | None = None,
                             into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                             add_q: bool = False, kv_ready: Callable[[], None] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one (q, K/V block) pair given the *global* ``out`` and ``lse``.

    With the final out/lse of the whole ring, ``P = exp(s - lse)`` of this block is exactly
    its share of the global softmax and ``delta = rowsum(dout * out)`` is the global one, so
    the ring backward sums dq over K/V blocks and dk/dv over query blocks. ``out`` and
    ``dout`` may be fp32 or the input dtype (dout enters the dots in q's dtype).
    ``grad_dtype`` (default: the input dtype) lets the ring accumulate partials in fp32.
    ``doc_q``/``doc_k``/``pos_q``/``pos_k`` as in the forward; rows with lse -inf and keys that no query of
    their document sees get zero gradients. ``into`` = (dq, dk, dv), the ring's fp32
    accumulators (views allowed, unit stride in the last dim): the kernels write their
    gradients there (dq added to the buffer's values with ``add_q``: the ring's dQ accumulates at
    home; its dK/dV accumulators travel, so it adds those after the kernel) and return those
    tensors: no fresh tensors and no separate add pass. ``kv_ready`` is called on the host once
    dK/dV's kernel is launched and before dQ's (at the end where one kernel makes both): work
    the caller issues there, such as sending dK/dV on, overlaps dQ's kernel.
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    _check_qkv(q, k, v)
    docs = _documents(q, k, causal, "flash_attention_backward", doc_q, doc_k, pos_q, pos_k)
    if into is not None:
        for name, buf, like in zip(("dq", "dk", "dv"), into, (q, k, v)):
            if buf.shape != like.shape or buf.device != like.device or (buf.numel() and buf.stride(-1) != 1):
                raise ValueError(f"flash_attention_backward: into's {name} {tuple(buf.shape)} on {buf.device} "
                                 f"(last stride {buf.stride(-1)}) must have the shape {tuple(like.shape)}, the "
                                 f"device and a unit last stride")
    return _backward(q, k, v, out, lse, dout, None, causal, _scale(q, softmax_scale), grad_dtype, docs,
                     into, add_q, kv_ready)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                  softmax_scale: float | None = None, upcast: bool = True,
                  doc_q: torch.Tensor | None = None, doc_k: torch.Tensor | None = None,
                  pos_q: torch.Tensor | None = None, pos_k: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch attention, same signature and mask as :func:`flash_attention`.

    Computes in fp32 (fp64 inputs stay fp64) and returns out in q's dtype and lse in the
    compute dtype; ``upcast=False`` computes in the input dtype (the tests' measure of
    PyTorch's own rounding error). Materializes the (s_q, s_k) scores and the repeated K/V.
    With document ids, rows that see no key get out 0 and lse -inf (and zero gradients).
    """
    has_docs = check_documents(doc_q, doc_k, q, k, "attention_ref", pos_q=pos_q, pos_k=pos_k, causal=causal)
    scale = _scale(q, softmax_scale)
    dtype = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    group = q.shape[1] // k.shape[1]
    kr = k.to(dtype).repeat_interleave(group, dim=1)  # (b, hq, s_k, d)
    vr = v.to(dtype).repeat_interleave(group, dim=1)  # (b, hq, s_k, d)
    scores = (q.to(dtype) @ kr.transpose(-2, -1)) * scale  # (b, hq, s_q, s_k)
    if causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if not has_docs:
        lse = torch.logsumexp(scores, dim=-1)  # (b, hq, s_q)
        out = torch.softmax(scores, dim=-1) @ vr  # (b, hq, s_q, d)
        return out.to(q.dtype), lse
    keep = document_mask(doc_q, doc_k, pos_q, pos_k)  # (b, 1, s_q, s_k)
    if causal:
        keep = keep & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~keep, float("-inf"))
    # Rows that see no key: a finite placeholder row for the softmax (no NaN, in values or
    # gradients), then zeroed out: out 0, lse -inf.
    seen = keep.any(dim=-1, keepdim=True)  # (b, 1, s_q, 1)
    scores = scores.masked_fill(~seen, 0.0)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(~seen[..., 0], float("-inf"))  # (b, hq, s_q)
    out = torch.softmax(scores, dim=-1).masked_fill(~seen, 0.0) @ vr  # (b, hq, s_q, d)
    return out.to(q.dtype), lse
