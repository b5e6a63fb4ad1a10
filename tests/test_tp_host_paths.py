"""The eager TP paths that spare host work (issue 23/24: eager TP is host-bound) compute what
DTensor computes: the norm's sequence gather (``sequence_gather.py``) against
``redistribute``, bit for bit, values and gradients; and an eager TP2+SP Llama takes the local
column-parallel layers and hands the row-parallel layer its input as a plain tensor. Parity of
the whole model is the parity tests' (test_parity_gloo.py, test_tp_local.py, test_recompute.py)."""

from __future__ import annotations

import copy

from .harness import run_distributed


def _gather_matches_redistribute() -> list[str]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from dtensor_parallel.tensor_parallel.sequence_gather import gather_sequence

    mesh = init_device_mesh("cpu", (2,))
    rank = mesh.get_local_rank()
    bad = []
    for dim in (0, 1, 2):
        shape = [2, 3, 5]
        shape[dim] = 4  # this rank's block of 8
        base = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
        for grad_placement in (Partial(), Replicate()):
            seed = 10 + (rank if grad_placement.is_partial() else 0)  # a Replicate gradient is equal on all ranks
            results = []
            for gather in (lambda x: gather_sequence(x, dim), lambda x: x.redistribute(placements=[Replicate()])):
                xl = base.clone().requires_grad_()
                y = gather(DTensor.from_local(xl, mesh, [Shard(dim)], run_check=False))
                g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
                y.backward(DTensor.from_local(g, mesh, [grad_placement], run_check=False))
                results.append((y.placements, y.to_local(), xl.grad))
            (p0, y0, g0), (p1, y1, g1) = results
            if p0 != p1 or not torch.equal(y0, y1) or not torch.equal(g0, g1) or not g0.is_contiguous():
                bad.append(f"dim {dim}, gradient {grad_placement}")
    return bad


def test_sequence_gather_matches_redistribute() -> None:
    for bad in run_distributed(2, _gather_matches_redistribute):
        assert not bad, bad


def _eager_paths() -> tuple[int, int, int]:
    from dtensor_parallel import build_mesh, parallelize
    from dtensor_parallel.tensor_parallel.local_linear import LocalColwiseLinear
    from dtensor_parallel.tensor_parallel.matmul_reduce_scatter import FusedRowwiseLinear
    from torch.distributed.tensor import DTensor

    from .parity import make_batch, make_model, plan_for

    ref = make_model("llama")
    plan = plan_for("llama", sequence_parallel=True, recompute="selective")
    pm = parallelize(copy.deepcopy(ref), build_mesh(tp=2), plan)
    local = [m for m in pm.module.modules() if isinstance(m, LocalColwiseLinear)]
    rowwise = [m for m in pm.module.modules() if isinstance(m, FusedRowwiseLinear)]
    plain_inputs = []
    for m in rowwise:
        m.register_forward_pre_hook(lambda mod, args: plain_inputs.append(not isinstance(args[0], DTensor)))
    x, y = make_batch(ref.args.vocab_size, 2, 16)
    pm.forward_backward(x, y)
    return len(local), len(rowwise), sum(plain_inputs)


def test_eager_tp_sp_takes_the_local_paths() -> None:
    """q, k, v, w1, w3 are LocalColwiseLinear; wo and w2 get plain inputs (forward and the
    recompute's forward: the fused op's output is saved, the rest of the block reruns)."""
    from .parity import make_model

    n = make_model("llama").args.n_layers
    for local, rowwise, plain in run_distributed(2, _eager_paths):
        assert (local, rowwise) == (5 * n, 2 * n)
        assert plain == 2 * rowwise, plain
