"""The MoE feed-forward on one device: routing, balancing losses by hand, capacity
dropping, and the grouped experts against a per-token loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dtensor_parallel.models.moe import MoE, MoEArgs, expert_slots


def _moe(dtype=torch.float64, **kw) -> MoE:
    torch.manual_seed(0)
    args = MoEArgs(**{"n_experts": 4, "top_k": 2, "hidden_dim": 12, **kw})
    return MoE(8, args).to(dtype)


def _naive(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out[t] = sum_j w_tj SwiGLU_e(x_t) (+ shared), token by token; and the aux loss."""
    flat = x.reshape(-1, x.shape[-1])
    ids, w, aux = moe.router(flat, x.shape[0])
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(moe.args.top_k):
            e = ids[t, j]
            h = F.silu(flat[t] @ moe.w1[e]) * (flat[t] @ moe.w3[e])
            out[t] = out[t] + w[t, j].to(flat.dtype) * (h @ moe.w2[e])
    if moe.shared is not None:
        out = out + moe.shared(flat)
    return out.view_as(x), aux


@pytest.mark.parametrize("kw", [{}, {"top_k": 1}, {"n_shared_experts": 1}, {"score_func": "sigmoid"},
                                {"n_experts": 8, "top_k": 8}])
def test_dropless_moe_matches_per_token_loop(kw: dict) -> None:
    moe = _moe(**kw)
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)  # 21 tokens: odd count
    out = moe(x)
    x2 = x.detach().clone().requires_grad_()
    ref, aux = _naive(moe, x2)
    torch.testing.assert_close(out, ref)
    assert aux.item() > 0
    g = torch.randn_like(out)
    # the layer's backward also carries the auxiliary loss's gradient (weight 1)
    grads = torch.autograd.grad(out, [x, moe.w1, moe.w2, moe.w3, moe.router.gate.weight], g)
    ref_grads = torch.autograd.grad([ref, aux], [x2, moe.w1, moe.w2, moe.w3, moe.router.gate.weight],
                                    [g, torch.ones_like(aux)])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert int(moe.tokens_per_expert.sum()) == 21 * moe.args.top_k


def test_router_weights_renormalized_topk() -> None:
    moe = _moe(dtype=torch.float32)
    x = torch.randn(10, 8)
    ids, w, _ = moe.router(x, 1)
    probs = F.linear(x, moe.router.gate.weight).softmax(-1)
    top = probs.topk(2, -1)
    assert torch.equal(ids, top.indices)
    torch.testing.assert_close(w, top.values / top.values.sum(-1, keepdim=True))


def test_aux_loss_equals_hand_computation() -> None:
    """Switch loss coeff * E * sum_e f_e P_e, written out with loops."""
    moe = _moe(aux_loss_coeff=0.1, z_loss_coeff=0.01)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    flat = x.reshape(-1, 8)
    ids, _, aux = moe.router(flat, 2)
    logits = flat @ moe.router.gate.weight.T
    probs = logits.softmax(-1)
    E, k, T = 4, 2, 10
    want = 0.0
    for e in range(E):
        f = sum(int(e in ids[t].tolist()) for t in range(T)) / (T * k)
        p = sum(probs[t, e].item() for t in range(T)) / T
        want += f * p
    want = 0.1 * E * want
    want += 0.01 * sum(math.log(sum(math.exp(v) for v in logits[t].tolist())) ** 2 for t in range(T)) / T
    assert aux.item() == pytest.approx(want, rel=1e-10)


def test_seq_aux_loss_is_the_mean_over_sequences() -> None:
    moe = _moe(load_balance="seq_aux_loss", aux_loss_coeff=1.0)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    _, _, total = moe.router(x.reshape(-1, 8), 3)
    per_seq = [moe.router(x[i], 1)[2] for i in range(3)]
    assert total.item() == pytest.approx(sum(p.item() for p in per_seq) / 3, rel=1e-12)


def test_capacity_drops_exactly_the_late_tokens() -> None:
    """6 tokens, 2 experts, top-1, capacity factor 1: each expert takes ceil(6/2) = 3. Five
    tokens prefer expert 0: tokens 3 and 4 (the 4th and 5th in token order) are dropped."""
    moe = _moe(n_experts=2, top_k=1, capacity_factor=1.0, load_balance="none")
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0, 0] = 1.0  # expert 0 score follows feature 0
    x = torch.zeros(1, 6, 8, dtype=torch.float64)
    x[0, :, 1] = torch.randn(6)
    x[0, :5, 0] = 1.0  # tokens 0..4 -> expert 0
    x[0, 5, 0] = -1.0  # token 5 -> expert 1
    out = moe(x)[0]
    assert moe.capacity(6) == 3
    assert moe.tokens_per_expert.tolist() == [3, 1]
    dense = _moe(n_experts=2, top_k=1, load_balance="none")
    dense.load_state_dict(moe.state_dict())
    full = dense(x)[0]
    for t in range(6):
        if t in (3, 4):
            assert torch.count_nonzero(out[t]) == 0, f"token {t} should be dropped"
        else:
            torch.testing.assert_close(out[t], full[t])


