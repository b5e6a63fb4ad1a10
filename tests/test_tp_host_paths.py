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



def _local_norms_match_dtensor(plan_kwargs: dict) -> list[str]:
    """An eager TP2+SP step with the norms on local shards (norm_styles.py) and one with every
    norm through DTensor (``per_token_norm`` patched to refuse): the loss and every gradient
    equal bit for bit; and each run's norms saw the input they should (plain shards, DTensors)."""
    from unittest import mock

    import torch
    from torch.distributed.tensor import DTensor

    from dtensor_parallel import build_mesh, parallelize
    from dtensor_parallel.models.llama import RMSNorm
    from dtensor_parallel.tensor_parallel import norm_styles

    from .parity import make_batch, make_model, plan_for

    ref = make_model("llama")
    x, y = make_batch(ref.args.vocab_size, 2, 16)
    forward, seen, results = RMSNorm.forward, [], []

    def spy(self, h):
        seen[-1].add(isinstance(h, DTensor))
        return forward(self, h)

    for local in (True, False):
        seen.append(set())
        with mock.patch.object(RMSNorm, "forward", spy), \
                mock.patch.object(norm_styles, "per_token_norm", norm_styles.per_token_norm if local else lambda m: False):
            pm = parallelize(copy.deepcopy(ref), build_mesh(tp=2),
                             plan_for("llama", sequence_parallel=True, **plan_kwargs))
            loss = pm.forward_backward(pm.shard_batch(x), pm.shard_batch(y))
        results.append((loss, {n: p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                               for n, p in pm.named_parameters()}))
    (l0, g0), (l1, g1) = results
    bad = [] if torch.equal(l0, l1) else [f"loss {l0.item()} vs {l1.item()}"]
    bad += [n for n in g0 if not torch.equal(g0[n], g1[n])]
    return bad + ([] if seen == [{False}, {True}] else [f"norm inputs were DTensors: {seen} (local run, DTensor run)"])


def test_eager_sp_norms_on_local_shards_match_dtensor() -> None:
    for plan_kwargs in ({}, {"recompute": "selective", "mixed_precision": "bf16"}):
        for bad in run_distributed(2, _local_norms_match_dtensor, plan_kwargs):
            assert not bad, (plan_kwargs, bad)
