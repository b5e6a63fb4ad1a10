"""Triton backend of the ring's block functions (``triton_kernels/flash_attention.py``).

The forward merges each block into the running fp32 (out, lse) inside the kernel, so no
low-precision rounding happens between ring steps; the backward is the FlashAttention-2
backward of one block given the final out and lse, written or added in fp32 into the ring's
accumulators by the kernels themselves.
"""

from __future__ import annotations

import torch

from triton_kernels.flash_attention import flash_attention_backward, flash_attention_ring_step


class TritonBlocks:
    name = "triton"

    @staticmethod
    def forward_step(q, k, v, out, lse, causal: bool, scale: float, accumulate: bool = True,
                     doc_q=None, doc_k=None, pos_q=None, pos_k=None):
        # the kernel writes (out, lse) in place through their strides: views need no copy
        return flash_attention_ring_step(q, k, v, out, lse, causal=causal, softmax_scale=scale,
                                         accumulate=accumulate, **_documents(doc_q, doc_k, pos_q, pos_k))

    @staticmethod
    def backward_block(dout, q, k, v, out, lse, causal: bool, scale: float, doc_q=None, doc_k=None,
                       pos_q=None, pos_k=None, into=None, add_q: bool = False, kv_ready=None):
        # with ``into``, the kernels write their fp32 gradients straight into the ring's buffers (dQ added);
        # kv_ready runs between the dK/dV kernel and the dQ kernel
        return flash_attention_backward(q, k, v, out, lse.contiguous(), dout, causal=causal,
                                        softmax_scale=scale, grad_dtype=torch.float32, into=into,
                                        add_q=add_q, kv_ready=kv_ready,
                                        **_documents(doc_q, doc_k, pos_q, pos_k))


def _documents(doc_q, doc_k, pos_q, pos_k) -> dict:
    """The kernels' mask arguments given (the no-document path takes none)."""
    out = {} if doc_q is None else {"doc_q": doc_q, "doc_k": doc_k}
    if pos_q is not None:
        out |= {"pos_q": pos_q, "pos_k": pos_k}
    return out
