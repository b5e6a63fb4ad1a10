"""Expert parallelism: experts sharded over an "ep" group folded out of dp_shard x cp x tp.

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
gradient norm (``_dtp_extra_replicas``). FSDP leaves the expert weights alone. With tp > 1
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

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from .mesh import ParallelDims


@dataclass
class ExpertGroups:
    ep: int
    ep_group: dist.ProcessGroup | None  # None when ep == 1
    edp_group: dist.ProcessGroup | None  # None when one rank holds each expert shard
    ep_mesh: DeviceMesh | None

    @property
    def edp_size(self) -> int:
        return dist.get_world_size(self.edp_group) if self.edp_group is not None else 1


def ep_fold_size(dims: ParallelDims) -> int:
    """How many ranks of a stage hold distinct tokens at the MoE layers (and share the
    dp_replicate coordinate): dp_shard x cp x tp; EP is folded out of them."""
    return dims.dp_shard * dims.cp * dims.tp


def needs_expert_groups(dims: ParallelDims, ep: int, has_moe: bool) -> bool:
    """EP, or TP over an MoE model: its expert gradients need their own reduction."""
    return ep > 1 or (dims.tp > 1 and has_moe)


def check_expert_layout(model: nn.Module, dims: ParallelDims, ep: int, styles: dict) -> None:
    """Local checks of EP and of MoE layers under TP (before any collective)."""
    moes = check_experts(model, ep)
    fold = ep_fold_size(dims)
    if ep > 1 and fold % ep:
        raise ValueError(f"expert_parallel={ep} does not divide dp_shard({dims.dp_shard}) x cp({dims.cp}) x "
                         f"tp({dims.tp}) = {fold}, which EP is folded out of: choose an ep dividing {fold}")
    if dims.tp > 1:
        from .tensor_parallel.styles import MoEParallel
        for name, m in model.named_modules():
            if m in moes and not isinstance(styles.get(name), MoEParallel):
                raise ValueError(
                    f"tp={dims.tp} but the MoE layer {name!r} has no 'moe' TP rule, so it would see "
                    f"tensor-parallel activations it cannot take: add rules[{name!r}] = 'moe' (and "
                    f"Norm(gather_output=False) for the norm before it under SP), or build the mesh with tp=1")


def build_expert_groups(mesh: DeviceMesh, dims: ParallelDims, ep: int) -> ExpertGroups:
    """Create every ep and edp group (all ranks, same order) and return this rank's."""
    fold = ep_fold_size(dims)
    if fold % ep:
        raise ValueError(f"expert_parallel={ep} does not divide dp_shard({dims.dp_shard}) x cp({dims.cp}) x "
                         f"tp({dims.tp}) = {fold}, which EP is folded out of: choose an ep dividing {fold}")
    me = dist.get_rank()
    mine_ep = mine_edp = ep_ranks = None
    for pp in range(dims.pp):
        # (dp_replicate, fold // ep, ep): consecutive ranks of (dp_shard, cp, tp) form an ep group
        block = mesh.mesh[pp].reshape(dims.dp_replicate, fold // ep, ep)
        if ep > 1:
            for chunk in block.reshape(-1, ep):
                g = dist.new_group(chunk.tolist())
                if me in chunk.tolist():
                    mine_ep, ep_ranks = g, chunk.tolist()
        for j in range(ep):
            members = block[:, :, j].flatten().tolist()
            g = dist.new_group(members) if len(members) > 1 else None
            if me in members:
                mine_edp = g
    ep_mesh = (DeviceMesh.from_group(mine_ep, mesh.device_type, mesh=torch.tensor(ep_ranks), mesh_dim_names=("ep",))
               if ep > 1 else None)
    return ExpertGroups(ep, mine_ep, mine_edp, ep_mesh)


def check_experts(model: nn.Module, ep: int) -> list[nn.Module]:
    """The MoE modules, each with a number of experts that ep divides (local check)."""
    from .models.moe import MoE
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if ep > 1 and not moes:
        raise ValueError(f"expert_parallel={ep} but {type(model).__name__} has no MoE layers: set it to 1")
    for m in moes:
        if m.args.n_experts % ep:
            raise ValueError(f"expert_parallel={ep} does not divide the {m.args.n_experts} experts: choose an "
                             f"ep dividing {m.args.n_experts}")
    return moes


def apply_expert_parallel(moes: list[nn.Module], groups: ExpertGroups) -> list[nn.Parameter]:
    """Shard each MoE's expert weights on dim 0 over the ep group (ep = 1: leave them
    whole); returns the expert parameters (FSDP must leave them alone)."""
    params = []
    for m in moes:
        for name in ("w1", "w2", "w3"):
            full = getattr(m, name)
            if groups.ep == 1:  # TP without EP: replicated, summed over the whole stage
                params.append(full)
                continue
            sharded = nn.Parameter(distribute_tensor(full.data, groups.ep_mesh, [Shard(0)], src_data_rank=None))
            sharded._dtp_extra_replicas = groups.edp_size  # the same shard lives on the edp ranks
            m.register_parameter(name, sharded)
            params.append(sharded)
        m.ep_groups = groups if groups.ep > 1 else None
    return params


@torch.no_grad()
def reduce_expert_grads(params: list[nn.Parameter], groups: ExpertGroups) -> None:
    """Sum the expert gradients over the expert-data-parallel ranks (one flat buffer)."""
    grads = [p.grad for p in params if p.grad is not None]
    if groups.edp_group is None or not grads:
        return
    locals_ = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    flat = torch.cat([t.reshape(-1) for t in locals_])
    dist.all_reduce(flat, group=groups.edp_group)
    for t, piece in zip(locals_, flat.split([t.numel() for t in locals_])):
        t.copy_(piece.view_as(t))


def dispatch_combine(rows: torch.Tensor, counts: torch.Tensor, experts, groups: ExpertGroups) -> torch.Tensor:
    """rows (N, d) sorted by global expert with ``counts`` (E,) rows each; ``experts(x,
    local_counts)`` runs this rank's experts on rows grouped by local expert. Returns the
    expert outputs in the order of ``rows``."""
    ep, group = groups.ep, groups.ep_group
    e_local = counts.numel() // ep
    # (ep * e_local): from each source rank, its row count for each of our experts
    recv = funcol.wait_tensor(funcol.all_to_all_single(counts, None, None, group))
    send_split = counts.view(ep, e_local).sum(1).tolist()
    recv_by_src = recv.view(ep, e_local)
    recv_split = recv_by_src.sum(1).tolist()
    got = funcol.wait_tensor(funcol.all_to_all_single_autograd(rows, recv_split, send_split, group))
    # rows arrive by source rank, then by local expert: a stable sort by local expert
    # regroups them (by expert, then by source), on the device, without host syncs
    local_expert = torch.arange(e_local, device=rows.device).repeat(ep)  # (ep * e_local)
    perm = torch.sort(local_expert.repeat_interleave(recv_by_src.flatten(), output_size=got.shape[0]),
                      stable=True).indices
    y = torch.empty_like(got)
    y = y.index_copy(0, perm, experts(got[perm], recv_by_src.sum(0)))
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(y, send_split, recv_split, group))
