"""Token cross entropy, loss-parallel when the logits are vocab-sharded DTensors.

With vocab-sharded logits (``Shard(-1)`` on tp) the full logits are never gathered:
``torch.distributed.tensor.parallel.loss_parallel`` computes the log-sum-exp with an
all-reduce of the per-shard max and sum, and picks the target logit on the shard that owns
it (Megatron's vocab-parallel cross entropy). The backward must run inside the same context,
so :func:`loss_context` is entered around both forward and backward by the caller.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

IGNORE_INDEX = -100


def loss_context(logits_are_sharded: bool):
    return loss_parallel() if logits_are_sharded else contextlib.nullcontext()


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross entropies over labels != -100. logits: (b, s, V), labels: (b, s).

    Returns a plain scalar tensor (the local shard of a replicated DTensor under TP).
    """
    flat = logits.flatten(0, 1)  # (b*s, V)
    loss = F.cross_entropy(flat.float(), labels.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)
    return loss.to_local() if isinstance(loss, DTensor) else loss


@functools.cache
def compiled_cross_entropy_sum():
    """:func:`cross_entropy_sum` under ``torch.compile`` (``plan.compile`` on): inductor fuses
    the fp32 upcast, the log-softmax and the target pick, forward and backward, so neither an
    fp32 copy of the (tokens, vocab) logits nor its fp32 gradient is ever stored (eager keeps
    both: 8 GiB at 8K tokens of a 128K vocabulary; TorchTitan compiles its loss the same
    way). One compiled function for the process; its guards tell shapes and layouts apart."""
    return torch.compile(cross_entropy_sum, dynamic=False)
