"""Expert parallelism applied to a stage: experts sharded over an "ep" group folded out of dp_shard x cp x tp.

MoE parallel folding (Megatron-Core), with expert-tensor-parallel size 1 (its default):
the ep ranks are consecutive ranks of one dp_shard x cp x tp block of a pipeline stage
(flattened in mesh order, tp innermost), so EP needs no dims of its own and need not be a
subgroup of DP; the dense layers keep their FSDP sharding over dp_shard x cp and their TP
sharding over tp. Rank r of an ep group holds experts [r E/ep, (r+1) E/ep) as a
``Shard(0)`` DTensor on the ep group.

Why tp may be folded in: under TP every MoE layer runs *token parallel* over tp
(``tensor_parallel.styles.MoEParallel``): each tp rank routes and computes only its
sequence shard, so the tp ranks hold distinct tokens exactly like data-parallel ranks.
Under SP that shard is the residual stream's own layout (no communication at all); without
SP the replicated MoE input is sliced to the rank's shard and the output all-gathered,
which costs one all-gather per MoE layer but no redundant expert compute and keeps a single
design: no expert gradient is ever computed twice, so none is ever double counted.

Gradients. Each expert sees every token routed to it from its whole ep group, so its
gradient is complete there; it is summed over the expert-data-parallel (edp) ranks: the
same ep position in the other ep groups of the stage, over dp_replicate x dp_shard x cp x tp
(one flat all-reduce, ``reduce_expert_grads``), and counted once per edp group in the
gradient norm (``apply_expert_parallel`` returns the count). FSDP leaves the expert weights alone. With tp > 1
and ep = 1 the experts stay plain replicated tensors and the edp group is the whole stage
(their gradients differ per tp rank, so FSDP, which reduces over dp_shard x cp only, must
not reduce them). The router gate and a shared expert are TP parameters (Replicate /
colwise-rowwise DTensors on tp), reduced like any other.

Dispatch (Lepikhin et al. 2020, GShard; Megatron's alltoall dispatcher): route, sort the
(token, expert) copies by expert, exchange the per-expert counts with one all-to-all, send
the rows with a second (autograd-aware) all-to-all, regroup by local expert, run the
grouped experts, and undo it all in reverse.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from torch.distributed.device_mesh import DeviceMesh

from ..mesh import ParallelDims, submesh
from ..models.moe import MoELayer
from .dispatch import ParallelDispatch
from .groups import ExpertGroups, build_expert_groups, needs_expert_groups


def check_experts(model: nn.Module, ep: int) -> list[MoELayer]:
    """The MoE layers (ours, or a transformers MoE block adapted by ``plans/hf_moe.py``),
    each with a number of experts that ep divides (local check)."""
    moes = [m for m in model.modules() if isinstance(m, MoELayer)]
    if ep > 1 and not moes:
        raise ValueError(f"expert_parallel={ep} but {type(model).__name__} has no MoE layers: set it to 1")
    for m in moes:
        if m.args.n_experts % ep:
            raise ValueError(f"expert_parallel={ep} does not divide the {m.args.n_experts} experts: choose an "
                             f"ep dividing {m.args.n_experts}")
    return moes


def check_expert_layout(model: nn.Module, dims: ParallelDims, ep: int, styles: dict) -> None:
    """Local checks of EP and of MoE layers under TP (before any collective)."""
    from ..tensor_parallel.styles import MoEParallel

    moes = check_experts(model, ep)  # (the fold's divisibility: validation.check_degrees)
    if dims.tp > 1:
        for name, m in model.named_modules():
            if m in moes and not isinstance(styles.get(name), MoEParallel):
                raise ValueError(
                    f"tp={dims.tp} but the MoE layer {name!r} has no 'moe' TP rule, so it would see "
                    f"tensor-parallel activations it cannot take: add rules[{name!r}] = 'moe' (and "
                    f"Norm(gather_output=False) for the norm before it under SP), or build the mesh with tp=1")


def build_dispatch(model: nn.Module, mesh: DeviceMesh, dims: ParallelDims, ep: int, kernels: str,
                   recv_bound: float | None = None, chunks: int = 1
                   ) -> tuple[ParallelDispatch | None, ExpertGroups | None]:
    """The dispatcher every MoE layer of the model gets, and the expert groups (collective:
    every rank calls it; (None, None) for a model without MoE layers). MoE layers run token
    parallel over tp, so tp (like cp) holds other positions of the same sequences; dp holds
    other sequences: the routing statistics are summed over them. ``recv_bound``:
    ``ParallelPlan.moe_recv_bound`` (the symmetric-memory exchange's receive bound);
    ``chunks``: ``ParallelPlan.moe_dispatch_chunks`` (``overlap.py``)."""
    if not check_experts(model, 1):
        return None, None
    groups = build_expert_groups(mesh, dims, ep) if needs_expert_groups(dims, ep, True) else None
    dispatch = ParallelDispatch(
        kernels=kernels, groups=groups, recv_bound=recv_bound, chunks=chunks,
        seq_groups=tuple(submesh(mesh, d).get_group() for d in ("cp", "tp") if getattr(dims, d) > 1),
        batch_groups=(submesh(mesh, "dp").get_group(),) if dims.dp > 1 else ())
    return dispatch, groups


def apply_expert_parallel(moes: list[MoELayer], groups: ExpertGroups | None, dispatch: ParallelDispatch
                          ) -> dict[nn.Parameter, int]:
    """Give each MoE layer ``dispatch`` and, under EP, shard its expert weights on dim 0
    over the ep group. Returns the expert parameters (FSDP must leave them alone) with
    the number of other ranks holding the same shard (the edp ranks: counted once in the
    gradient norm); empty when the experts need no reduction of their own."""
    params: dict[nn.Parameter, int] = {}
    for m in moes:
        m.dispatch = dispatch
        if groups is None:
            continue
        for name in m.expert_weights:  # each (n_experts, ...)
            owner_name, _, attr = name.rpartition(".")
            owner = m.get_submodule(owner_name)
            full = getattr(owner, attr)
            if groups.ep == 1:  # TP without EP: replicated, summed over the whole stage
                params[full] = 1
                continue
            sharded = nn.Parameter(distribute_tensor(full.data, groups.ep_mesh, [Shard(0)], src_data_rank=None),
                                   requires_grad=full.requires_grad)
            owner.register_parameter(attr, sharded)
            params[sharded] = groups.edp_size  # the same shard lives on the edp ranks
    return params


@torch.no_grad()
def reduce_expert_grads(params, groups: ExpertGroups) -> None:
    """Sum the expert gradients over the expert-data-parallel ranks (one flat buffer)."""
    grads = [p.grad for p in params if p.grad is not None]
    if groups.edp_group is None or not grads:
        return
    locals_ = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    flat = torch.cat([t.reshape(-1) for t in locals_])
    dist.all_reduce(flat, group=groups.edp_group)
    for t, piece in zip(locals_, flat.split([t.numel() for t in locals_])):
        t.copy_(piece.view_as(t))
