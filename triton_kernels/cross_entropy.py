"""Cross entropy on logits in two passes: one read of the logits forward, one read and one
write backward, fp32 inside, nothing of the logits' size allocated but the gradient.

- ``cross_entropy_stats``: one program a row walks the vocabulary (or this rank's shard of
  it) in tiles with an online max and sum (Milakov & Gimelshein 2018), and picks the target
  logit where the row's label lies in the shard: ``stats[0] = logsumexp(z)``,
  ``stats[1] = z[label]`` (0 where not owned). A row of -inf gives -inf, as torch does.
- ``cross_entropy_grad``: one program a (row, tile): ``grad = scale (exp(z - lse) -
  onehot(label))`` in the logits' dtype, ``scale`` the loss gradient on kept rows and 0 on
  ignored ones, the one-hot only where owned.

``tensor_parallel/loss.py`` calls them on CUDA; the torch chunks there compute the same
(the interpreter tests compare both). The vocabulary size is a constexpr, the loops' bound
(fixed per model; the interpreter takes no runtime bound for ``range``)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK_V = 16 if _INTERPRET else 4096
_WARPS = 8


@triton.jit
def _stats_kernel(Z, stride_z, LABEL, OWNED, STATS, N, V: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = Z + row.to(tl.int64) * stride_z
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far: no nan
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), 0)
        m = m_new
    lse = tl.where(m == float("-inf"), m, m + tl.log(s))
    label = tl.load(LABEL + row)
    owned = tl.load(OWNED + row)
    target = tl.load(base + label, mask=owned, other=0.0).to(tl.float32)
    tl.store(STATS + row, lse)
    tl.store(STATS + N + row, tl.where(owned, target, 0.0))


@triton.jit
def _grad_kernel(Z, stride_z, LSE, SCALE, LABEL, OWNED, G, stride_g, V: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = offs < V
    z = tl.load(Z + row.to(tl.int64) * stride_z + offs, mask=ok, other=float("-inf")).to(tl.float32)
    scale = tl.load(SCALE + row)
    p = tl.exp(z - tl.load(LSE + row)) * scale
    hit = (offs == tl.load(LABEL + row)) & tl.load(OWNED + row)
    p = tl.where(hit, p - scale, p)
    tl.store(G + row.to(tl.int64) * stride_g + offs, p.to(G.dtype.element_ty), mask=ok)


def supports(z: torch.Tensor) -> str | None:
    """Why the kernels cannot take these logits (None: they can)."""
    if z.device.type != "cuda" and not _INTERPRET:
        return f"logits on {z.device} (the kernels need CUDA, or TRITON_INTERPRET=1 for CPU tensors)"
    if z.dim() != 2 or z.stride(1) != 1:
        return "logits must be (tokens, vocab) with the vocabulary contiguous"
    if z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {z.dtype}"
    return None


def cross_entropy_stats(z: torch.Tensor, local_labels: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """(2, N) fp32: each row's log-sum-exp and its target logit (0 where ``owned`` is False).
    z (N, V); ``local_labels`` (N,) indices into this vocabulary shard (any value where not
    owned); ``owned`` (N,) bool."""
    n, v = z.shape
    stats = torch.empty(2, n, dtype=torch.float32, device=z.device)
    if n:
        _stats_kernel[(n,)](z, z.stride(0), local_labels.contiguous(), owned.contiguous(), stats, n, V=v,
                            BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(v)), num_warps=_WARPS)
    return stats


def cross_entropy_grad(z: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor, local_labels: torch.Tensor,
                       owned: torch.Tensor) -> torch.Tensor:
    """``scale[:, None] (softmax(z) - onehot)`` in z's dtype, with the (global) ``lse`` (N,)
    fp32 and ``scale`` (N,) fp32 (0 on ignored rows)."""
    n, v = z.shape
    grad = torch.empty_like(z, memory_format=torch.contiguous_format)
    block = min(_BLOCK_V, triton.next_power_of_2(v))
    if n:
        _grad_kernel[(n, triton.cdiv(v, block))](z, z.stride(0), lse.contiguous(), scale.contiguous(),
                                                  local_labels.contiguous(), owned.contiguous(), grad, grad.stride(0),
                                                  V=v, BLOCK_V=block, num_warps=_WARPS)
    return grad
