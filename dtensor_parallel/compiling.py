"""``torch.compile`` per block (the chain's compile step).

Static shapes: blocks that see two input shapes (a transformers model's first layer takes
the whole sequence and slices its SP shard) get a graph each, instead of one dynamic-shape
graph, which DTensor inputs fail to trace (torch 2.11, H200: "unhashable type: non-nested
SymInt" in the RMSNorm).

Context parallel inside activation recompute: the ring is entered by the attention site's
forward hooks, which push its ``RingAttentionMode`` and pop it again (``context_parallel/
attention.py``). Inside a checkpointed block Dynamo refuses any side effect it cannot
replay in the recompute ("HOP: Unsafe side effect ... TorchFunctionModeStackVariable"),
falls back to eager for the whole block and counts a graph break. Here the push and the
pop cancel, and the recompute replays the traced graph, which already holds the ring op,
so nothing needs replaying: such blocks are traced with
``skip_fwd_side_effects_in_bwd_under_checkpoint`` set, for their own calls only (the
setting stays off for any other code of the process; TorchTitan sets it globally).
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def compile_block(block: nn.Module, has_ring: bool) -> None:
    """Compile ``block`` (static shapes); ``has_ring``: it holds a context-parallel
    attention site (see the module docstring)."""
    block.compile(dynamic=False)
    if not has_ring:
        return
    compiled = block._compiled_call_impl  # what nn.Module.compile installed

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
            return compiled(*args, **kwargs)

    block._compiled_call_impl = call
