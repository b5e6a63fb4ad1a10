"""Expert parallelism: experts sharded over an "ep" group folded out of dp_shard x cp.

MoE parallel folding (Megatron-Core): the ep ranks are consecutive ranks of one
dp_shard x cp group, so EP needs no dims of its own and need not be a subgroup of DP; the
dense layers keep their FSDP sharding over dp_shard x cp. Rank r of an ep group holds
experts [r E/ep, (r+1) E/ep) as a ``Shard(0)`` DTensor on the ep group. Each expert sees
every token routed to it from the whole ep group, so its gradient is complete there; it is
summed over the expert-data-parallel (edp) ranks: the same ep position in the other ep
groups and dp_replicate.

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
    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup | None
    ep_mesh: DeviceMesh

    @property
    def edp_size(self) -> int:
        return dist.get_world_size(self.edp_group) if self.edp_group is not None else 1


def build_expert_groups(mesh: DeviceMesh, dims: ParallelDims, ep: int) -> ExpertGroups:
    """Create every ep and edp group (all ranks, same order) and return this rank's."""
    if dims.dp_shard_cp % ep:
        raise ValueError(f"expert_parallel={ep} does not divide dp_shard({dims.dp_shard}) x cp({dims.cp}) = "
                         f"{dims.dp_shard_cp}, which EP is folded out of: choose an ep dividing {dims.dp_shard_cp}")
    me = dist.get_rank()
    ranks = mesh.mesh  # (pp, dp_replicate, dp_shard, cp, tp)
    mine_ep = mine_edp = None
    for pp in range(dims.pp):
        for tp in range(dims.tp):
            block = ranks[pp, :, :, :, tp].reshape(dims.dp_replicate, dims.dp_shard_cp // ep, ep)
            for rep in range(dims.dp_replicate):
                for chunk in block[rep]:
                    g = dist.new_group(chunk.tolist())
                    if me in chunk.tolist():
                        mine_ep, ep_ranks = g, chunk.tolist()
            for j in range(ep):
                members = block[:, :, j].flatten().tolist()
                g = dist.new_group(members) if len(members) > 1 else None
                if me in members:
                    mine_edp = g
    ep_mesh = DeviceMesh.from_group(mine_ep, mesh.device_type, mesh=torch.tensor(ep_ranks),
                                    mesh_dim_names=("ep",))
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
    """Shard each MoE's expert weights on dim 0 over the ep group; returns the sharded
    parameters (FSDP must leave them alone)."""
    params = []
    for m in moes:
        for name in ("w1", "w2", "w3"):
            full = getattr(m, name)
            sharded = nn.Parameter(distribute_tensor(full.data, groups.ep_mesh, [Shard(0)], src_data_rank=None))
            sharded._dtp_extra_replicas = groups.edp_size  # the same shard lives on the edp ranks
            m.register_parameter(name, sharded)
            params.append(sharded)
        m.ep_groups = groups
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
