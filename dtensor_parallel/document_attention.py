"""Causal attention over packed documents: query i sees key j only when j <= i and both
belong to the same document.

``document_causal_attention(q, k, v, document_ids)`` is what a model calls where it would
call ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` on a sequence that packs
several documents (Llama 3 was trained so: attention masked at document boundaries). The
documents are data, a ``document_ids`` tensor (b, s) whose ids do not decrease along each
sequence, passed down the model's forward like ``position_ids``; ``ParallelModel`` hands
every model that takes a ``document_ids`` argument this rank's share of them.

Outside context parallelism it runs the one-rank ring (``context_parallel/ring.py``: the
own block, no communication) with the block kernel measured fastest for documents on the
device (``local_backend``). Inside an attention site under
context parallelism (its ``RingAttentionMode`` on the torch-function mode stack) it runs
the ring over the cp group with the plan's kernel: the documents' ids travel with their
key/value blocks, and keys no query of a block can see are skipped. The mode is looked up
on the stack rather than reached through ``handle_torch_function``: Dynamo folds
``has_torch_function`` of a Python function to False while tracing, so a compiled block
would have run the one-rank path on each shard, silently (a compiled CP2 loss off by 6e-5
showed it); the stack itself Dynamo traces.
"""

from __future__ import annotations

import torch
from torch.overrides import _get_current_function_mode_stack


def document_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              document_ids: torch.Tensor, *, scale: float | None = None,
                              position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """q (b, hq, s, d), k/v (b, hkv, s, d) (hq a multiple of hkv: GQA without repeating k/v),
    ``document_ids`` (b, s) integer, non-decreasing along s; ``position_ids`` (b, s) or (s,):
    the tokens' positions, which context parallelism needs (the model's own ``position_ids``:
    under CP each rank holds pieces of every document, and the ring masks by position);
    returns (b, hq, s, d)."""
    ring = active_ring()
    if ring is not None:  # an attention site under context parallelism
        return ring.documents(query, key, value, document_ids, scale=scale, position_ids=position_ids)
    from .context_parallel.ring import ring_attention

    return ring_attention(query, key, value, causal=True, scale=scale, group=None,
                          backend=local_backend(query.device), document_ids=document_ids)


@torch.compiler.assume_constant_result  # (a table lookup: Dynamo need not trace the device query)
def local_backend(device: torch.device) -> str:
    """The block kernel of document attention outside the ring: the measured table's pick
    for packed documents on this device (``context_parallel/backend_choice.py``: the fused
    SDPA ops on the CPU; Triton, which skips other documents' key blocks, on an unmeasured GPU)."""
    from .context_parallel.backend_choice import choose_attention_backend

    return choose_attention_backend(device.type, say=False).documents


def active_ring():
    """The innermost ring-attention mode on this thread's torch-function mode stack, or None."""
    for mode in reversed(_get_current_function_mode_stack()):
        if getattr(mode, "is_ring_attention", False):
            return mode
    return None
