"""Expert parallel: experts sharded over an ep group folded out of dp_shard x cp, tokens
exchanged by all-to-all; parity with the single-device MoE model, and the collectives."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode

from dtensor_parallel import ParallelPlan, build_mesh, parallelize
from dtensor_parallel.models import Llama

from .harness import run_distributed
from .local_ranks import fake_world
from .parity import TINY_LLAMA, TINY_MOE, make_batch, make_model, one_step_parity, training_parity

EP_LAYOUTS = {
    "ep2": (2, {"dp_shard": 2}, {"expert_parallel": 2}),
    "ep4": (4, {"dp_shard": 4}, {"expert_parallel": 4}),
    "ep2_edp2": (4, {"dp_shard": 4}, {"expert_parallel": 2}),  # expert grads summed over 2
    "ep2_hsdp": (4, {"dp_replicate": 2, "dp_shard": 2}, {"expert_parallel": 2}),
    "ep2_pp2": (4, {"dp_shard": 2, "pp": 2}, {"expert_parallel": 2, "micro_batch_size": 1}),
    "ep4_from_cp2_dp2": (4, {"cp": 2, "dp_shard": 2}, {"expert_parallel": 4}),
}


@pytest.mark.parametrize("layout", list(EP_LAYOUTS))
def test_expert_parallel_parity(layout: str) -> None:
    world, mesh_kwargs, plan_kwargs = EP_LAYOUTS[layout]
    losses = run_distributed(world, one_step_parity, "moe", mesh_kwargs, plan_kwargs, batch=4, seq=16)
    assert len(set(losses)) == 1


def test_expert_parallel_training_tracks_single_device() -> None:
    run_distributed(4, training_parity, "moe", {"dp_shard": 4}, {"expert_parallel": 2}, steps=10, batch=4)


def _ep_collectives() -> dict[str, int]:
    pm = parallelize(copy.deepcopy(make_model("moe")), build_mesh(dp_shard=2), ParallelPlan(expert_parallel=2))
    x, y = make_batch(TINY_LLAMA.vocab_size, 2, 16)
    local = pm.stage_modules[0].layers["1"].feed_forward.w1
    assert local.to_local().shape[0] == TINY_MOE.moe.n_experts // 2  # half the experts here
    with CommDebugMode() as comm:
        pm(pm.shard_batch(x))
    return {str(k): v for k, v in comm.get_comm_counts().items() if "all_to_all" in str(k)}


def test_dispatch_is_three_all_to_alls_per_moe_layer() -> None:
    """Per MoE layer forward: counts, tokens out, results back."""
    n_moe = TINY_MOE.n_layers - TINY_MOE.n_dense_layers
    counts = run_distributed(2, _ep_collectives)[0]
    assert sum(counts.values()) == 3 * n_moe, counts


@pytest.mark.parametrize("plan_kwargs,match", [
    ({"expert_parallel": 3}, r"expert_parallel=3 does not divide the 4 experts"),
])
def test_bad_expert_parallel(plan_kwargs: dict, match: str) -> None:
    fake_world(6)
    with torch.device("meta"):
        model = Llama(TINY_MOE)
    with CommDebugMode() as comm, pytest.raises(ValueError, match=match):
        parallelize(model, build_mesh(dp_shard=6), ParallelPlan(**plan_kwargs))
    assert comm.get_total_counts() == 0


def test_expert_parallel_must_divide_dp_shard_cp_and_needs_experts() -> None:
    fake_world(2)
    with torch.device("meta"):
        moe, dense = Llama(TINY_MOE), Llama(TINY_LLAMA)
    with pytest.raises(ValueError, match=r"expert_parallel=4 does not divide dp_shard\(2\) x cp\(1\) = 2"):
        parallelize(moe, build_mesh(dp_shard=2), ParallelPlan(expert_parallel=4))
    with pytest.raises(ValueError, match="has no MoE layers"):
        parallelize(dense, build_mesh(dp_shard=2), ParallelPlan(expert_parallel=2))
