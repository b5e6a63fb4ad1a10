"""The row-parallel matmul + SP reduce-scatter as one op, communicating through NCCL (or gloo).

Why one op when the communication is plain NCCL: selective recompute (``recompute.py``) saves
the outputs of matmuls and of reduce-scatters. A row-parallel ``nn.Linear`` under SP is
``aten.mm`` (the partial sums, (b*s, dim) per rank: the *full* sequence) followed by
``reduce_scatter_tensor`` ((b, s/tp, dim)), so the policy saved both, and non-reentrant
checkpointing holds every saved output until the block's backward, although the mm output
only ever feeds the reduce-scatter (whose output the recompute takes from the cache). That is
(1 + tp) x the bytes of the layer's output per row-parallel layer instead of 1 x (issue 23;
``tests/test_recompute_memory.py`` counts them). As the custom op
``torch.ops.dtensor_parallel.matmul_reduce_scatter`` (``push="nccl"``) the pair is one op:
one output, saved once, and neither the GEMM nor the collective reruns in backward.

Forward (rank r of W; x (outer, S*P, K) and wt (K, N) as in ``matmul_reduce_scatter``)::

    send (W, outer, S*P/W, N): chunk c of the rows, x[:, chunk c] @ wt, in block c
    out  (outer, S*P/W, N)   = reduce_scatter(send) over dim 0: block r summed over ranks

For outer == 1 the blocks are contiguous row ranges of one GEMM (exactly the unfused layer's
``F.linear``); otherwise one GEMM per chunk writes its block (no transposing copy, which
DTensor's own ``Partial -> Shard(1)`` makes). Backward: the op's (all-gather, then the two
GEMMs), shared with the Triton form.

Under ``torch.compile`` the wiring keeps the unfused layer instead (``F.linear`` on DTensors,
then DTensor's reduce-scatter): inductor's min-cut partitioner already saves only the
reduce-scatter's output there (measured in the test above), and the collective stays visible
to inductor's passes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


funcol_ops = torch.ops._c10d_functional


def forward_nccl(x3: torch.Tensor, wt: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x3 (outer, S*P, K), wt (K, N) -> (outer, S*P/W, N): this rank's chunk of the sum over
    ``group`` of ``x3 @ wt``, through one functional reduce-scatter."""
    from .matmul_reduce_scatter import produce_chunks

    rank, world = group.rank(), group.size()
    outer, rows, _ = x3.shape
    r_loc, n = rows // world, wt.shape[1]
    send = torch.empty((world, outer, r_loc, n), dtype=x3.dtype, device=x3.device)  # block c: chunk c
    if outer == 1:
        torch.mm(x3[0], wt, out=send.view(rows, n))  # (S*P, N): the blocks in row order
    else:
        produce_chunks(x3, wt, rank, world, send[rank], lambda i, c: send[c])
    out = funcol_ops.reduce_scatter_tensor(send.view(world * outer * r_loc, n), "sum", world, group.group_name)
    return funcol_ops.wait_tensor(out).view(outer, r_loc, n)


def nccl_cannot_serve(x: torch.Tensor, weight: torch.Tensor, dim: int, group: dist.ProcessGroup) -> str | None:
    """Why the NCCL form cannot take this call (then ``F.linear`` and DTensor's reduce-scatter
    do), or None. Depends only on what all ranks share (shapes, dtypes, devices)."""
    if x.dim() < 2 or dim == x.dim() - 1:
        return f"scatter dim {dim} of a {x.dim()}-D input: needs a dim before the last"
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.dtype != x.dtype or weight.device != x.device:
        return f"weight {tuple(weight.shape)} {weight.dtype} for input {tuple(x.shape)} {x.dtype}"
    if group.size() < 2 or x.shape[dim] % group.size():
        return f"dim {dim} of {tuple(x.shape)} does not divide by {group.size()}"
    if not x.is_floating_point():
        return f"dtype {x.dtype}"
    if dist.get_backend(group) == "fake":  # simulated ranks (LocalTensorMode) compute DTensor's
        return "the fake process group: no communication inside an op"  # collectives, not an op's
    return None

