"""SP reduce-scatter: the Triton kernel (interpreter on CPU, peers simulated by a stacked
tensor), its signal-pad barrier logic, the backend switch, the wiring into the rowwise
layers (gloo: the kernel code runs with peers emulated by an all-gather; model parity), and
on 2 GPUs (``pytest -m gpu``) the symmetric-memory path against NCCL, forward and backward,
plus one-step model parity."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.distributed as dist

from dtensor_parallel import ParallelPlan, build_mesh
from dtensor_parallel.tensor_parallel import sp_reduce_scatter as sprs
from triton_kernels.sp_reduce_scatter import (launch_reduce_scatter, launch_reduce_slots,
                                              reduce_scatter_simulated, sp_reduce_scatter_ref)

from .harness import run_distributed
from .kernel_checks import ATOL, check_against_torch
from .local_ranks import simulated_ranks
from .parity import TINY_LLAMA
from .toy_gpt import ToyGPT

# symmetric memory without NVLink multicast (DESIGN.md); inherited by the spawned ranks
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SP_TRITON = {"sequence_parallel": True, "kernels": {"sp_reduce_scatter": "triton"}}


# ----------------------------------------------------------------------------------------
# Kernel math (interpreter on CPU; compiled on a GPU machine)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world,shape,dim", [(2, (3, 10, 7), 1), (3, (2, 9, 5), 1), (4, (12, 9), 0),
                                             (8, (1, 16, 33), 1), (2, (2, 3, 4, 5), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_equals_rank_order_fp32_sum(world: int, shape: tuple, dim: int, dtype: torch.dtype) -> None:
    """Odd shapes (tails in every tile), more tiles than programs: the result is the fp32 sum
    in rank order, rounded once, bit for bit; and no worse than PyTorch's own dtype sum."""
    device = "cpu" if INTERPRET else "cuda"
    g = torch.Generator().manual_seed(world)
    xs = torch.randn((world, *shape), generator=g).to(device=device, dtype=dtype)  # (W, *shape)
    got = reduce_scatter_simulated(xs, dim)
    want = sp_reduce_scatter_ref(xs, dim)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    exact = sp_reduce_scatter_ref(xs.double(), dim)
    check_against_torch(f"W{world} {shape} {dtype}", got, sp_reduce_scatter_ref(xs, dim, upcast=False), exact,
                        ATOL[dtype])


@pytest.mark.skipif(not INTERPRET, reason="pre-set signal pads stand in for peers only in the interpreter")
def test_barrier_signals_every_peer_and_consumes_its_own_pads() -> None:
    """Rank 2 of 4 runs the whole kernel (push, barrier, reduce) after the peers pushed; its
    pads hold the peers' signals. Each program sets slot0 + pid*W + 2 to 1 on every peer's
    pad (release CAS) and resets its own slots for the peers to 0 (acquire CAS)."""
    world, rank, slot0, progs, outer = 4, 2, 5, 3, 4
    xs = torch.randn(world, outer, 8 * world, 3)  # (W, b, s, h): a tile per row, 4 tiles > 3 programs
    x2 = [xs[p].reshape(outer, -1) for p in range(world)]  # (outer, W*M)
    bufs = torch.zeros(world, xs[0].numel())
    outs = torch.zeros(world, outer, x2[0].shape[1] // world)
    for p in range(world):
        if p != rank:
            launch_reduce_scatter(x2[p], outs[p], list(bufs), None, p, max_programs=progs, barrier=False, reduce=False)
    pads = torch.zeros(world, 64, dtype=torch.int32)
    for pid in range(progs):
        for p in range(world):
            if p != rank:
                pads[rank, slot0 + pid * world + p] = 1  # as if peer p had signalled program pid
    launch_reduce_scatter(x2[rank], outs[rank], list(bufs), list(pads), rank, slot0=slot0, max_programs=progs)
    torch.testing.assert_close(outs[rank], sp_reduce_scatter_ref(xs, 1)[rank].reshape(outer, -1), rtol=0, atol=0)
    want = torch.zeros_like(pads)
    for pid in range(progs):
        for p in range(world):
            if p != rank:
                want[p, slot0 + pid * world + rank] = 1
    assert torch.equal(pads, want), pads


def test_launch_rejects_bad_layouts() -> None:
    x = torch.randn(2, 12)
    with pytest.raises(ValueError, match="outer, W\\*M"):
        launch_reduce_scatter(x, torch.empty(2, 5), [x, x], None, 0, barrier=False)
    with pytest.raises(ValueError, match="world size"):
        launch_reduce_scatter(x, torch.empty(2, 6), [x, x], None, 2, barrier=False)
    with pytest.raises(ValueError, match="signal pad"):
        launch_reduce_scatter(x, torch.empty(2, 6), [x, x], None, 0)
    with pytest.raises(ValueError, match="unit last stride"):
        launch_reduce_scatter(x.double(), torch.empty(2, 6, dtype=torch.float64), [x, x], None, 0, barrier=False)
    with pytest.raises(ValueError, match="unit last stride"):
        launch_reduce_scatter(x[:, ::2], torch.empty(2, 3), [x, x], None, 0, barrier=False)
    with pytest.raises(ValueError, match=">= 2 x 24 elements"):
        launch_reduce_slots(torch.empty(2, 12), [x, x], None, 0, barrier=False)


# ----------------------------------------------------------------------------------------
# The switch
# ----------------------------------------------------------------------------------------


def _resolve(kernels, sp: bool = True, tp: int = 2) -> str:
    with simulated_ranks(tp):
        return sprs.check_sp_reduce_scatter(ParallelPlan(sequence_parallel=sp, kernels=kernels), build_mesh(tp=tp))


def test_switch_torch_and_no_sp_never_use_the_kernel() -> None:
    assert _resolve("torch") == "torch"
    assert _resolve("triton", sp=False) == "torch"
    assert _resolve({"attention": "triton"}) == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-mesh behaviour")
def test_switch_auto_falls_back_with_one_log_line(caplog, monkeypatch) -> None:
    from dtensor_parallel.warn_once import forget

    forget()
    with caplog.at_level(logging.WARNING, logger=sprs.__name__):
        assert _resolve("auto") == "torch"
        assert _resolve({"sp_reduce_scatter": "auto"}) == "torch"
    lines = [r for r in caplog.records if r.name == sprs.__name__]
    assert len(lines) == 1 and "needs CUDA" in lines[0].getMessage()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-mesh behaviour")
def test_switch_triton_where_it_cannot_run_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="'triton' cannot run: the mesh is on 'cpu'.*'auto'"):
        _resolve("triton")


