"""The SP norm's all-gather, ``Shard(seq) -> Replicate`` on the tp mesh, with DTensor's
communication and less host work per call in eager.

Under SP each norm's output is gathered along the sequence once, for all the column-parallel
layers reading it (``styles.Norm``). ``DTensor.redistribute`` plans each call in Python
(placements, transform infos, a nested autograd function): about 150 us of host time a call
on a CPU host against about 40 us for the functional collective itself
(``benchmarks/tp_host_overhead.py``), and it runs twice a norm in forward (selective
recompute reruns it) and once in backward. This autograd function does the same collectives:

- forward: all-gather of the ``Shard(d)`` blocks (a functional collective, rank p's block at
  chunk p of dim d) into a ``Replicate`` DTensor;
- backward: the gradient's ``Partial(sum) -> Shard(d)`` reduce-scatter (the summed input
  gradients of q, k and v, or of w1 and w3, leave in one collective), a ``Replicate``
  gradient's own chunk, and DTensor's ``redistribute`` for any other placement.

Under ``torch.compile`` the norm keeps ``redistribute`` (the compiled graph is unchanged).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

funcol_ops = torch.ops._c10d_functional


def _all_gather(local: torch.Tensor, dim: int, world: int, group_name: str) -> torch.Tensor:
    """(..., S/W, ...) blocks -> (..., S, ...), rank p's at chunk p."""
    t = local.movedim(dim, 0).contiguous()  # (S/W, ...): chunks are rows, as the collective lays them
    flat = funcol_ops.wait_tensor(funcol_ops.all_gather_into_tensor(t, world, group_name))  # (S, ...)
    return flat.movedim(0, dim).contiguous()  # (a copy only where dims lead d, as DTensor's)


def _reduce_scatter(local: torch.Tensor, dim: int, world: int, group_name: str) -> torch.Tensor:
    """(..., S, ...) partial sums -> (..., S/W, ...): this rank's chunk of their sum."""
    t = local.movedim(dim, 0).contiguous()  # (S, ...)
    out = funcol_ops.wait_tensor(funcol_ops.reduce_scatter_tensor(t, "sum", world, group_name))  # (S/W, ...)
    return out.movedim(0, dim).contiguous()


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: DTensor, dim: int) -> DTensor:
        mesh = x.device_mesh
        group = mesh.get_group()
        ctx.dim, ctx.mesh, ctx.shape, ctx.stride = dim, mesh, x.shape, x.stride()
        ctx.world, ctx.group_name = group.size(), group.group_name
        full = _all_gather(x.to_local(), dim, ctx.world, ctx.group_name)
        return DTensor.from_local(full, mesh, [Replicate()], run_check=False, shape=x.shape, stride=x.stride())

    @staticmethod
    def backward(ctx, grad: DTensor):
        dim, mesh = ctx.dim, ctx.mesh
        placement = grad.placements[0]
        if type(placement) is Partial and placement.reduce_op == "sum":
            local = _reduce_scatter(grad.to_local(), dim, ctx.world, ctx.group_name)
        elif placement.is_replicate():
            local = grad.to_local().chunk(ctx.world, dim)[mesh.get_local_rank()].contiguous()
        else:
            return grad.redistribute(placements=[Shard(dim)]), None
        return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=ctx.shape,
                                  stride=ctx.stride), None


def gather_sequence(x: DTensor, dim: int) -> DTensor:
    """``x.redistribute(placements=[Replicate()])`` for a ``Shard(dim)`` DTensor on a 1-D
    mesh whose ``dim`` divides by the mesh size, with less host work in eager (the module
    docstring); DTensor's ``redistribute`` elsewhere and under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return x.redistribute(placements=[Replicate()])
    mesh, dim = x.device_mesh, dim % x.ndim
    if mesh.ndim != 1 or not x.placements[0].is_shard(dim) or x.shape[dim] % mesh.size():
        return x.redistribute(placements=[Replicate()])
    return _GatherSequence.apply(x, dim)
