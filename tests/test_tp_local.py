"""TP and TP+SP on simulated ranks (one process, LocalTensorMode): parity with the
single-device model and the exact collectives of Megatron's TP/SP pattern."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode

from dtensor_parallel import build_mesh, parallelize

from .local_ranks import simulated_ranks
from .parity import (REL_TOL, TINY_LLAMA, make_batch, make_model, plan_for, reference_step,
                     rel_err)
from .toy_gpt import ToyGPT

funcol = torch.ops.c10d_functional


def _rank0(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a LocalTensor (values are checked equal on every rank first)."""
    from torch.distributed._local_tensor import LocalTensor
    if isinstance(t, LocalTensor):
        shards = list(t._local_tensors.values())
        for s in shards[1:]:
            torch.testing.assert_close(s, shards[0], rtol=0, atol=0)
        return shards[0]
    return t


def _vocab(kind: str) -> int:
    return TINY_LLAMA.vocab_size if kind == "llama" else ToyGPT().wte.num_embeddings


@pytest.mark.parametrize("kind", ["llama", "toy"])
@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, False), (4, True)])
def test_tp_parity_simulated(kind: str, tp: int, sp: bool) -> None:
    ref = make_model(kind)
    x, y = make_batch(_vocab(kind), 2, 16)
    ref_loss = reference_step(ref, x, y)
    with simulated_ranks(tp):
        pm = parallelize(copy.deepcopy(ref), build_mesh(tp=tp), plan_for(kind, sequence_parallel=sp))
        loss = _rank0(pm.forward_backward(x, y))
        grads = {n: _rank0(g) for n, g in pm.full_grads().items()}
    assert rel_err(loss, ref_loss) <= REL_TOL
    for name, p in ref.named_parameters():
        assert rel_err(grads[name], p.grad) <= REL_TOL, name


def test_tp_sp_selective_recompute_parity_simulated() -> None:
    """Simulated ranks keep DTensor's row-parallel path under selective recompute: the
    one-op form (``rowwise_nccl.py``) communicates inside a custom op, which the fake
    process group cannot (it once ran there: loss off by 5e-4, gradients by 2e-2)."""
    ref = make_model("llama")
    x, y = make_batch(TINY_LLAMA.vocab_size, 2, 16)
    ref_loss = reference_step(ref, x, y)
    with simulated_ranks(2):
        plan = plan_for("llama", sequence_parallel=True, recompute="selective")
        pm = parallelize(copy.deepcopy(ref), build_mesh(tp=2), plan)
        loss = _rank0(pm.forward_backward(x, y))
        grads = {n: _rank0(g) for n, g in pm.full_grads().items()}
    assert rel_err(loss, ref_loss) <= REL_TOL
    for name, p in ref.named_parameters():
        assert rel_err(grads[name], p.grad) <= REL_TOL, name


def _counts(mode: CommDebugMode) -> dict[str, int]:
    names = {funcol.all_gather_into_tensor: "all_gather", funcol.reduce_scatter_tensor: "reduce_scatter",
             funcol.all_reduce: "all_reduce", torch.ops.c10d.allreduce_: "norm_grads_all_reduce"}
    return {names.get(k, str(k)): v for k, v in mode.get_comm_counts().items() if v}


@pytest.mark.parametrize("sp", [False, True])
def test_tp_collective_counts(sp: bool) -> None:
    """Per block: SP does 2 all-gathers (one per norm, shared by q/k/v and w1/w3) and 2
    reduce-scatters (wo, w2) forward, and the mirror image backward; plain TP does 2
    all-reduces forward and 2 backward. The embedding adds one reduce-scatter (all-reduce
    without SP) and the final norm one all-gather forward (all-reduce backward without
    SP); the loss-parallel cross entropy adds 3 all-reduces (max, sum of exp, target): DTensor's,
    which simulated ranks take (on real process groups the chunked loss does one all-gather
    instead, ``tests/test_cross_entropy.py``).
    Under SP the norm weights' partial gradients are summed by one all-reduce of one
    flat buffer after backward (Megatron does the same)."""
    n_layers = TINY_LLAMA.n_layers
    ref = make_model("llama")
    x, y = make_batch(TINY_LLAMA.vocab_size, 2, 16)
    with simulated_ranks(2):
        pm = parallelize(copy.deepcopy(ref), build_mesh(tp=2), plan_for("llama", sequence_parallel=sp))
        with CommDebugMode() as fwd:
            pm(x)
        with CommDebugMode() as both:
            pm.forward_backward(x, y)
    per_norm = 2 * n_layers + 1
    if sp:
        assert _counts(fwd) == {"all_gather": per_norm, "reduce_scatter": per_norm}
        assert _counts(both) == {"all_gather": 2 * per_norm, "reduce_scatter": 2 * per_norm, "all_reduce": 3,
                                 "norm_grads_all_reduce": 1}
    else:
        assert _counts(fwd) == {"all_reduce": per_norm}
        assert _counts(both) == {"all_reduce": 2 * per_norm + 3}
