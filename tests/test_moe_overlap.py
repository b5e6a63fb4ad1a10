"""The expert-parallel exchange in chunks beside the experts (issue 22 item 4, ``overlap.py``).

On gloo ranks (the emulated exchange, kernels in the interpreter): the chunked layer against
one exchange a layer, output and every gradient (the tokens, the combine weights, the
experts' and the shared expert's weights), with uneven chunks and experts that receive
nothing; the model's EP2 parity with ``ParallelPlan(moe_dispatch_chunks=...)`` against one
device, the chunked path spied; the plan field's checks and its way from a recipe and a
Megatron flag. On 2 GPUs (``pytest -m gpu``): the same op over symmetric memory on two
streams against the NCCL path, and the model's EP2 parity with the chunked path spied.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dtensor_parallel.expert_parallel.overlap import chunk_sizes
from dtensor_parallel.plan import ParallelPlan

from .harness import run_distributed
from .test_moe_symm_dispatch import _grouped_experts, _looped_experts

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def test_chunk_sizes_cover_the_tokens_and_none_is_empty() -> None:
    assert chunk_sizes(10, 3) == [4, 3, 3]
    assert chunk_sizes(8, 2) == [4, 4]
    assert chunk_sizes(2, 4) == [1, 1]  # never an empty chunk
    assert chunk_sizes(5, 1) == [5]


def _experts_and_shared(dtype, dev, h: int, e_local: int, rank: int):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(e_local, h, h, generator=g) / h ** 0.5
    shared = torch.randn(h, h, generator=g) / h ** 0.5
    return w.to(device=dev, dtype=dtype), shared.to(device=dev, dtype=dtype)


def _chunked_against_one_exchange(t: int, k: int, e: int, h: int, chunks: int, dead: int, with_shared: bool,
                                  dtype: torch.dtype = torch.float32) -> str:
    """ParallelDispatch(chunks=C).experts_of_tokens against chunks=1 on the same inputs:
    output and the gradients of the tokens, the combine weights, the experts' and the shared
    expert's weights. Returns "bit-equal" or "close"."""
    from dtensor_parallel import build_mesh
    from dtensor_parallel.expert_parallel import ParallelDispatch, build_expert_groups
    from dtensor_parallel.expert_parallel import overlap
    from dtensor_parallel.mesh import ParallelDims

    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mesh = build_mesh(dp_shard=world)
    groups = build_expert_groups(mesh, ParallelDims.from_mesh(mesh), world)
    w, sw = _experts_and_shared(dtype, dev, h, e // world, rank)
    g = torch.Generator().manual_seed(100 + rank)
    flat = torch.randn(t, h, generator=g).to(device=dev, dtype=dtype)
    logits = torch.randn(t, e, generator=g)
    if dead:
        logits[:, :dead] = float("-inf")  # rank 0's first experts receive nothing
    top = logits.softmax(-1).topk(k, -1)
    ids, wts = top.indices.to(dev), top.values.to(dev)
    gout = torch.randn(t, h, generator=g).to(device=dev, dtype=dtype)
    spied = []
    real = overlap.chunked_experts
    overlap.chunked_experts = lambda *a, **kw: spied.append(a[7]) or real(*a, **kw)
    try:
        results = []
        for c in (1, chunks):
            dispatch = ParallelDispatch(kernels="triton", groups=groups, exchange="symm" if cuda else "auto", chunks=c)
            assert dispatch.exchange == ("symm" if cuda else "emulated")
            x, wr, wt, swr = (v.clone().requires_grad_() for v in (flat, w, wts, sw))
            experts = (_grouped_experts if cuda else _looped_experts)(wr)
            out, counts = dispatch.experts_of_tokens(x, ids, wt, e, None, experts,
                                                     (lambda: x @ swr) if with_shared else None)
            out.backward(gout)
            results.append([out.detach(), counts, x.grad, wt.grad, wr.grad] + ([swr.grad] if with_shared else []))
    finally:
        overlap.chunked_experts = real
    assert spied == [chunks], spied  # only the chunked dispatcher took the overlapped path
    names = ["output", "counts", "tokens' gradient", "combine weights' gradient", "experts' weight gradient",
             "shared expert's weight gradient"]
    worst = 0.0
    for name, a, b in zip(names, *results):
        assert not b.isnan().any(), f"NaN in the chunked {name}"
        if not torch.equal(a, b):
            # other row counts per GEMM, and a weight gradient summed over chunks: other roundings.
            # Relative to the tensor's norm (a sum of ~1000 bf16 products has an ulp of ~0.1).
            err = ((b.double() - a.double()).norm() / a.double().norm()).item()
            worst = max(worst, err)
            assert err <= (1e-2 if dtype == torch.bfloat16 else 1e-6), f"{name}: relative error {err:.2e}"
    return "bit-equal" if worst == 0 else f"close ({worst:.1e})"


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the kernels under the interpreter")
@pytest.mark.parametrize("t,k,e,chunks,dead,shared", [(13, 2, 8, 2, 0, True), (11, 2, 8, 3, 4, False)])
def test_gloo_chunked_layer_matches_one_exchange(t, k, e, chunks, dead, shared) -> None:
    got = run_distributed(2, _chunked_against_one_exchange, t, k, e, 24, chunks, dead, shared)
    assert all(g == "bit-equal" or g.startswith("close") for g in got), got


def _model_parity_chunked(mesh_kwargs: dict, plan_kwargs: dict) -> tuple[float, int]:
    """one_step_parity with the chunked path spied (calls counted)."""
    from dtensor_parallel.expert_parallel import overlap

    from .parity import one_step_parity

    calls = []
    real = overlap.chunked_experts
    overlap.chunked_experts = lambda *a, **kw: calls.append(a[7]) or real(*a, **kw)
    try:
        loss = one_step_parity("moe", mesh_kwargs, plan_kwargs, batch=4, seq=16)
    finally:
        overlap.chunked_experts = real
    assert set(calls) == {plan_kwargs["moe_dispatch_chunks"]}, calls
    return loss, len(calls)


EP2_CHUNKED = ({"dp_shard": 2}, {"expert_parallel": 2, "kernels": {"moe_dispatch": "triton"},
                                 "moe_dispatch_chunks": 2})


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the kernels under the interpreter")
def test_gloo_model_parity_with_chunked_exchanges() -> None:
    """EP2 over FSDP2, the MoE layers' exchange in 2 chunks: loss and every gradient equal
    one device's (``one_step_parity``), and every MoE layer took the chunked path."""
    from .parity import TINY_MOE

    results = run_distributed(2, _model_parity_chunked, *EP2_CHUNKED)
    n_moe = TINY_MOE.n_layers - TINY_MOE.n_dense_layers
    assert len({loss for loss, _ in results}) == 1 and all(n == n_moe for _, n in results), results


def test_carveout_spans_the_experts_forward_and_backward() -> None:
    """``_experts_carved``: the experts run with n SMs carved out in forward and in backward
    (two chunks' spans nested), and the setting is restored after each."""
    from dtensor_parallel.expert_parallel import overlap

    seen = []
    w = torch.randn(4, 4, requires_grad=True)

    class Watch(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("fwd", torch._C._get_sm_carveout_experimental()))
            return x @ w.detach()

        @staticmethod
        def backward(ctx, g):
            seen.append(("bwd", torch._C._get_sm_carveout_experimental()))
            return g @ w.detach().T

    before = torch._C._get_sm_carveout_experimental()
    x = torch.randn(3, 4, requires_grad=True)
    ys = [overlap._experts_carved(lambda r, c: Watch.apply(r), x * (i + 1), None, 8) for i in range(2)]
    assert torch._C._get_sm_carveout_experimental() == before
    (ys[0] + ys[1]).sum().backward()
    assert seen == [("fwd", 8), ("fwd", 8), ("bwd", 8), ("bwd", 8)], seen
    assert torch._C._get_sm_carveout_experimental() == before and overlap._CARVEOUT["depth"] == 0
    torch.testing.assert_close(x.grad, 3 * torch.ones(3, 4) @ w.detach().T)
    z = overlap._experts_carved(lambda r, c: Watch.apply(r), x.detach(), None, 8)  # no grad: no span left open
    assert z.grad_fn is None and overlap._CARVEOUT["depth"] == 0


@pytest.mark.parametrize("value", [0, -1, 1.5, "2"])
def test_plan_rejects_bad_chunk_counts(value) -> None:
    with pytest.raises(ValueError, match=rf"moe_dispatch_chunks={value!r} must be a positive int"):
        ParallelPlan(moe_dispatch_chunks=value)


def test_chunk_count_reaches_the_dispatcher_from_a_recipe_and_a_flag() -> None:
    from dtensor_parallel.expert_parallel import ParallelDispatch
    from dtensor_parallel.trainer.config import load_config
    from dtensor_parallel.trainer.megatron_args import parse_megatron_args

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "debug_moe.toml"
    assert ParallelPlan().moe_dispatch_chunks == 1 and load_config(recipe).plan.moe_dispatch_chunks == 1
    assert load_config(recipe, overlay={"plan": {"moe_dispatch_chunks": 4}}).parallel_plan().moe_dispatch_chunks == 4
    assert parse_megatron_args("--moe-dispatch-chunks 2")["plan"] == {"moe_dispatch_chunks": 2}
    with pytest.raises(ValueError, match=r"chunks=0 must be an int >= 1.*ParallelPlan.moe_dispatch_chunks"):
        ParallelDispatch(chunks=0)
    assert ParallelDispatch(chunks=3).chunks == 3


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
class TestGPU:
    """``pytest -m gpu tests/test_moe_overlap.py`` on 2 GPUs (nccl ranks)."""

    def test_chunked_symm_layer_matches_one_exchange_bf16(self) -> None:
        got = run_distributed(2, _chunked_against_one_exchange, 1024, 2, 8, 256, 2, 0, True, torch.bfloat16,
                              backend="nccl")
        print(got)
        assert all(g == "bit-equal" or g.startswith("close") for g in got), got

    def test_chunked_symm_layer_four_chunks_top8_of_64(self) -> None:
        got = run_distributed(2, _chunked_against_one_exchange, 512, 8, 64, 256, 4, 8, False, torch.bfloat16,
                              backend="nccl")
        print(got)
        assert all(g == "bit-equal" or g.startswith("close") for g in got), got

    def test_model_ep2_parity_with_chunked_exchanges(self) -> None:
        from .parity import TINY_MOE

        results = run_distributed(2, _model_parity_chunked, *EP2_CHUNKED, backend="nccl")
        n_moe = TINY_MOE.n_layers - TINY_MOE.n_dense_layers
        assert results[0][0] == results[1][0] and all(n == n_moe for _, n in results), results
