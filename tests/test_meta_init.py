"""Build on the meta device, parallelize, then initialize shards in place; and bf16."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dtensor_parallel import ParallelPlan, build_mesh, parallelize
from dtensor_parallel.models import Llama

from .harness import run_distributed
from .parity import TINY_LLAMA, make_batch, make_model, plan_for, reference_step


def _meta_init_case(mesh_kwargs: dict, plan_kwargs: dict) -> float:
    with torch.device("meta"):
        model = Llama(TINY_LLAMA)
    pm = parallelize(model, build_mesh(**mesh_kwargs), ParallelPlan(**plan_kwargs))
    pm.init_weights(seed=7)
    got = pm.full_state_dict()
    assert not any(p.is_meta for p in pm.parameters())
    single = Llama(TINY_LLAMA)
    single.init_weights(seed=7)
    for name, want in single.state_dict().items():  # the same weights as on one device
        assert torch.equal(got[name], want), name
    wq = got["layers.0.attention.wq.weight"]
    assert not torch.equal(wq[:8], wq[-8:]), "shards must not repeat one another"
    assert abs(wq.std().item() - 0.02) < 0.002
    x, y = make_batch(TINY_LLAMA.vocab_size, 4, 16)
    return pm.forward_backward(pm.shard_batch(x), pm.shard_batch(y)).item()


@pytest.mark.parametrize("world,mesh_kwargs,plan_kwargs", [
    (4, {"tp": 2, "dp_shard": 2}, {"sequence_parallel": True}),
    (4, {"dp_replicate": 2, "dp_shard": 2}, {}),
])
def test_meta_build_parallelize_then_init(world: int, mesh_kwargs: dict, plan_kwargs: dict) -> None:
    """Meta build -> parallelize -> init gives, in any layout, exactly the weights of a
    single-device init with the same seed."""
    losses = run_distributed(world, _meta_init_case, mesh_kwargs, plan_kwargs)
    assert len(set(losses)) == 1
    assert abs(losses[0] - math.log(TINY_LLAMA.vocab_size)) < 1.0  # a fresh model: about uniform


def _bf16_case(mesh_kwargs: dict, plan_kwargs: dict, kind: str = "llama") -> float:
    ref = make_model(kind)
    x, y = make_batch(TINY_LLAMA.vocab_size, 4, 16)
    ref_loss = reference_step(ref, x, y).item()
    pm = parallelize(copy.deepcopy(ref), build_mesh(**mesh_kwargs),
                     plan_for(kind, mixed_precision="bf16", **plan_kwargs))
    loss = pm.forward_backward(pm.shard_batch(x), pm.shard_batch(y)).item()
    assert abs(loss - ref_loss) < 2e-2 * ref_loss, (loss, ref_loss)
    assert all(p.dtype == torch.float32 for p in pm.parameters()), "master weights stay fp32"
    assert all(p.grad.dtype == torch.float32 for p in pm.parameters())
    return loss


def test_bf16_mixed_precision_fsdp_and_tp() -> None:
    run_distributed(4, _bf16_case, {"tp": 2, "dp_shard": 2}, {"sequence_parallel": True})
    run_distributed(2, _bf16_case, {"tp": 2}, {})  # no FSDP: autocast
