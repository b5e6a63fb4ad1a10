"""transformers MoE causal LMs (Mixtral, Qwen2-MoE, Qwen3-MoE) through parallelize() with no
rules written: their sparse blocks run as our MoE layers (expert parallel, token parallel
over tp, the dispatch kernels), each layout against transformers' own model on one device
(loss, every gradient, the balancing loss's included, every parameter after a step)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers  # the test extra: a missing install fails collection instead of skipping
from torch.distributed.tensor.debug import CommDebugMode

from dtensor_parallel import ParallelPlan, build_mesh, parallelize
from dtensor_parallel.plans.hf_moe import HFSparseMoE

from .harness import run_distributed
from .hf_parity import MOE_ARCHS, hf_balancing_loss, hf_config, hf_one_step_parity, make_hf_model
from .local_ranks import fake_world

EP = {"expert_parallel": 2}
LAYOUTS = {  # name: (world, mesh, plan)
    "ep2": (2, {"dp_shard": 2}, EP),
    "ep2_fsdp2": (4, {"dp_shard": 4}, EP),  # each expert shard on 2 ranks: summed over edp
    "ep2_tp2_sp": (4, {"tp": 2, "dp_shard": 2}, {**EP, "sequence_parallel": True}),  # token parallel MoE
    "ep2_tp2": (4, {"tp": 2, "dp_shard": 2}, EP),  # no SP: the MoE slices its tokens, gathers its output
    "ep2_pp2": (4, {"pp": 2, "dp_shard": 2}, {**EP, "micro_batch_size": 1}),  # 2 micro-batches
    "ep2_cp2": (2, {"cp": 2}, EP),  # experts over the cp ranks, zigzag positions
}
CASES = ([("mixtral", name) for name in LAYOUTS]
         + [("qwen2_moe", name) for name in ("ep2_fsdp2", "ep2_tp2_sp", "ep2_pp2", "ep2_cp2")]
         + [("qwen3_moe", name) for name in ("ep2", "ep2_tp2_sp", "ep2_pp2", "ep2_cp2")])


@pytest.mark.parametrize("arch,layout", CASES, ids=[f"{a}-{n}" for a, n in CASES])
def test_hf_moe_model_matches_one_device(arch: str, layout: str) -> None:
    world, mesh_kwargs, plan_kwargs = LAYOUTS[layout]
    losses = run_distributed(world, hf_one_step_parity, arch, mesh_kwargs, plan_kwargs)
    assert len(set(losses)) == 1


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_sparse_blocks_compute_what_transformers_does(arch: str) -> None:
    """One device, no parallelism: the adapted blocks give transformers' logits and every
    gradient, and keep every parameter (the same tensors, under the same names)."""
    from .parity import rel_err

    ref = make_hf_model(arch)
    model = copy.deepcopy(ref)
    fake_world(1)
    pm = parallelize(model, build_mesh(), ParallelPlan())
    assert sum(isinstance(m, HFSparseMoE) for m in model.modules()) == (1 if arch == "qwen3_moe" else 2)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = torch.randint(0, 128, (2, 16))
    out = ref(input_ids=x, output_router_logits=True)
    want, got = out.logits, pm(x)
    assert rel_err(got, want) <= 1e-6
    balancing = hf_balancing_loss(ref)  # ours is carried into the backward by the layers
    (want.square().mean() + (balancing(out.router_logits) if balancing else 0)).backward()
    got.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5, name


def test_dispatch_kernels_run_on_transformers_experts(monkeypatch) -> None:
    """plan.kernels['moe_dispatch']='triton': the Triton permute/unpermute (interpreted on
    CPU) move a transformers model's tokens too."""
    import triton_kernels.moe_dispatch as kernels

    calls = []
    for name in ("permute", "unpermute"):
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    ref = make_hf_model("mixtral")
    model = copy.deepcopy(ref)
    fake_world(1)
    pm = parallelize(model, build_mesh(), ParallelPlan(kernels={"moe_dispatch": "triton"}))
    x = torch.randint(0, 128, (2, 8))
    torch.testing.assert_close(pm(x), ref(input_ids=x).logits, rtol=1e-5, atol=1e-6)
    assert calls.count("permute") == 2 and calls.count("unpermute") == 2


def test_balancing_loss_follows_the_config() -> None:
    """On with output_router_logits (coefficient router_aux_loss_coef * top_k / layers), off
    without: transformers adds its balancing loss only then."""
    from dtensor_parallel.plans.hf_moe import moe_args_from_hf

    on = moe_args_from_hf(hf_config("mixtral"), n_moe_layers=2)
    assert (on.load_balance, on.aux_loss_coeff, on.n_experts, on.top_k, on.route_norm) == (
        "aux_loss", pytest.approx(0.1 * 2 / 2), 4, 2, True)
    off = moe_args_from_hf(hf_config("qwen3_moe", norm_topk_prob=False), n_moe_layers=1)
    assert (off.load_balance, off.route_norm, off.hidden_dim) == ("none", False, 32)


@pytest.mark.parametrize("arch,overrides,mesh_kwargs,plan_kwargs,match", [
    ("mixtral", {"router_jitter_noise": 0.1}, {"dp_shard": 2}, EP, r"router_jitter_noise=0.1 .* set "
     r"config.router_jitter_noise = 0.0"),
    ("mixtral", {"num_local_experts": 3}, {"dp_shard": 2}, EP, r"expert_parallel=2 does not divide the 3 experts"),
    ("qwen3_moe", {}, {"dp_shard": 2}, {"expert_parallel": 4}, r"expert_parallel"),
])
def test_hf_moe_errors_before_any_collective(arch, overrides, mesh_kwargs, plan_kwargs, match) -> None:
    fake_world(2)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, **overrides))
    with CommDebugMode() as comm, pytest.raises(ValueError, match=match):
        parallelize(model, build_mesh(**mesh_kwargs), ParallelPlan(**plan_kwargs))
    assert comm.get_total_counts() == 0


def _phimoe(**overrides):
    config = transformers.PhimoeConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=4, num_local_experts=4,
                                       num_experts_per_tok=2, max_position_embeddings=64, **overrides)
    torch.manual_seed(0)
    return transformers.PhimoeForCausalLM(config).float()


def test_other_transformers_moe_blocks_are_never_adapted() -> None:
    """PhiMoE routes with its sparsemixer, not softmax top-k: its blocks keep transformers'
    own code (equal logits on one device), and expert parallel over them is refused by name
    before any collective, instead of sharding experts under a routing we would get wrong."""
    ref = _phimoe()
    model = copy.deepcopy(ref)
    fake_world(1)
    pm = parallelize(model, build_mesh(), ParallelPlan(blocks="model.layers.*"))
    assert not any(isinstance(m, HFSparseMoE) for m in model.modules())
    x = torch.randint(0, 128, (2, 16))
    ref.eval(), pm.module.eval()  # (no router jitter)
    torch.testing.assert_close(pm(x), ref(input_ids=x).logits, rtol=1e-5, atol=1e-6)
    fake_world(2)
    with CommDebugMode() as comm, pytest.raises(ValueError, match=r"expert_parallel=2: PhimoeForCausalLM's MoE "
                                                               r"blocks \(PhimoeSparseMoeBlock\) route"):
        parallelize(_phimoe(), build_mesh(dp_shard=2), ParallelPlan(blocks="model.layers.*", expert_parallel=2))
    assert comm.get_total_counts() == 0
