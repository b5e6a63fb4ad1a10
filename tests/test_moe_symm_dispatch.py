"""Expert-parallel dispatch/combine over symmetric memory (issue 22 items 1-2).

Kernel math in the Triton interpreter on CPU with the peers simulated by stacked tensors
(``triton_kernels.moe_dispatch_symm.simulate``): the receive layout (expert-major, then
source, then the source's sorted order: the NCCL path's regroup order), the receive counts,
the way back to each source's sorted rows, and the bound's all-or-nothing skip. The op and
its autograd on gloo ranks with the peers' areas emulated by all-gathers, against the NCCL
path's ``dispatch_combine`` (output and gradients bit-equal: the same copies, the same
expert rows). On 2 GPUs (``pytest -m gpu``): the symmetric-memory op against the NCCL path,
output and every gradient, and the model's EP2 parity with the kernels spied."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from triton_kernels.moe_dispatch_symm import simulate, tables_ref

from .harness import run_distributed

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


def _rank_rows(world: int, t: int, k: int, e: int, h: int, seed: int, dtype=torch.float32, dead: int = 0):
    """Per rank: rows sorted by expert (T*k, H) and counts (E,) int64, from top-k routing."""
    rows, counts = [], []
    for s in range(world):
        g = torch.Generator().manual_seed(seed + s)
        logits = torch.randn(t, e, generator=g)
        if dead:
            logits[:, :dead] = float("-inf")  # the first experts (all of rank 0's, say) get nothing
        ids = logits.topk(k, dim=-1).indices
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        rows.append(torch.randn(t, h, generator=g)[order // k].to(device=DEVICE, dtype=dtype))
        counts.append(torch.bincount(flat, minlength=e).to(DEVICE))
    return rows, counts


@pytest.mark.parametrize("world,t,k,e,h,dead", [(2, 13, 2, 8, 40, 0), (3, 9, 2, 6, 24, 2), (4, 7, 3, 8, 17, 0),
                                                 (8, 5, 2, 16, 16, 0), (2, 11, 4, 8, 33, 4)])
def test_simulated_layout_and_round_trip(world, t, k, e, h, dead) -> None:
    rows, counts = _rank_rows(world, t, k, e, h, seed=world * 10, dead=dead)
    cap = world * t * k  # the worst case: nothing can overflow
    scale = [float(d + 2) for d in range(world)]
    got = simulate(rows, counts, cap, experts=lambda x, c, d: x * scale[d])
    ref = tables_ref([c.cpu() for c in counts], world)
    for d, (recv, recv_counts, info, back) in enumerate(got):
        order = ref[d]["recv_order"]
        want = torch.stack([rows[s][i] for s, i in order]) if order else recv[:0]
        assert int(info[0]) == len(order) and int(info[1]) == max(len(r["recv_order"]) for r in ref)
        assert torch.equal(recv[:len(order)], want)  # a copy: exact, in the NCCL path's order
        assert torch.equal(recv_counts.cpu(), ref[d]["recv_counts"])
    el = e // world
    for s in range(world):  # every row came back from its expert's rank, scaled by that rank's factor
        owner = torch.repeat_interleave(torch.arange(e, device=DEVICE) // el, counts[s])
        want = rows[s] * torch.tensor(scale, device=DEVICE)[owner][:, None]
        assert torch.equal(got[s][3], want)


def test_simulated_bound_exceeded_skips_every_store() -> None:
    """A rank receiving more than the bound: every rank skips every store (no partial
    writes, no out-of-bounds), and info[1] reports the rows needed, for the host's error."""
    world, t, k, e, h = 2, 10, 2, 4, 8
    rows, counts = _rank_rows(world, t, k, e, h, seed=3)
    need = max(sum(int(c[d * 2:(d + 1) * 2].sum()) for c in counts) for d in range(world))
    got = simulate(rows, counts, need - 1)
    for recv, _, info, back in got:
        assert int(info[1]) == need
        assert not recv.any() and not back.any()
    got = simulate(rows, counts, need)  # exactly the bound: fits
    assert all(bool(r[3].any()) for r in got)


# ----------------------------------------------------------------------------------------
# gloo ranks (peers emulated) and 2 GPUs (symmetric memory): the op against the NCCL path
# ----------------------------------------------------------------------------------------