def test_expert_slots_order_and_capacity() -> None:
    ids = torch.tensor([[1, 0], [1, 2], [0, 1]])  # slots 0..5
    slots, counts, keep = expert_slots(ids, 3, capacity=None)
    assert slots.tolist() == [1, 4, 0, 2, 5, 3] and counts.tolist() == [2, 3, 1]
    slots, counts, keep = expert_slots(ids, 3, capacity=2)
    assert slots.tolist() == [1, 4, 0, 2, 3] and counts.tolist() == [2, 2, 1]
    assert keep.tolist() == [True, True, True, True, True, False]


def test_aux_loss_free_bias_steers_choice_not_weights() -> None:
    moe = _moe(expert_bias=True, load_balance="none", bias_update_rate=0.5)
    moe.router.update_expert_bias(torch.tensor([10, 0, 0, 2]))
    assert moe.router.expert_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    x = torch.randn(16, 8, dtype=torch.float64)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([-100.0, 0, 0, 100.0]))
    ids, w, _ = moe.router(x, 1)
    assert (ids == 3).any(-1).all() and not (ids == 0).any()
    probs = F.linear(x, moe.router.gate.weight).softmax(-1)
    chosen = probs.gather(-1, ids)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True))


def test_bad_moe_args() -> None:
    with pytest.raises(ValueError, match="top_k=9 must be in 1..n_experts=8"):
        MoEArgs(n_experts=8, top_k=9)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEArgs(capacity_factor=0.0)


# ---- MoE blocks in the model ------------------------------------------------------------