@pytest.mark.skipif(not INTERPRET, reason="the interpreter runs the kernel code on CPU")
def test_switch_triton_under_the_interpreter_runs_the_kernel() -> None:
    assert _resolve("triton") == "triton"


# ----------------------------------------------------------------------------------------
# gloo ranks: the op against DTensor's reduce-scatter, and model parity through the wiring
# ----------------------------------------------------------------------------------------


def _op_against_dtensor(shape: tuple, dim: int, dtype: torch.dtype) -> None:
    """Forward equals DTensor's Partial -> Shard(dim) (the rank-order fp32 sum); backward is
    the same all-gather, exactly."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = torch.distributed.device_mesh.init_device_mesh(device, (world,))
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_()
    out = sprs.sequence_reduce_scatter(x, dim, mesh.get_group())
    xr = x.detach().clone().requires_grad_()
    want = DTensor.from_local(xr, mesh, [Partial()]).redistribute(placements=[Shard(dim)]).to_local()
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7 + rank)).to(device=device, dtype=dtype)
    out.backward(gout)
    want.backward(gout)
    if world == 2:  # a + b == b + a: exactly the collective's result
        assert torch.equal(out, want)
    else:  # the collective may sum in another order
        torch.testing.assert_close(out, want)
    assert torch.equal(x.grad, xr.grad)


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_op_matches_dtensor_forward_and_backward(world: int) -> None:
    run_distributed(world, _op_against_dtensor, (3, 4 * world, 5), 1, torch.float32)


def _parity_counting(kind: str, mesh_kwargs: dict, plan_kwargs: dict, **kwargs) -> tuple[float, int]:
    """one_step_parity with the row-parallel Linears' matmul *not* fused (the unfused
    kernel's wiring; the fused one: tests/test_matmul_reduce_scatter.py), counting the
    reduce-scatters that took the Triton path (a spy)."""
    from .test_matmul_reduce_scatter import fused_parity_counting

    loss, fused, unfused = fused_parity_counting(kind, mesh_kwargs, plan_kwargs, fuse=False, **kwargs)
    assert fused == 0, fused
    return loss, unfused


def _expected_calls(kind: str) -> int:
    """One per row-parallel layer, 2 per block (the vocab-parallel embedding's masked
    partial sum keeps DTensor's reduce-scatter)."""
    n_layers = TINY_LLAMA.n_layers if kind == "llama" else len(ToyGPT().h)
    return 2 * n_layers


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the kernel code under the interpreter")
@pytest.mark.parametrize("world,mesh_kwargs,kind", [(2, {"tp": 2}, "llama"), (4, {"tp": 2, "dp_shard": 2}, "toy")])
def test_gloo_parity_with_the_triton_reduce_scatter(kind: str, world: int, mesh_kwargs: dict) -> None:
    results = run_distributed(world, _parity_counting, kind, mesh_kwargs, SP_TRITON, batch=8)
    assert len({loss for loss, _ in results}) == 1, results
    assert all(n == _expected_calls(kind) for _, n in results), results


# ----------------------------------------------------------------------------------------
# 2 GPUs: symmetric memory against NCCL
# ----------------------------------------------------------------------------------------


def _gpu_against_nccl(cases: list, rounds: int) -> dict:
    """Each case: the kernel's forward against NCCL reduce_scatter_tensor and a float64
    reference (tolerance rule of kernel_checks), backward exactly the all-gather; then
    ``rounds`` calls back to back without synchronizing (double buffering under load)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    group, dev = dist.group.WORLD, torch.device("cuda", torch.cuda.current_device())
    for shape, dim, dtype in cases:  # growing sizes: the workspace grows between them
        g = torch.Generator(device=dev).manual_seed(10 + rank)
        x = torch.randn(shape, device=dev, generator=g).to(dtype).requires_grad_()
        out = sprs.sequence_reduce_scatter(x, dim, group)
        stacked = torch.stack(x.detach().chunk(world, dim)).contiguous()  # (W, *chunk)
        nccl = torch.empty_like(stacked[0])
        dist.reduce_scatter_tensor(nccl, stacked, group=group)
        parts = [torch.empty_like(x, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(parts, x.detach().double())
        ref = sum(parts).chunk(world, dim)[rank]
        check_against_torch(f"rank{rank} {shape} {dtype}", out, nccl, ref, ATOL[dtype])
        gout = torch.randn(out.shape, device=dev, generator=g).to(dtype)
        out.backward(gout)
        gparts = [torch.empty_like(gout) for _ in range(world)]
        dist.all_gather(gparts, gout.contiguous())
        assert torch.equal(x.grad, torch.cat(gparts, dim)), "backward is not the all-gather"
    shape, dim, dtype = cases[0]
    xs = [torch.randn(shape, device=dev, dtype=dtype) for _ in range(rounds)]
    outs = [sprs.sequence_reduce_scatter(x, dim, group) for x in xs]  # no sync in between
    for x, out in zip(xs, outs):
        nccl = torch.empty_like(out)
        dist.reduce_scatter_tensor(nccl, torch.stack(x.chunk(world, dim)).contiguous(), group=group)
        if world == 2:  # two summands in fp32, rounded once: NCCL's result exactly
            assert torch.equal(out, nccl), (out - nccl).abs().max()
        else:
            torch.testing.assert_close(out, nccl, rtol=2e-2, atol=2e-2)
    ws = sprs._WORKSPACES[group.group_name]
    return {"calls": ws.calls, "half_bytes": ws.half_bytes, "programs": ws.max_programs}


def _gpu_auto_resolves_to_triton() -> str:
    return sprs.check_sp_reduce_scatter(ParallelPlan(sequence_parallel=True, kernels="auto"), build_mesh(tp=2))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
class TestGPU:
    """``pytest -m gpu tests/test_sp_reduce_scatter.py`` on a 2-GPU machine (nccl ranks)."""

    def test_symm_mem_matches_nccl_forward_and_backward(self) -> None:
        cases = [((2, 64, 256), 1, torch.bfloat16), ((3, 74, 129), 1, torch.bfloat16),
                 ((1, 1024, 1024), 1, torch.float32), ((4, 2048, 1024), 1, torch.bfloat16),
                 ((1, 4096, 8192), 1, torch.bfloat16), ((2, 16, 8), 0, torch.float16)]
        stats = run_distributed(2, _gpu_against_nccl, cases, 24, backend="nccl")
        assert stats[0] == stats[1], stats

    def test_auto_picks_triton_on_nvlink_gpus(self) -> None:
        assert run_distributed(2, _gpu_auto_resolves_to_triton, backend="nccl") == ["triton", "triton"]

    @pytest.mark.parametrize("kind", ["llama", "toy"])
    def test_one_step_parity_tp2_sp_triton(self, kind: str) -> None:
        # eager: compiled, the unfused hook takes NCCL on CUDA (the strict xfail in test_compile.py)
        plan = {**SP_TRITON, "compile": False}
        results = run_distributed(2, _parity_counting, kind, {"tp": 2}, plan, batch=8, backend="nccl")
        assert results[0][0] == results[1][0], results
        assert all(n == _expected_calls(kind) for _, n in results), results
