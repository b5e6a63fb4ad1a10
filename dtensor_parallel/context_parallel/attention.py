"""The attention entry point models call, and the region that turns it into ring attention.

Outside a context-parallel region :func:`attention` is PyTorch's SDPA. Inside
:func:`context_parallel_region` (entered by ``ParallelModel`` around forward and
backward when cp > 1) it is ring attention over the cp group, and so is a call of
``torch.nn.functional.scaled_dot_product_attention`` (looked up at call time, as in
``F.scaled_dot_product_attention(...)``): the region swaps that function for the ring.
So a user's model needs no change beyond reading positions from
:func:`~dtensor_parallel.context_parallel.local_positions` if it uses RoPE.

Why a swap and not a ``TorchFunctionMode``: activation recompute reruns the forward
inside the backward, where the autograd engine does not carry the Python function-mode
stack (seen with torch 2.13: the recomputed forward called plain SDPA and checkpointing
failed on mismatched saved tensors). The swapped function is there all along the region.
"""

from __future__ import annotations

import contextlib
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .blocks import get_backend
from .ring import ring_attention
from .sharding import RegionState, reset_region, set_region


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = True,
              scale: float | None = None) -> torch.Tensor:
    """Attention with grouped-query k/v (b, hkv, s, d), hq a multiple of hkv."""
    state = RegionState.ring
    if state is not None:
        group, backend = state
        return ring_attention(q, k, v, causal=is_causal, scale=scale, group=group, backend=backend)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return _SDPA(q, k, v, is_causal=is_causal, scale=scale)


_SDPA = F.scaled_dot_product_attention  # PyTorch's own, kept before any swap


def _sdpa_in_region(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    if RegionState.ring is None:  # after the region
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                     scale=scale, enable_gqa=enable_gqa)
    if attn_mask is not None:
        raise NotImplementedError("context parallel attention takes no attn_mask: use is_causal=True")
    if dropout_p:
        raise NotImplementedError("context parallel attention takes no attention dropout")
    return attention(query, key, value, is_causal=is_causal, scale=scale)


@contextlib.contextmanager
def context_parallel_region(group: dist.ProcessGroup, positions: torch.Tensor, backend: str = "torch"):
    """Ring attention on ``group`` and RoPE positions ``positions`` for the code inside."""
    previous = set_region((group, get_backend(backend)), positions)
    swapped = F.scaled_dot_product_attention is _SDPA  # a nested region leaves the swap alone
    if swapped:
        F.scaled_dot_product_attention = _sdpa_in_region
    try:
        yield
    finally:
        if swapped:
            F.scaled_dot_product_attention = _SDPA
        reset_region(previous)
