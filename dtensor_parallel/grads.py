"""Gradient and weight utilities over mixed placements: global norm, reduction of partial
gradients, and gathering full tensors across pipeline stages."""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate


@torch.no_grad()
def global_grad_norm(params: Iterable[nn.Parameter], ranks_per_replica: int, device: torch.device,
                     extra_replicas: dict[nn.Parameter, int] | None = None) -> torch.Tensor:
    """Global L2 norm of all gradients, whatever their placements, with one all-reduce.

    Each rank adds the squares of its local gradient shards, divided by how many ranks
    hold a copy of that shard (the product of the mesh sizes over which the gradient is
    ``Replicate``; for a plain tensor, every rank of one pipeline stage), then one
    all-reduce sums over the world. Different pipeline stages hold different parameters,
    so their squares simply add. Reducing DTensor norms instead costs one collective per
    (mesh, placements) group and per mesh dim. ``extra_replicas``: copies a DTensor's
    placements do not show (an EP-sharded expert also lives on its edp ranks; a tied weight's
    copies on the first and last pipeline stages).
    """
    extra_replicas = extra_replicas or {}
    groups: dict[tuple[int, torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            copies = 1
            for size, placement in zip(g.device_mesh.shape, g.placements):
                if placement.is_partial():
                    raise RuntimeError(f"gradient with Partial placement {g.placements}: reduce it "
                                       f"before taking the norm")
                copies *= size if placement.is_replicate() else 1
            copies *= extra_replicas.get(p, 1)
            local = g.to_local()
        else:
            copies, local = ranks_per_replica * extra_replicas.get(p, 1), g
        groups.setdefault((copies, local.device, local.dtype), []).append(local)
    sq = torch.zeros((), device=device, dtype=torch.float32)
    for (copies, _, _), tensors in groups.items():
        # one multi-tensor kernel a group for the per-tensor norms (in fp32 whatever the
        # gradients' dtype), not a full-size pow and a sum per parameter: with the clip's
        # per-parameter multiply, about 8 ms a step of small kernels in the compiled TP2+SP
        # profile on an H200 (RESULTS.md, issue 24)
        norms = torch._foreach_norm(tensors, 2.0, dtype=torch.float32)
        sq += torch.stack(norms).to(device).square().sum() / copies
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    return sq.sqrt()


@torch.no_grad()
def reduce_partial_grads(params: Iterable[nn.Parameter]) -> None:
    """Turn ``Partial`` gradients into ``Replicate`` ones, one collective per group.

    Under SP the weights of the norms are replicated but see only their sequence shard,
    so their gradients come out as per-rank partial sums (``Partial`` on tp). FSDP reduces
    them itself; without FSDP they would stay partial, and every later op on them
    (clipping, the optimizer) would all-reduce each one implicitly. Like Megatron's
    all-reduce of the sequence-parallel layernorm gradients, they are flattened into one
    buffer and all-reduced once, after the last micro-batch. Each gradient then gets its own
    copy of its piece: a DTensor over a view at an offset of the buffer has a wrapper whose
    ``data_ptr()`` is not 0 without a storage, which ``copy.deepcopy`` (of the gradient, so
    of the model after a step) takes for a real storage and fails on.
    """
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            groups.setdefault((g.device_mesh, tuple(g.placements)), []).append(p)
    for (mesh, placements), group in groups.items():
        locals_ = [p.grad.to_local() for p in group]
        flat = torch.cat([t.reshape(-1) for t in locals_])
        for dim, pl in enumerate(placements):
            if pl.is_partial():
                dist.all_reduce(flat, group=mesh.get_group(dim))
        reduced = [Replicate() if pl.is_partial() else pl for pl in placements]
        for p, piece in zip(group, flat.split([t.numel() for t in locals_])):
            p.grad = DTensor.from_local(piece.view_as(p.grad.to_local()).clone(), mesh, reduced, run_check=False)


@torch.no_grad()
def shard_replicated_grads(params: Iterable[nn.Parameter]) -> None:
    """Give a sharded parameter a gradient sharded like it, where it came out replicated.

    DTensor's backward of the vocab-parallel embedding (weight ``Shard(0)``, token ids and
    output gradient replicated) computes the whole vocabulary's gradient on every tp rank
    and leaves it ``Replicate``: without FSDP (which reshards it itself) each rank then kept
    a full-vocabulary fp32 gradient through the optimizer step (measured: 1 GiB more than
    the estimate on 2 x H100 at 8B / tp2, 1.5 GiB at tp4). Keeping this rank's rows is a
    slice, no communication; the copy frees the full tensor.
    """
    for p in params:
        g = p.grad
        if not (isinstance(p, DTensor) and isinstance(g, DTensor)) or g.placements == p.placements:
            continue
        if g.device_mesh != p.device_mesh or not all(
                gp == pp or (gp.is_replicate() and pp.is_shard()) for gp, pp in zip(g.placements, p.placements)):
            continue
        local = g.redistribute(placements=p.placements).to_local().clone()
        p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                    run_check=False)


@torch.no_grad()
def gather_full(named: Iterable[tuple[str, torch.Tensor]], pp_group=None) -> dict[str, torch.Tensor]:
    """Full CPU tensors by name. DTensors are gathered within their stage's mesh; with a
    pp group, each stage's dict is then exchanged so every rank gets all of them."""
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # FSDP x TP parameters (_StridedShard, Shard) gather in two steps; torch warns
        warnings.filterwarnings("ignore", message="While redistributing from")
        for name, t in named:
            if isinstance(t, DTensor):
                t = t.full_tensor()
            out[name] = t.detach().cpu()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        parts: list[dict | None] = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(parts, out, group=pp_group)
        merged: dict[str, torch.Tensor] = {}
        for part in parts:
            merged.update(part)
        out = merged
    return out
