"""The expert-parallel groups, made from the mesh.

EP is folded out of the ``dp_shard x cp x tp`` ranks of each pipeline stage (Megatron-Core's
MoE parallel folding): this rank's stage block of the mesh, reshaped to
``(pp, dp_replicate, fold / ep, ep)``, is a ``DeviceMesh`` of its own whose last dim is
the ep group and whose ``(dp_replicate, fold / ep)`` dims, flattened, are the
expert-data-parallel (edp) group: the ranks holding the same expert shard. torch creates
the groups of both meshes (every rank, the same order), as it creates the root mesh's.

Why a second mesh rather than ``DeviceMesh._unflatten``: ``_unflatten`` splits one dim of
the root mesh, while the fold is three dims (dp_shard, cp, tp); the reshaped mesh over the
same rank tensor is the same layout without flattening them first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..mesh import ParallelDims


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


def build_expert_groups(mesh: DeviceMesh, dims: ParallelDims, ep: int) -> ExpertGroups:
    """This rank's ep and edp groups (collective: every rank calls it). ``ep`` divides the
    fold (checked by ``validate_layout`` before any collective)."""
    fold = ep_fold_size(dims)
    ranks = mesh.mesh.reshape(dims.pp, dims.dp_replicate, fold // ep, ep)
    ep_view = DeviceMesh(mesh.device_type, ranks, mesh_dim_names=("pp", "dp_replicate", "edp_shard", "ep"))
    ep_mesh = ep_view["ep"] if ep > 1 else None
    edp = ep_view["dp_replicate", "edp_shard"]._flatten("edp") if dims.dp_replicate * fold // ep > 1 else None
    return ExpertGroups(ep, ep_mesh.get_group() if ep_mesh is not None else None,
                        edp.get_group() if edp is not None else None, ep_mesh)
