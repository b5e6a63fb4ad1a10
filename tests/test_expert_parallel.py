"""Expert parallel: experts sharded over an ep group folded out of dp_shard x cp x tp,
tokens exchanged by all-to-all; MoE layers under TP/SP (token parallel over tp, ETP=1);
parity with the single-device MoE model, the collectives, and the errors."""

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


# MoE under TP: attention/dense colwise-rowwise, the MoE token parallel over tp, experts
# sharded over an ep group that may fold over tp (consecutive ranks of dp_shard x cp x tp)
TP_MOE_LAYOUTS = {
    "tp2_sp": (2, {"tp": 2}, {"sequence_parallel": True}),  # experts replicated, grads summed over tp
    "tp2": (2, {"tp": 2}, {}),  # no SP: the MoE slices its replicated input, gathers its output
    "ep2_from_tp2_sp": (2, {"tp": 2}, {"expert_parallel": 2, "sequence_parallel": True}),
    "ep2_tp2_dp2_sp": (4, {"tp": 2, "dp_shard": 2}, {"expert_parallel": 2, "sequence_parallel": True}),
    "ep2_tp2_dp2": (4, {"tp": 2, "dp_shard": 2}, {"expert_parallel": 2}),
    "ep4_from_tp2_dp2_sp": (4, {"tp": 2, "dp_shard": 2}, {"expert_parallel": 4, "sequence_parallel": True}),
    "tp2_fsdp2_sp": (4, {"tp": 2, "dp_shard": 2}, {"sequence_parallel": True}),  # FSDP leaves experts alone
    "pp2_cp2_tp2_ep2": (8, {"pp": 2, "cp": 2, "tp": 2},
                        {"expert_parallel": 2, "sequence_parallel": True, "micro_batch_size": 1}),
}


@pytest.mark.parametrize("layout", list(EP_LAYOUTS) + list(TP_MOE_LAYOUTS))
def test_expert_parallel_parity(layout: str) -> None:
    world, mesh_kwargs, plan_kwargs = {**EP_LAYOUTS, **TP_MOE_LAYOUTS}[layout]
    losses = run_distributed(world, one_step_parity, "moe", mesh_kwargs, plan_kwargs, batch=4, seq=16)
    assert len(set(losses)) == 1


def test_bf16_expert_parallel_under_fsdp() -> None:
    """bf16 mixed precision with the experts sharded by EP: FSDP leaves those weights alone
    (its ignored parameters), so the experts cast them to the activations' bf16 themselves;
    they crashed in the grouped GEMM (bf16 rows against fp32 weights) before, also in the
    Mixtral recipe's own layout (EP over FSDP, selective recompute) on 2 x H200."""
    from .test_meta_init import _bf16_case

    run_distributed(2, _bf16_case, {"dp_shard": 2}, {"expert_parallel": 2, "recompute": "selective"}, "moe")


def test_expert_parallel_training_tracks_single_device() -> None:
    run_distributed(4, training_parity, "moe", {"dp_shard": 4}, {"expert_parallel": 2}, steps=10, batch=4)


def test_tp_moe_training_tracks_single_device() -> None:
    """TP2 + SP, experts replicated over tp: clipping counts each expert gradient once."""
    run_distributed(2, training_parity, "moe", {"tp": 2}, {"sequence_parallel": True}, steps=10, batch=4)


def _tp_moe_collectives() -> dict[str, int]:
    pm = parallelize(copy.deepcopy(make_model("moe")), build_mesh(tp=2),
                     ParallelPlan(expert_parallel=2, sequence_parallel=True))
    x, _ = make_batch(TINY_LLAMA.vocab_size, 2, 16)
    with CommDebugMode() as comm:
        pm(x)
    return {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()}


def test_tp_sp_moe_takes_its_sequence_shard() -> None:
    """Under SP the MoE layers gather nothing: all-gathers only before attention, the dense
    feed-forward, each shared expert and the head; three all-to-alls per MoE layer."""
    n_moe = TINY_MOE.n_layers - TINY_MOE.n_dense_layers
    counts = run_distributed(2, _tp_moe_collectives)[0]
    gathers = sum(v for k, v in counts.items() if "all_gather" in k)
    assert gathers == TINY_MOE.n_layers + TINY_MOE.n_dense_layers + n_moe + 1, counts
    assert sum(v for k, v in counts.items() if "all_to_all" in k) == 3 * n_moe, counts


def _uneven_sequence_without_sp() -> str:
    pm = parallelize(copy.deepcopy(make_model("moe")), build_mesh(tp=2), ParallelPlan())
    x, _ = make_batch(TINY_LLAMA.vocab_size, 2, 15)
    with pytest.raises(ValueError, match="sequence length 15 is not divisible by tp=2") as e:
        pm(x)
    return str(e.value)


def test_tp_moe_needs_sequence_divisible_by_tp() -> None:
    """Without SP the MoE layers still split the sequence over tp: an odd length is an error
    on every rank alike (no hang)."""
    run_distributed(2, _uneven_sequence_without_sp)


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


def test_expert_parallel_must_divide_dp_shard_cp_tp_and_needs_experts() -> None:
    fake_world(2)
    with torch.device("meta"):
        moe, dense = Llama(TINY_MOE), Llama(TINY_LLAMA)
    with pytest.raises(ValueError, match=r"expert_parallel=4 does not divide dp_shard\(2\) x cp\(1\) x tp\(1\) = 2"):
        parallelize(moe, build_mesh(dp_shard=2), ParallelPlan(expert_parallel=4))
    with pytest.raises(ValueError, match="has no MoE layers"):
        parallelize(dense, build_mesh(dp_shard=2), ParallelPlan(expert_parallel=2))
    fake_world(6)
    with torch.device("meta"):
        moe = Llama(TINY_MOE)
    with CommDebugMode() as comm, pytest.raises(
            ValueError, match=r"expert_parallel=4 does not divide dp_shard\(3\) x cp\(1\) x tp\(2\) = 6"):
        parallelize(moe, build_mesh(dp_shard=3, tp=2), ParallelPlan(expert_parallel=4))
    assert comm.get_total_counts() == 0


def test_tp_moe_needs_a_moe_rule() -> None:
    """User rules that leave an MoE layer without the 'moe' style under tp > 1, or give it
    to a module that is not an MoE, are errors before any collective."""
    fake_world(2)
    with torch.device("meta"):
        model = Llama(TINY_MOE)
    from dtensor_parallel.plans import llama_plan

    rules = {k: v for k, v in llama_plan(model)["rules"].items() if not k.startswith("layers.3.feed_forward")}
    with CommDebugMode() as comm, pytest.raises(ValueError,
                                                match=r"MoE layer 'layers.3.feed_forward' has no 'moe' TP"):
        parallelize(model, build_mesh(tp=2), ParallelPlan(rules=rules))
    with pytest.raises(ValueError, match=r"gives style MoEParallel to 'layers.0.feed_forward'.*needs a MoE"):
        parallelize(model, build_mesh(tp=2), ParallelPlan(rules={**rules, "layers.0.feed_forward": "moe"}))
    assert comm.get_total_counts() == 0
