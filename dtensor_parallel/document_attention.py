"""Causal attention over packed documents: query i sees key j only when j <= i and both
belong to the same document.

``document_causal_attention(q, k, v, document_ids)`` is what a model calls where it would
call ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` on a sequence that packs
several documents (Llama 3 was trained so: attention masked at document boundaries). The
documents are data, a ``document_ids`` tensor (b, s) whose ids do not decrease along each
sequence, passed down the model's forward like ``position_ids``; ``ParallelModel`` hands
every model that takes a ``document_ids`` argument this rank's share of them.

Outside context parallelism it runs the one-rank ring (``context_parallel/ring.py``: the
own block, no communication) with the fastest block kernel that masks documents on the
device: Triton on CUDA, the PyTorch reference elsewhere. Under context parallelism the
attention site's ``RingAttentionMode`` intercepts the call (it is a torch function, like
SDPA) and runs the ring over the cp group with the plan's kernel: the documents' ids travel
with their key/value blocks, and keys no query of a block can see are skipped.
"""

from __future__ import annotations

import torch
from torch.overrides import handle_torch_function, has_torch_function


def document_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              document_ids: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """q (b, hq, s, d), k/v (b, hkv, s, d) (hq a multiple of hkv: GQA without repeating k/v),
    ``document_ids`` (b, s) integer, non-decreasing along s; returns (b, hq, s, d)."""
    if has_torch_function((query, key, value, document_ids)):
        return handle_torch_function(document_causal_attention, (query, key, value, document_ids),
                                     query, key, value, document_ids, scale=scale)
    from .context_parallel.ring import ring_attention

    return ring_attention(query, key, value, causal=True, scale=scale, group=None,
                          backend=local_backend(query.device), document_ids=document_ids)


def local_backend(device: torch.device) -> str:
    """The block kernel of document attention outside the ring: Triton on CUDA (it skips the
    masked key blocks), the PyTorch reference elsewhere."""
    return "triton" if device.type == "cuda" else "torch"