def _looped_experts(w: torch.Tensor):
    """Per local expert e: x @ w[e] over its rows (counts on the host: CPU, or a test)."""
    def run(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            outs.append(x[start:start + n] @ w[e])
            start += n
        return torch.cat(outs)
    return run


def _grouped_experts(w: torch.Tensor):
    """bf16 grouped GEMM (rows past the last offset left alone), as the model's experts."""
    return lambda x, counts: torch._grouped_mm(x, w, offs=torch.cumsum(counts, 0).to(torch.int32))


def _op_against_nccl(t: int, k: int, e: int, h: int, dtype: torch.dtype, grouped: bool, calls: int = 1) -> int:
    """symm_dispatch_combine (emulated on gloo / symmetric memory on GPUs) against
    dispatch_combine (all-to-all): output, rows' gradient and the experts' weight gradient,
    bit-equal (the same copies; each expert sees the same rows in the same order)."""
    from dtensor_parallel import build_mesh
    from dtensor_parallel.expert_parallel import build_expert_groups, dispatch_combine
    from dtensor_parallel.expert_parallel.symm_dispatch import choose_exchange, symm_dispatch_combine
    from dtensor_parallel.mesh import ParallelDims

    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mesh = build_mesh(dp_shard=world)
    groups = build_expert_groups(mesh, ParallelDims.from_mesh(mesh), world)
    exchange = choose_exchange(world, dev.type, "symm" if cuda else "auto")
    assert exchange == ("symm" if cuda else "emulated")
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(e // world, h, h, generator=g) / h ** 0.5).to(device=dev, dtype=dtype)
    unequal: list[str] = []
    for call in range(calls):  # back-to-back calls: the areas' reuse
        g = torch.Generator().manual_seed(100 * call + rank)
        ids = torch.randn(t, e, generator=g).topk(k, -1).indices.reshape(-1)
        order = torch.argsort(ids, stable=True)
        rows = torch.randn(t, h, generator=g)[order // k].to(device=dev, dtype=dtype)
        counts = torch.bincount(ids, minlength=e).to(dev)
        gout = torch.randn(t * k, h, generator=g).to(device=dev, dtype=dtype)
        outs, grads = [], []
        for path in ("symm", "nccl"):
            xr, wr = rows.clone().requires_grad_(), w.clone().requires_grad_()
            experts = _grouped_experts(wr) if grouped else _looped_experts(wr)
            if path == "symm":
                out = symm_dispatch_combine(xr, counts, experts, groups.ep_group, exchange)
            else:
                out = dispatch_combine(xr, counts, experts, groups)
            out.backward(gout)
            outs.append(out.detach())
            grads.append((xr.grad, wr.grad))
        pairs = [("output", outs[0], outs[1]), ("rows' gradient", grads[0][0], grads[1][0]),
                 ("experts' weight gradient", grads[0][1], grads[1][1])]
        for name, a, b in pairs:
            if grouped and not torch.equal(a, b):  # the GEMM ran on more rows (the bound): cuBLAS/CUTLASS
                torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-2, msg=name)  # may tile differently
                unequal.append(name)
            else:
                assert torch.equal(a, b), f"{name} differs: {(a - b).abs().max()}"
    return calls if not unequal else -calls  # negative: within bf16 rounding, not bit-equal


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the kernels under the interpreter")
@pytest.mark.parametrize("world,k,e", [(2, 2, 8), (4, 3, 8)])
def test_gloo_op_matches_the_all_to_all_path(world, k, e) -> None:
    assert run_distributed(world, _op_against_nccl, 9, k, e, 24, torch.float32, False, 2) == [2] * world


def _bound_error() -> str:
    from dtensor_parallel import build_mesh
    from dtensor_parallel.expert_parallel import build_expert_groups
    from dtensor_parallel.expert_parallel.symm_dispatch import symm_dispatch_combine
    from dtensor_parallel.mesh import ParallelDims

    mesh = build_mesh(dp_shard=2)
    groups = build_expert_groups(mesh, ParallelDims.from_mesh(mesh), 2)
    counts = torch.tensor([8, 0, 0, 0]) if dist.get_rank() == 0 else torch.tensor([0, 0, 8, 0])
    rows = torch.randn(8, 4)
    symm_dispatch_combine(rows, counts, lambda x, c: x, groups.ep_group, "emulated", recv_bound=1.0)  # fits
    with pytest.raises(ValueError, match=r"received 16 expert rows but the receive bound is 12.*recv_bound"):
        symm_dispatch_combine(rows, torch.tensor([8, 0, 0, 0]), lambda x, c: x, groups.ep_group, "emulated",
                              recv_bound=1.5)
    return "ok"


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the kernels under the interpreter")
def test_gloo_bound_exceeded_is_a_clear_error() -> None:
    assert run_distributed(2, _bound_error) == ["ok", "ok"]


def _model_parity_spied(mesh_kwargs: dict, plan_kwargs: dict, backend_kind: str) -> tuple[float, int]:
    """one_step_parity with the symmetric-memory exchange spied (calls counted)."""
    from dtensor_parallel.expert_parallel import symm_dispatch

    from .parity import one_step_parity

    calls = []
    real = symm_dispatch.symm_dispatch_combine
    symm_dispatch.symm_dispatch_combine = lambda *a, **kw: calls.append(a[4]) or real(*a, **kw)
    try:
        loss = one_step_parity("moe", mesh_kwargs, plan_kwargs, batch=4, seq=16)
    finally:
        symm_dispatch.symm_dispatch_combine = real
    assert set(calls) == {backend_kind}, calls
    return loss, len(calls)


EP2_TRITON = ({"dp_shard": 2}, {"expert_parallel": 2, "kernels": {"moe_dispatch": "triton"}})


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the kernels under the interpreter")
def test_gloo_model_parity_through_the_emulated_exchange() -> None:
    from .parity import TINY_MOE

    results = run_distributed(2, _model_parity_spied, *EP2_TRITON, "emulated")
    n_moe = TINY_MOE.n_layers - TINY_MOE.n_dense_layers
    assert len({loss for loss, _ in results}) == 1 and all(n == n_moe for _, n in results), results


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
class TestGPU:
    """``pytest -m gpu tests/test_moe_symm_dispatch.py`` on 2 GPUs (nccl ranks)."""

    def test_symm_op_matches_nccl_bf16_grouped_gemm(self) -> None:
        got = run_distributed(2, _op_against_nccl, 512, 2, 8, 256, torch.bfloat16, True, 4, backend="nccl")
        print("bit-equal" if got == [4, 4] else "within bf16 rounding", got)
        assert [abs(v) for v in got] == [4, 4]

    def test_symm_op_matches_nccl_top8_of_64(self) -> None:
        got = run_distributed(2, _op_against_nccl, 256, 8, 64, 512, torch.bfloat16, True, 2, backend="nccl")
        print("bit-equal" if got == [2, 2] else "within bf16 rounding", got)
        assert [abs(v) for v in got] == [2, 2]

    def test_model_ep2_parity_with_the_symm_exchange_spied(self) -> None:
        from .parity import TINY_MOE

        results = run_distributed(2, _model_parity_spied, *EP2_TRITON, "symm", backend="nccl")
        n_moe = TINY_MOE.n_layers - TINY_MOE.n_dense_layers
        assert results[0][0] == results[1][0] and all(n == n_moe for _, n in results), results


def test_exchange_choice_names_the_ep_group_and_logs_its_fallback_once(caplog, monkeypatch) -> None:
    """symm_mem_unavailable speaks of the group it was asked about (ep here, not tp), and
    "auto" falls back to NCCL with one log line however often it is asked."""
    import logging

    from dtensor_parallel.expert_parallel import symm_dispatch
    from dtensor_parallel.tensor_parallel.sp_reduce_scatter import symm_mem_unavailable
    from dtensor_parallel.warn_once import forget

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert symm_mem_unavailable(9, "cuda", dim="ep").startswith("ep=9; the kernel serves 2..8")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    forget()
    with caplog.at_level(logging.WARNING, logger=symm_dispatch.__name__):
        assert [symm_dispatch.choose_exchange(9, "cuda") for _ in range(3)] == ["nccl"] * 3
    lines = [r.getMessage() for r in caplog.records if r.name == symm_dispatch.__name__]
    assert len(lines) == 1 and "ep=9" in lines[0], lines
    with pytest.raises(ValueError, match="ep=9"):
        symm_dispatch.choose_exchange(9, "cuda", "symm")
