"""Expert-parallel dispatch/combine over symmetric memory (issue 22 items 1-2).

Kernel math in the Triton interpreter on CPU with the peers simulated by stacked tensors
(``triton_kernels.moe_dispatch_symm.simulate``): the receive layout (expert-major, then
source, then the source's sorted order: the NCCL path's regroup order), the receive counts,
the way back to each source's sorted rows, and the bound's all-or-nothing skip; the copy-out
kernel (issue 22b) against its reference, writing the received rows and nothing past them
(areas poisoned with NaN). The op and
its autograd on gloo ranks with the peers' areas emulated by all-gathers, against the NCCL
path's ``dispatch_combine`` (output and gradients bit-equal: the same copies, the same
expert rows). On 2 GPUs (``pytest -m gpu``): the symmetric-memory op against the NCCL path,
output and every gradient, and the model's EP2 parity with the kernels spied. The emulation
fills every row nothing writes with NaN, so each gloo case also checks that no NaN past the
received count reaches an output or a gradient; ``_bound_rows_experts`` touches those rows
as the grouped GEMM path does, and the GPU cases poison them too (``_POISON_UNWRITTEN``)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from triton_kernels.moe_dispatch_symm import (copy_out_ref, launch_copy_out, simulate, simulate_tables,
                                              tables_ref)

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


def _received(ref: list[dict], d: int, rows: list[torch.Tensor]) -> torch.Tensor:
    order = ref[d]["recv_order"]
    return torch.stack([rows[s][i] for s, i in order]) if order else rows[0][:0]


@pytest.mark.parametrize("world,t,k,e,h,dead,slack", [
    (2, 13, 2, 8, 40, 0, 0),   # the rank receiving most: count == bound
    (2, 11, 2, 8, 24, 4, 3),   # rank 0's experts get nothing: count 0
    (3, 9, 2, 6, 20, 2, 5), (4, 7, 3, 8, 17, 0, 1), (8, 5, 2, 16, 16, 0, 0)])
def test_simulated_round_trip_writes_only_the_received_rows(world, t, k, e, h, dead, slack) -> None:
    """Areas and outputs start as NaN: the dispatch output holds exactly the received rows in
    [0, count) and NaN past them (nothing written there), and the way back has no NaN."""
    rows, counts = _rank_rows(world, t, k, e, h, seed=world + 31 * slack, dead=dead)
    ref = tables_ref([c.cpu() for c in counts], world)
    need = max(len(r["recv_order"]) for r in ref)
    got = simulate(rows, counts, need + slack, fill=float("nan"))
    seen = set()
    for d, (recv, _, info, back) in enumerate(got):
        n = len(ref[d]["recv_order"])
        seen.add("zero" if n == 0 else "full" if n == need + slack else "partial")
        assert int(info[0]) == n
        assert torch.equal(recv[:n], _received(ref, d, rows))  # exact, no NaN
        assert recv[n:].isnan().all()  # nothing written past the count
        assert torch.equal(back, rows[d])  # identity experts: every row comes back, no NaN
    if dead:
        assert "zero" in seen
    if slack == 0:
        assert "full" in seen


@pytest.mark.parametrize("world,t,k,e,h,dead,slack", [
    (2, 13, 2, 8, 40, 0, 0), (2, 11, 2, 8, 24, 4, 2), (4, 7, 3, 8, 17, 0, 3), (8, 5, 2, 16, 9, 0, 1)])
def test_copy_out_kernel_against_reference(world, t, k, e, h, dead, slack) -> None:
    """The copy-out alone: from an area of random rows (NaN past the received count) into an
    output filled with a sentinel: the peers' rows of [0, count) are copied exactly, the own
    rows (the push's) and every row past the count keep the sentinel. Both directions, every
    rank, against ``copy_out_ref`` and against a mask built from ``tables_ref``."""
    rows, counts = _rank_rows(world, t, k, e, h, seed=5 + world, dead=dead)
    ref = tables_ref([c.cpu() for c in counts], world)
    bound = max(len(r["recv_order"]) for r in ref) + slack
    tabs = simulate_tables(counts)
    g = torch.Generator().manual_seed(world)
    el = e // world
    for d in range(world):
        n = len(ref[d]["recv_order"])
        area = torch.randn(bound, h, generator=g).to(DEVICE)
        area[n:] = float("nan")
        out = launch_copy_out(area.reshape(-1), torch.full((bound, h), -7.0, device=DEVICE), tabs[d], d, world,
                              bound, to_expert=True, max_programs=2)
        peer = torch.tensor([s != d for s, _ in ref[d]["recv_order"]] + [False] * (bound - n), dtype=torch.bool)
        want = torch.full((bound, h), -7.0)
        want[peer] = area.cpu()[peer]
        assert torch.equal(out.cpu(), want)
        assert torch.equal(copy_out_ref(area.reshape(-1), torch.full((bound, h), -7.0, device=DEVICE), tabs[d], d,
                                        world, bound, to_expert=True).cpu(), want)
        n_src = rows[d].shape[0]  # the way back: rows of my own experts are the push's
        back_area = torch.randn(n_src, h, generator=g).to(DEVICE)
        out = launch_copy_out(back_area.reshape(-1), torch.full((n_src, h), -7.0, device=DEVICE), tabs[d], d, world,
                              bound, to_expert=False, max_programs=2)
        owner = torch.repeat_interleave(torch.arange(e) // el, counts[d].cpu())  # (N,) rank of each row's expert
        want = torch.where((owner != d)[:, None], back_area.cpu(), torch.tensor(-7.0))
        assert torch.equal(out.cpu(), want)
        assert torch.equal(copy_out_ref(back_area.reshape(-1), torch.full((n_src, h), -7.0, device=DEVICE), tabs[d],
                                        d, world, bound, to_expert=False).cpu(), want)
    over = launch_copy_out(area.reshape(-1), torch.zeros(bound, h, device=DEVICE), tabs[0], 0, world,
                           bound - slack - 1, to_expert=True, max_programs=2)  # a rank exceeds the bound
    assert not over.any()  # nothing copied (the push stored nothing either)


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


def _bound_rows_experts(w: torch.Tensor):
    """Over all the rows it is given, as the grouped GEMM path is (CPU): SiLU on every row
    (its element-wise ops do), then per local expert x @ w[e] on its rows; rows past the
    received ones pass through. Checks they are the emulation's NaN (so the test can fail)."""
    def run(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        a = torch.nn.functional.silu(x)  # (rows, H), every row
        n = int(counts.sum())
        if n < x.shape[0]:
            assert x[n:].isnan().all(), "rows past the received count should be unwritten (NaN)"
        outs, start = [], 0
        for e, c in enumerate(counts.tolist()):
            outs.append(a[start:start + c] @ w[e])
            start += c
        return torch.cat(outs + [a[n:]])
    return run


def _grouped_experts(w: torch.Tensor):
    """bf16 grouped GEMM (rows past the last offset left alone), as the model's experts."""
    return lambda x, counts: torch._grouped_mm(x, w, offs=torch.cumsum(counts, 0).to(torch.int32))


def _op_against_nccl(t: int, k: int, e: int, h: int, dtype: torch.dtype, grouped: bool | str, calls: int = 1,
                     recv_bound: float | None = None) -> int:
    """symm_dispatch_combine (emulated on gloo / symmetric memory on GPUs) against
    dispatch_combine (all-to-all): output, rows' gradient and the experts' weight gradient,
    bit-equal (the same copies; each expert sees the same rows in the same order).
    ``grouped``: True the grouped GEMM, "bound_rows" ``_bound_rows_experts``, False the loop.
    Rows nothing writes are NaN (the emulation's; ``_POISON_UNWRITTEN`` on GPUs): none may
    reach the output or a gradient."""
    from dtensor_parallel.expert_parallel import symm_dispatch

    symm_dispatch._POISON_UNWRITTEN = True  # (reset below: the harness's workers run other cases next)
    try:
        return _op_against_nccl_poisoned(t, k, e, h, dtype, grouped, calls, recv_bound)
    finally:
        symm_dispatch._POISON_UNWRITTEN = False


def _op_against_nccl_poisoned(t: int, k: int, e: int, h: int, dtype: torch.dtype, grouped: bool | str, calls: int,
                              recv_bound: float | None) -> int:
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
            experts = {True: _grouped_experts, "bound_rows": _bound_rows_experts, False: _looped_experts}[grouped](wr)
            if path == "symm":
                out = symm_dispatch_combine(xr, counts, experts, groups.ep_group, exchange, recv_bound)
            else:
                out = dispatch_combine(xr, counts, experts, groups)
            out.backward(gout)
            outs.append(out.detach())
            grads.append((xr.grad, wr.grad))
        pairs = [("output", outs[0], outs[1]), ("rows' gradient", grads[0][0], grads[1][0]),
                 ("experts' weight gradient", grads[0][1], grads[1][1])]
        for name, a, b in pairs:
            assert not a.isnan().any(), f"NaN in the {name}: a row past the received count was read"
            if grouped == "bound_rows":  # SiLU over a longer tensor: vectorized differently, an ulp at most
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
            elif grouped is True and not torch.equal(a, b):  # the GEMM ran on more rows (the bound): cuBLAS/CUTLASS
                torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-2, msg=name)  # may tile differently
                unequal.append(name)
            else:
                assert torch.equal(a, b), f"{name} differs: {(a - b).abs().max()}"
    return calls if not unequal else -calls  # negative: within bf16 rounding, not bit-equal


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the kernels under the interpreter")
@pytest.mark.parametrize("world,k,e", [(2, 2, 8), (4, 3, 8)])
def test_gloo_op_matches_the_all_to_all_path(world, k, e) -> None:
    assert run_distributed(world, _op_against_nccl, 9, k, e, 24, torch.float32, False, 2) == [2] * world


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the kernels under the interpreter")
@pytest.mark.parametrize("world,k,e,bound", [(2, 2, 8, None), (2, 2, 4, 1.75), (4, 2, 8, 2.5)])
def test_gloo_experts_over_every_row_see_nan_past_the_count(world, k, e, bound) -> None:
    """Experts that touch every row of the (bound, H) dispatch output, as the grouped GEMM
    path does: the rows past the received count are NaN (unwritten) and none of it reaches the
    output or a gradient, which equal the all-to-all path's."""
    got = run_distributed(world, _op_against_nccl, 9, k, e, 24, torch.float32, "bound_rows", 2, bound)
    assert got == [2] * world


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
    with pytest.raises(ValueError, match=r"received 16 expert rows but the receive bound is 12.*"
                                         r"ParallelPlan\(moe_recv_bound=\.\.\.\)"):
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

    calls, bounds = [], []
    real = symm_dispatch.symm_dispatch_combine
    symm_dispatch.symm_dispatch_combine = lambda *a, **kw: calls.append(a[4]) or bounds.append(a[5]) or real(*a, **kw)
    symm_dispatch._POISON_UNWRITTEN = True  # (the GPU's outputs too: rows nothing writes are NaN)
    try:
        loss = one_step_parity("moe", mesh_kwargs, plan_kwargs, batch=4, seq=16)
    finally:
        symm_dispatch.symm_dispatch_combine = real
        symm_dispatch._POISON_UNWRITTEN = False
    assert set(calls) == {backend_kind}, calls
    assert set(bounds) == {plan_kwargs.get("moe_recv_bound")}, bounds  # the plan's field reached the op
    return loss, len(calls)


EP2_TRITON = ({"dp_shard": 2}, {"expert_parallel": 2, "kernels": {"moe_dispatch": "triton"}})


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the kernels under the interpreter")
def test_gloo_model_parity_through_the_emulated_exchange() -> None:
    from .parity import TINY_MOE

    results = run_distributed(2, _model_parity_spied, *EP2_TRITON, "emulated")
    n_moe = TINY_MOE.n_layers - TINY_MOE.n_dense_layers
    assert len({loss for loss, _ in results}) == 1 and all(n == n_moe for _, n in results), results


EP2_TRITON_BOUND = ({"dp_shard": 2}, {**EP2_TRITON[1], "moe_recv_bound": 1.5})


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the kernels under the interpreter")
def test_gloo_model_parity_with_the_plan_receive_bound() -> None:
    """ParallelPlan(moe_recv_bound=1.5) reaches the exchange (spied) and the EP2 model still
    matches the single-device one: loss and every gradient."""
    from .parity import TINY_MOE

    results = run_distributed(2, _model_parity_spied, *EP2_TRITON_BOUND, "emulated")
    n_moe = TINY_MOE.n_layers - TINY_MOE.n_dense_layers
    assert len({loss for loss, _ in results}) == 1 and all(n == n_moe for _, n in results), results


def _model_bound_too_tight() -> str:
    """A plan bound no routing fits: every rank raises the same error, naming the field."""
    import copy

    from dtensor_parallel import build_mesh, parallelize

    from .parity import make_batch, make_model, plan_for

    ref = make_model("moe")
    pm = parallelize(copy.deepcopy(ref), build_mesh(dp_shard=2), plan_for("moe", **{**EP2_TRITON[1],
                                                                                    "moe_recv_bound": 0.25}))
    x, y = make_batch(ref.args.vocab_size, 4, 16)
    with pytest.raises(ValueError, match=r"receive bound is \d+.*ParallelPlan\(moe_recv_bound=\.\.\.\)"):
        pm.forward_backward(pm.shard_batch(x), pm.shard_batch(y))
    return "ok"


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the kernels under the interpreter")
def test_gloo_plan_bound_too_tight_names_the_plan_field() -> None:
    assert run_distributed(2, _model_bound_too_tight) == ["ok", "ok"]


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

    def test_symm_op_matches_nccl_with_a_tight_bound(self) -> None:
        got = run_distributed(2, _op_against_nccl, 512, 2, 8, 256, torch.bfloat16, True, 3, 1.25, backend="nccl")
        print("bit-equal" if got == [3, 3] else "within bf16 rounding", got)
        assert [abs(v) for v in got] == [3, 3]

    def test_model_ep2_parity_with_the_plan_receive_bound(self) -> None:
        from .parity import TINY_MOE

        results = run_distributed(2, _model_parity_spied, *EP2_TRITON_BOUND, "symm", backend="nccl")
        n_moe = TINY_MOE.n_layers - TINY_MOE.n_dense_layers
        assert results[0][0] == results[1][0] and all(n == n_moe for _, n in results), results

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