def test_moe_flavours_published_sizes() -> None:
    from dtensor_parallel.models import llama3_args

    mixtral = llama3_args("mixtral-8x7b")
    assert round(mixtral.num_params() / 1e9, 1) == 46.7  # Mixtral 8x7B: 46.7B total
    assert round(mixtral.num_params(active=True) / 1e9, 1) == 12.9  # and 12.9B active
    ds = llama3_args("deepseek-v3-shaped")
    assert [ds.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    with torch.device("meta"):
        from dtensor_parallel.models import Llama
        model = Llama(llama3_args("debug-moe"))
    assert sum(p.numel() for p in model.parameters()) == llama3_args("debug-moe").num_params()


def _moe_parity_case(mesh_kwargs: dict, plan_kwargs: dict) -> float:
    from .parity import one_step_parity
    return one_step_parity("moe", mesh_kwargs, plan_kwargs, batch=4, seq=16)


@pytest.mark.parametrize("world,mesh_kwargs,plan_kwargs", [
    (2, {"dp_shard": 2}, {}),
    (2, {"pp": 2}, {"micro_batch_size": 1}),
    (2, {"cp": 2}, {}),
])
def test_moe_model_parity_dp_pp_cp(world: int, mesh_kwargs: dict, plan_kwargs: dict) -> None:
    """Dropless routing is per token, so FSDP, PP and CP give the single-device loss and
    gradients exactly (expert and tensor parallel for MoE blocks arrive with EP)."""
    from .harness import run_distributed
    losses = run_distributed(world, _moe_parity_case, mesh_kwargs, plan_kwargs)
    assert len(set(losses)) == 1


def test_meta_init_zeroes_the_expert_bias() -> None:
    from dtensor_parallel.models import Llama, llama3_args

    with torch.device("meta"):
        model = Llama(llama3_args("debug-moe", moe=MoEArgs(n_experts=4, top_k=2, hidden_dim=16, expert_bias=True)))
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    assert all(torch.count_nonzero(m.router.expert_bias) == 0 for m in model.modules() if isinstance(m, MoE))
    logits = model(torch.randint(0, 2048, (2, 8)))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kw", [{}, {"top_k": 1, "n_shared_experts": 1}, {"n_experts": 8, "top_k": 8}])
def test_triton_dispatch_kernels_match_torch_path(kw: dict, monkeypatch) -> None:
    """plan.kernels['moe_dispatch']='triton' swaps in the permute/unpermute kernels
    (interpreted on CPU, fp32); output and every gradient match the PyTorch path."""
    import triton_kernels.moe_dispatch as kernels

    calls = []
    for name in ("permute", "unpermute"):
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    moe = _moe(dtype=torch.float32, **kw)
    x = torch.randn(2, 9, 8, requires_grad=True)
    out = moe(x)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, moe.w1, moe.w2, moe.w3, moe.router.gate.weight], g)
    from dtensor_parallel.expert_parallel import ParallelDispatch

    moe.dispatch = ParallelDispatch(kernels="triton")
    out_k = moe(x)
    grads_k = torch.autograd.grad(out_k, [x, moe.w1, moe.w2, moe.w3, moe.router.gate.weight], g)
    torch.testing.assert_close(out_k, out, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_k, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert calls == ["permute", "unpermute"]  # the kernels ran (only on the Triton pass)


def _balancing_case(kind: str, mesh_kwargs: dict, plan_kwargs: dict) -> float:
    """The auxiliary (and z-) losses train the router exactly as on one device running the
    same micro-batches, and pm.moe_stats() reports the reference's aux loss and loads."""
    from .parity import one_step_parity

    loss = one_step_parity(kind, mesh_kwargs, plan_kwargs, batch=4, seq=16)
    return loss


def _balancing_stats_case(mesh_kwargs: dict, plan_kwargs: dict) -> None:
    import copy

    from dtensor_parallel import build_mesh, parallelize

    from .parity import make_batch, make_model, plan_for, reference_step

    ref = make_model("moe_aux")
    pm = parallelize(copy.deepcopy(ref), build_mesh(**mesh_kwargs), plan_for("moe_aux", **plan_kwargs))
    x, y = make_batch(ref.args.vocab_size, 4, 16)
    n_micro = pm._micro_batches(4 // pm.dims.dp) if pm.pipeline is not None else 1
    reference_step(ref, x, y, n_micro, pm.dims.dp)
    # without early stopping a recompute reruns the whole MoE forward inside the backward
    # (with it, torch stops the rerun before the statistics are added); neither may count twice
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        pm.forward_backward(pm.shard_batch(x), pm.shard_batch(y))
    stats = pm.moe_stats()
    layers = [m for m in ref.modules() if isinstance(m, MoE)]
    want_aux = sum(m.step_aux_loss.item() for m in layers)
    loads = [m.step_routed_counts.float() for m in layers]
    want_max = sum((c.max() / c.mean()).item() for c in loads) / len(loads)
    want_min = sum((c.min() / c.mean()).item() for c in loads) / len(loads)
    assert want_aux > 0
    assert math.isclose(stats["moe_aux_loss"], want_aux, rel_tol=1e-5), (stats, want_aux)
    assert math.isclose(stats["moe_max_load"], want_max, rel_tol=1e-6), (stats, want_max)
    assert math.isclose(stats["moe_min_load"], want_min, rel_tol=1e-6), (stats, want_min)


@pytest.mark.parametrize("kind,world,mesh_kwargs,plan_kwargs", [
    ("moe_aux", 2, {"dp_shard": 2}, {}),
    ("moe_aux", 4, {"dp_shard": 2, "cp": 2}, {"expert_parallel": 2}),  # statistics over dp x cp
    ("moe_aux", 2, {"pp": 2}, {"micro_batch_size": 1}),  # per micro-batch, mean over 4
    ("moe_seq_aux", 4, {"dp_shard": 2, "cp": 2}, {}),  # per sequence: counts over cp only
    ("moe_seq_aux", 2, {"pp": 2}, {"micro_batch_size": 2}),
    ("moe_aux", 2, {"tp": 2}, {}),  # MoE token parallel over tp: statistics over tp too
    ("moe_aux", 2, {"dp_shard": 2}, {"recompute": "full"}),  # the router reruns inside the backward
    ("moe_seq_aux", 4, {"tp": 2, "dp_shard": 2}, {"sequence_parallel": True, "expert_parallel": 2}),
])
def test_balancing_losses_train_the_router_as_on_one_device(kind, world, mesh_kwargs, plan_kwargs) -> None:
    from .harness import run_distributed
    losses = run_distributed(world, _balancing_case, kind, mesh_kwargs, plan_kwargs)
    assert len(set(losses)) == 1


@pytest.mark.parametrize("world,mesh_kwargs,plan_kwargs", [
    (4, {"dp_shard": 2, "cp": 2}, {"expert_parallel": 2}),
    (4, {"pp": 2, "dp_shard": 2}, {"micro_batch_size": 1}),
    (2, {"dp_shard": 2}, {"recompute": "full"}),  # the recomputed forward is not counted twice
])
def test_moe_stats_report_the_global_aux_loss_and_loads(world, mesh_kwargs, plan_kwargs) -> None:
    from .harness import run_distributed
    run_distributed(world, _balancing_stats_case, mesh_kwargs, plan_kwargs)
