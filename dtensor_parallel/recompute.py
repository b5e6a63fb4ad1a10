"""Activation recompute (checkpointing) per block.

- ``full``: keep only each block's input; the whole block reruns in backward.
- ``selective``: keep the outputs of the expensive ops (matmuls, attention, and the
  reduce-scatters of sequence parallelism and the context-parallel ring, which would
  otherwise rerun communication) and
  recompute the cheap element-wise ones (norms, rotary, SwiGLU's activation). This is the
  op-level form of Megatron's selective recompute: with flash attention there is no
  s x s score matrix to drop, so the memory worth saving is the element-wise activations.

Under sequence parallelism each row-parallel plain ``nn.Linear`` is one op, matmul and
reduce-scatter (``tensor_parallel/rowwise_nccl.py``, or the Triton ``matmul_reduce_scatter``),
so its output is saved once: as ``aten.mm`` then ``reduce_scatter_tensor`` both outputs are
saved, the full-sequence partial sums to no use (``tests/test_recompute_memory.py``), which
still happens where the layer stays two ops (``fused_rowwise=False``, a ``Rowwise(fused=False)``
rule, a module other than a plain ``nn.Linear``). Compiled blocks keep the two ops: the min-cut
partitioner saves only what backward needs there.

``selective_policy="save_alternate_matmuls"`` is TorchTitan's op-level policy: of a block's
matmuls in forward order, every second one is recomputed (in a Llama block wk, wo and w3:
about a third of the saved bytes, for rerunning about a third of the forward's matmul
FLOPs). The count is per checkpointed call and kept apart for the forward and the
recompute, so both count the same sequence. A row-parallel layer that is one op (matmul +
reduce-scatter) counts as a matmul.

Megatron's ``--recompute-method block --recompute-num-layers N`` recomputes only the first N
blocks; ``uniform`` recomputes every block (our unit is one block; Megatron's
``uniform`` with N > 1 groups N blocks per checkpoint, which trades a little more
recompute for fewer saved inputs).

The block's ``forward`` is wrapped in place rather than the block being replaced by a
wrapper module, so parameter names stay those of the user's model and FSDP's hooks (on
the block's ``__call__``) still run around the checkpointed region.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .context_parallel import ring  # noqa: F401 - register the custom ops
from .tensor_parallel import all_gather_matmul, matmul_reduce_scatter, sp_reduce_scatter  # noqa: F401

_aten = torch.ops.aten
_SAVE_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.linear.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._grouped_mm.default if hasattr(_aten, "_grouped_mm") else _aten.mm.default,
    # NCCL reduce-scatters (row-parallel layers in compiled blocks, or left as two ops)
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    # SP's Triton reduce-scatters (custom ops): saved, else backward reruns GEMM + communication
    torch.ops.dtensor_parallel.matmul_reduce_scatter.default,
    torch.ops.dtensor_parallel.sequence_reduce_scatter.default,
    torch.ops.dtensor_parallel.all_gather_matmul.default,  # the SP all-gather fused into a colwise GEMM
    # the ring (context parallel, packed documents): saved, else the recompute reruns the ring
    torch.ops.dtensor_parallel.ring_attention.default,
}


#: matmuls for the alternate policy's count (the row-parallel one-op layers among them)
_MATMUL_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.linear.default,
    torch.ops.dtensor_parallel.matmul_reduce_scatter.default,
}
SELECTIVE_POLICIES = ("save_matmuls", "save_alternate_matmuls")


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class _AlternateMatmuls:
    """A fresh policy per checkpointed call: saves what ``_selective_policy`` saves, except
    every second matmul (counted apart in the forward and in the recompute)."""

    def __init__(self):
        self.count = {False: 0, True: 0}

    def __call__(self, ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in _MATMUL_OPS:
            self.count[ctx.is_recompute] += 1
            if self.count[ctx.is_recompute] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return _selective_policy(ctx, op, *args, **kwargs)


def _save_contexts():
    return create_selective_checkpoint_contexts(_selective_policy)


def _alternate_contexts():
    return create_selective_checkpoint_contexts(_AlternateMatmuls())


def _checkpointed_forward(forward, context_fn, *args, **kwargs):
    if context_fn is None:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def apply_recompute(blocks: list[nn.Module], mode: str, method: str = "uniform",
                    num_layers: int | None = None, selective_policy: str = "save_matmuls") -> None:
    if mode == "none":
        return
    if selective_policy not in SELECTIVE_POLICIES:
        raise ValueError(f"selective_policy={selective_policy!r}: choose one of {SELECTIVE_POLICIES}")
    chosen = blocks
    if mode == "full" and method == "block" and num_layers is not None:
        chosen = blocks[:num_layers]
    context_fn = None
    if mode == "selective":
        context_fn = _alternate_contexts if selective_policy == "save_alternate_matmuls" else _save_contexts
    for block in chosen:
        block.forward = partial(_checkpointed_forward, block.forward, context_fn)
