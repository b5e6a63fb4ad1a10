"""Ring attention at a module's own attention call: the context-parallel step's mechanism.

:func:`apply_context_parallel` gives every attention call site the plan names (style
``"attention"``: the module whose ``forward`` calls
``torch.nn.functional.scaled_dot_product_attention``) its own :class:`RingAttentionMode`,
entered by a forward pre-hook and left by a forward hook that runs even when the forward
raises. While it is entered, an SDPA call *made on this thread by that module's forward*
runs ring attention over the cp group (``ring.py``); every other call of any other model,
thread or library is untouched, and nothing in ``torch.nn.functional`` is reassigned.

Why a per-module ``TorchFunctionMode`` and not a wrapper around the whole step: activation
recompute reruns a block's forward inside the backward, on the autograd engine's thread,
which does not inherit the training thread's mode stack. The hooks run again with the
recomputed forward, on whichever thread runs it, so the ring is there too.

The mode holds all its state (the group and the block kernel's name): no class attribute,
no global. RoPE positions of the zigzag shards reach the model as its ``position_ids``
forward argument (``ParallelModel`` passes them), so the ring needs none. Packed documents
reach the attention call as data too: the model's ``document_ids`` argument, passed on to
:func:`~dtensor_parallel.document_attention.document_causal_attention`, which finds the
site's mode on the stack (so a recomputed forward sees its own micro-batch's documents).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .blocks import get_backend
from .ring import ring_attention

_SDPA = F.scaled_dot_product_attention


class RingAttentionMode(TorchFunctionMode):
    """Inside: ``F.scaled_dot_product_attention(q, k, v, is_causal=...)`` is ring attention
    over ``group`` with the block kernel ``backend`` ("torch", "triton" or "sdpa"), and so is
    ``document_causal_attention(q, k, v, document_ids)`` with its documents (block kernel
    ``document_backend``; that function finds the mode on the stack, ``is_ring_attention``);
    every other function runs as it is."""

    is_ring_attention = True

    def __init__(self, group: dist.ProcessGroup, backend: str, site: str, document_backend: str | None = None):
        super().__init__()
        self.group, self.backend, self.site = group, backend, site
        self.document_backend = document_backend or backend
        for name in {self.backend, self.document_backend}:
            get_backend(name)  # (an unknown name fails here, at parallelize)
        self.entered = 0  # how many forwards of the site are inside (recursion, recompute)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return self.attention(*args, **kwargs)
        return func(*args, **kwargs)

    def documents(self, query, key, value, document_ids, *, scale=None, position_ids=None) -> torch.Tensor:
        if position_ids is None and self.group is not None and dist.get_world_size(self.group) > 1:
            raise ValueError(f"{self.site}: document_causal_attention under context parallelism needs the tokens' "
                             f"positions: pass the model's position_ids on (position_ids=...), since each rank "
                             f"holds pieces of every document and the ring masks by position")
        return ring_attention(query, key, value, causal=True, scale=scale, group=self.group,
                              backend=self.document_backend, document_ids=document_ids,
                              positions=position_ids)

    def attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False) -> torch.Tensor:
        if attn_mask is not None:
            raise NotImplementedError(
                f"{self.site}: context parallel attention takes no attn_mask (its zigzag shards are "
                f"causal by position): call SDPA with is_causal=True and attn_mask=None")
        if dropout_p:
            raise NotImplementedError(f"{self.site}: context parallel attention takes no attention dropout")
        return ring_attention(query, key, value, causal=is_causal, scale=scale, group=self.group,
                              backend=self.backend)


def apply_context_parallel(sites: dict[str, nn.Module], group: dist.ProcessGroup, backend: str,
                           document_backend: str | None = None) -> None:
    """Install the ring on each ``{name: module}`` attention call site (one mode per site);
    ``document_backend``: the block kernel of packed documents (default: ``backend``)."""
    for name, module in sites.items():
        mode = RingAttentionMode(group, backend, name, document_backend)
        module.register_forward_pre_hook(partial(_enter, mode))
        module.register_forward_hook(partial(_leave, mode), always_call=True)


def _enter(mode: RingAttentionMode, module: nn.Module, inputs: tuple) -> None:
    mode.__enter__()  # (a pre-hook's return value would replace the inputs: return None)
    mode.entered += 1


def _leave(mode: RingAttentionMode, module: nn.Module, inputs: tuple, output) -> None:
    if mode.entered:  # (always called: also when an earlier pre-hook raised before ours ran)
        mode.entered -= 1
        mode.__exit__(None, None, None)
