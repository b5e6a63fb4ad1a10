"""Data parallelism through FSDP2 (``fully_shard``): FSDP, HSDP and DDP on one code path.

=========  ==========================  =============================================
degrees    mesh given to fully_shard   behaviour
=========  ==========================  =============================================
FSDP       (dp_shard_cp,)              params Shard(0): all-gather in forward and
                                       backward, reduce-scatter of gradients (ZeRO-3)
HSDP       (dp_replicate, dp_shard_cp) shard inside a group, all-reduce across groups
DDP        (dp_replicate, 1)           the HSDP path with a shard group of one: the
                                       gather is a no-op, gradients are all-reduced
=========  ==========================  =============================================

DDP goes through FSDP2 rather than ``DistributedDataParallel`` because FSDP2 is the one
that composes with TP's DTensor parameters on the same mesh (DDP does not take DTensors).

Gradients are *summed* over data-parallel ranks (``set_gradient_divide_factor(1.0)``):
each rank's loss is already divided by the global token count, so the sum is the
gradient of the global mean loss, exactly as on one device, however uneven the number of
valid tokens per rank.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .mesh import ParallelDims, submesh


def data_parallel_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh | None:
    if dims.dp_cp == 1:
        return None
    if dims.dp_replicate > 1:
        return submesh(mesh, "dp_replicate", "dp_shard_cp")
    return submesh(mesh, "dp_shard_cp")


def apply_data_parallel(model: nn.Module, blocks: list[nn.Module], dp_mesh: DeviceMesh,
                        *, mixed_precision: str, reshard_after_forward: bool | None,
                        ignored_params: set[nn.Parameter] | None = None,
                        embeddings: list[nn.Module] = (), heads: list[nn.Module] = ()) -> None:
    """Wrap each block, each of ``embeddings`` and each of ``heads`` as a unit of its own,
    then the root (which takes the remaining parameters: the final norm, a tied embedding
    and head), with ``fully_shard``.

    The input embedding runs first in forward and last in backward, and its backward needs
    no weight (it scatters the output gradient by token id): in the root it would hold its
    whole bf16 weight through the step (1 GiB at Llama 3's vocabulary 128256 x 4096), as a
    unit of its own it frees it after the forward like a block (TorchTitan shards it the same
    way). Gathering it again for the backward (FSDP's pre-backward hook) happens when the
    blocks' activations are gone.

    The output head as a unit of its own: FSDP reduce-scatters a unit's gradients when the
    gradient reaches the unit's forward inputs. The root's inputs are token ids, which take
    no gradient, so whatever the root holds is reduce-scattered in FSDP's end-of-backward
    callback, after every block: for the head, a gradient the size of the embedding, and its
    gathered weight and unsharded gradient held until then. As a unit its gradient leaves as
    soon as the head's backward is done, beside the blocks' backward, and its weight is
    resharded then (TorchTitan shards its [norm, output] the same way). Measured on 2 x H200
    (8B shape, 8K tokens, compiled): CP2's peak, at the end of backward, 25.79 -> 24.81 GiB;
    FSDP2's, at the loss, unchanged; the step time equal within the runs' spread. Heads stay
    gathered from forward to backward (``reshard_after_forward=False``): the head runs first
    in backward, so resharding it would only gather it again at once. A head tied to the
    embedding stays in the root with it (one parameter, one unit)."""
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
        reduce_dtype=torch.float32)
    shard_size = dp_mesh.size(-1) if dp_mesh.ndim == 2 else dp_mesh.size()
    if reshard_after_forward is None:
        reshard_after_forward = shard_size > 1  # nothing to free when the shard group is 1 rank
    extra = {"ignored_params": ignored_params} if ignored_params else {}  # EP-sharded experts
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward, **extra)
    for embedding in embeddings:
        fully_shard(embedding, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward, **extra)
    if os.environ.get("DTP_FSDP_HEAD_IN_ROOT") == "1":  # the layout before, for an A/B in one
        heads = ()  # benchmark call (benchmarks/run_fsdp_head_gpu.sh); not a user setting
    for head in heads:
        fully_shard(head, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False, **extra)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False, **extra)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            # a plain SUM collective (a factor of 1 would otherwise become NCCL's
            # PREMUL_SUM, which gloo lacks)
            if hasattr(m, "set_force_sum_reduction_for_comms"):
                m.set_force_sum_reduction_for_comms(True)
