"""Fused row-parallel matmul + SP reduce-scatter: chunk order and slot layout with the peers
simulated by a stacked tensor (the reduce in the kernel's code, interpreter on CPU), the op
against DTensor's linear + reduce-scatter on gloo ranks (forward and backward), model parity
through the wiring (TP2+SP, FSDP2 x TP2; a spy proves the fused path ran), and on GPUs
(``pytest -m gpu``) the symmetric-memory path against the same chunk GEMMs + NCCL."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dtensor_parallel.tensor_parallel import matmul_reduce_scatter as mrs
from dtensor_parallel.tensor_parallel import sp_reduce_scatter as sprs

from .harness import run_distributed
from .kernel_checks import ATOL, check_against_torch
from .parity import TINY_LLAMA, case_device, one_step_parity
from .toy_gpt import ToyGPT

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (DESIGN.md)
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SP_TRITON = {"sequence_parallel": True, "kernels": {"sp_reduce_scatter": "triton"}}
CASES = [(2, (3, 10, 7), 1), (3, (2, 9, 5), 1), (4, (12, 9), 0), (2, (2, 4, 3, 5), 1)]


def _inputs(world: int, shape: tuple, n: int, dtype: torch.dtype, device: str = "cpu"):
    g = torch.Generator().manual_seed(world + n)
    xs = torch.randn((world, *shape), generator=g).to(device=device, dtype=dtype)  # (W, *x)
    ws = (torch.randn((world, n, shape[-1]), generator=g) * shape[-1] ** -0.5).to(device=device, dtype=dtype)
    return xs, ws  # ws: (W, N, K), nn.Linear layout


# ----------------------------------------------------------------------------------------
# One process: peers simulated by a stacked tensor
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world,shape,dim", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_simulated_is_the_rank_order_fp32_sum_of_the_chunk_gemms(world, shape, dim, dtype) -> None:
    """Bit for bit the fp32 rank-order sum of the same chunk GEMMs; and within the kernel
    tolerance rule of the float64 result (PyTorch's own: the full GEMM, summed in dtype)."""
    device = "cpu" if INTERPRET else "cuda"
    xs, ws = _inputs(world, shape, 6, dtype, device)
    got, _ = mrs.matmul_reduce_scatter_simulated(xs, ws, dim)
    want = mrs.matmul_reduce_scatter_ref(xs, ws, dim)
    assert got.shape == want.shape == (world, *shape[:dim], shape[dim] // world, *shape[dim + 1:-1], 6)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    exact = torch.stack(sum(xs[p].double() @ ws[p].double().t() for p in range(world)).chunk(world, dim))
    same = torch.stack(sum(xs[p] @ ws[p].t() for p in range(world)).chunk(world, dim))
    check_against_torch(f"fused W{world} {shape} {dtype}", got, same, exact, ATOL[dtype])


@pytest.mark.parametrize("world,shape,dim", CASES)
def test_chunk_order_and_slot_layout(world: int, shape: tuple, dim: int) -> None:
    """Rank r computes chunks r+1, ..., r (mod W): the peers' first, each pushed right after
    its GEMM, its own last (still unwritten at each of its pushes); slot p of rank c's buffer
    ends up holding rank p's partial of chunk c."""
    assert mrs.chunk_order(1, 4) == [2, 3, 0, 1] and mrs.chunk_order(0, 2) == [1, 0]
    n = 4
    xs, ws = _inputs(world, shape, n, torch.float32)
    rows = shape[dim] // world * math.prod(shape[dim + 1:-1])
    slots = torch.full((world, world, math.prod(shape[:dim]), rows, n), float("nan"))  # [owner, slot]
    pushes = []

    def after(i: int, c: int, dst: torch.Tensor) -> None:
        producer = (c - i - 1) % world
        pushes.append((producer, i, c))
        assert slots[producer, producer].isnan().all(), "own chunk computed before a peer's"
        assert torch.equal(slots[c, producer], dst), "chunk not in the owner's slot `producer`"

    mrs.matmul_reduce_scatter_simulated(xs, ws, dim, after=after, slots=slots)
    assert pushes == [(r, i, (r + i + 1) % world) for r in range(world) for i in range(world - 1)]
    for p in range(world):
        for c, chunk in enumerate((xs[p] @ ws[p].t()).chunk(world, dim)):
            torch.testing.assert_close(slots[c, p], chunk.reshape(slots[c, p].shape), rtol=1e-6, atol=1e-6)


def test_op_rejects_what_it_cannot_serve() -> None:
    group = type("G", (), {"size": lambda self: 2})()
    x, w = torch.randn(2, 4, 6), torch.randn(5, 6)
    assert "before the last" in mrs.fused_cannot_serve(x, w, 2, group)
    assert "weight" in mrs.fused_cannot_serve(x, torch.randn(5, 7), 1, group)
    assert "weight" in mrs.fused_cannot_serve(x, w.half(), 1, group)
    assert "divide" in mrs.fused_cannot_serve(torch.randn(2, 3, 6), w, 1, group)
    assert "dtype" in mrs.fused_cannot_serve(x.double(), w.double(), 1, group)
    with pytest.raises(ValueError, match="before the last"):
        mrs.matmul_reduce_scatter(x, w, -1, group)
    # the NCCL form: any float dtype (fp64 passes to the last rule), the same shape rules, and
    # no fake process group (simulated ranks compute DTensor's collectives, not an op's)
    from dtensor_parallel.tensor_parallel.rowwise_nccl import nccl_cannot_serve

    from .local_ranks import fake_world
    fake_world(2)
    assert "fake process group" in nccl_cannot_serve(x.double(), w.double(), 1, dist.group.WORLD)
    assert "before the last" in nccl_cannot_serve(x, w, 2, group)
    assert "weight" in nccl_cannot_serve(x, w.half(), 1, group)
    assert "divide" in nccl_cannot_serve(torch.randn(2, 3, 6), w, 1, group)
    assert "dtype" in nccl_cannot_serve(x.long(), w.long(), 1, group)
    with pytest.raises(ValueError, match="divide"):
        mrs.matmul_reduce_scatter(torch.randn(2, 3, 6), w, 1, group, push=mrs.NCCL)
    with pytest.raises(ValueError, match="push='nvls'"):
        mrs.matmul_reduce_scatter(x, w, 1, group, push="nvls")


# ----------------------------------------------------------------------------------------
# gloo ranks (interpreter): the op against DTensor, and model parity through the wiring
# ----------------------------------------------------------------------------------------


def _op_against_dtensor(shape: tuple, dim: int, bias: bool, push: str = "copy") -> None:
    """matmul_reduce_scatter (+ bias on the DTensor, as the wiring adds it) against DTensor's
    F.linear (Partial) -> Shard(dim); forward and the input, weight (and bias) gradients."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(3)
    x_full = torch.randn(*shape[:-1], shape[-1] * world, generator=g)
    w_full, b_full = torch.randn(5, shape[-1] * world, generator=g), torch.randn(5, generator=g)
    out_shape = (*shape[:dim], shape[dim] // world, *shape[dim + 1:-1], 5)
    g_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(rank))

    def run(fused: bool):
        x = DTensor.from_local(x_full.chunk(world, -1)[rank].clone(), mesh, [Shard(x_full.dim() - 1)]).requires_grad_()
        w = DTensor.from_local(w_full.chunk(world, 1)[rank].clone(), mesh, [Shard(1)]).requires_grad_()
        b = DTensor.from_local(b_full.clone(), mesh, [Replicate()]).requires_grad_() if bias else None
        if fused:
            out = mrs.matmul_reduce_scatter(x.to_local(grad_placements=[Shard(x.dim() - 1)]),
                                            w.to_local(grad_placements=[Shard(1)]), dim, mesh.get_group(), push=push)
            out = DTensor.from_local(out, mesh, [Shard(dim)], run_check=False)
            out = out + b if bias else out
        else:
            out = F.linear(x, w, b).redistribute(placements=[Shard(dim)])
        out.to_local().backward(g_out)
        grads = [x.grad.full_tensor(), w.grad.full_tensor()] + ([b.grad.full_tensor()] if bias else [])
        return out.to_local().detach(), grads

    (got, got_grads), (want, want_grads) = run(True), run(False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    for a, b_ in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the reduce in the interpreter")
@pytest.mark.parametrize("world,shape,dim,bias", [(2, (3, 8, 6), 1, True), (4, (2, 8, 3, 6), 1, False),
                                                  (2, (12, 6), 0, False)])
def test_gloo_op_matches_dtensor_linear_and_reduce_scatter(world, shape, dim, bias) -> None:
    run_distributed(world, _op_against_dtensor, shape, dim, bias)


@pytest.mark.parametrize("world,shape,dim,bias", [(2, (3, 8, 6), 1, True), (4, (2, 8, 3, 6), 1, False),
                                                  (2, (1, 8, 6), 1, False), (2, (12, 6), 0, False)])
def test_gloo_nccl_op_matches_dtensor_linear_and_reduce_scatter(world, shape, dim, bias) -> None:
    """The op's NCCL form (``rowwise_nccl.py``; gloo here): one GEMM (outer 1) or a GEMM per
    chunk (outer > 1), then the functional reduce-scatter."""
    run_distributed(world, _op_against_dtensor, shape, dim, bias, mrs.NCCL)


def fused_parity_counting(kind: str, mesh_kwargs: dict, plan_kwargs: dict, fuse: bool = True,
                          **kwargs) -> tuple[float, int, int]:
    """one_step_parity, counting the fused forwards and the unfused Triton reduce-scatters
    (spies); ``fuse=False``: the row-parallel Linears keep the unfused kernel."""
    calls = {"fused": 0, "unfused": 0}
    orig_fused, orig_rs = mrs._forward, sprs._reduce_scatter

    def fused(*a, **k):
        calls["fused"] += 1
        return orig_fused(*a, **k)

    def unfused(*a, **k):
        calls["unfused"] += 1
        return orig_rs(*a, **k)

    mrs._forward, sprs._reduce_scatter = fused, unfused
    try:
        loss = one_step_parity(kind, mesh_kwargs, {**plan_kwargs, "fused_rowwise": fuse}, **kwargs)
    finally:
        mrs._forward, sprs._reduce_scatter = orig_fused, orig_rs
    return loss, calls["fused"], calls["unfused"]


def rowwise_layers(kind: str) -> int:
    """Row-parallel Linears per forward: 2 per block (the vocab-parallel embedding's masked
    partial sum keeps DTensor's reduce-scatter)."""
    return 2 * (TINY_LLAMA.n_layers if kind == "llama" else len(ToyGPT().h))


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the reduce in the interpreter")
@pytest.mark.parametrize("world,mesh_kwargs,kind", [(2, {"tp": 2}, "llama"), (2, {"tp": 2}, "toy"),
                                                    (4, {"tp": 2, "dp_shard": 2}, "toy")])
def test_gloo_parity_through_the_fused_rowwise_linear(world: int, mesh_kwargs: dict, kind: str) -> None:
    """Loss and every gradient equal the single-device model's (toy: biased row-parallel
    layers; world 4: FSDP2 x TP2), and every row-parallel layer took the fused path."""
    results = run_distributed(world, fused_parity_counting, kind, mesh_kwargs, SP_TRITON, batch=8)
    assert len({loss for loss, _, _ in results}) == 1, results
    assert all((f, u) == (rowwise_layers(kind), 0) for _, f, u in results), results


@pytest.mark.parametrize("world,mesh_kwargs,kind", [(2, {"tp": 2}, "llama"), (2, {"tp": 2}, "toy"),
                                                    (4, {"tp": 2, "dp_shard": 2}, "toy")])
def test_gloo_selective_recompute_takes_the_nccl_op(world: int, mesh_kwargs: dict, kind: str) -> None:
    """The torch (NCCL) backend under SP and selective recompute: every row-parallel layer
    runs the one-op form once per step (forward only: the recompute takes its saved output;
    ``rowwise_nccl.py``), and loss and every gradient equal the single-device model's (toy:
    biased row-parallel layers; world 4: FSDP2 x TP2)."""
    plan = {"sequence_parallel": True, "recompute": "selective"}
    results = run_distributed(world, fused_parity_counting, kind, mesh_kwargs, plan, batch=8)
    assert all((f, u) == (rowwise_layers(kind), 0) for _, f, u in results), results


def _opcheck_nccl_op() -> dict:
    g = torch.Generator().manual_seed(dist.get_rank())
    x, w = (torch.randn(shape, generator=g).requires_grad_() for shape in ((2, 8, 6), (5, 6)))
    return torch.library.opcheck(torch.ops.dtensor_parallel.matmul_reduce_scatter.default,
                                 (x, w, 1, dist.group.WORLD.group_name, mrs.NCCL))


def test_gloo_nccl_op_passes_opcheck() -> None:
    results = run_distributed(2, _opcheck_nccl_op)
    assert all(v == "SUCCESS" for r in results for v in r.values()), results


def _opcheck_custom_ops() -> list[dict]:
    """torch.library.opcheck of both custom ops on this rank's device: schema, the fake
    implementation against the real output (shape, strides, storage offset), the autograd
    registration, and AOTAutograd tracing (the compiled path)."""
    dev = case_device()
    name = dist.group.WORLD.group_name
    g = torch.Generator().manual_seed(dist.get_rank())
    x, w, y = (torch.randn(shape, generator=g).to(dev).requires_grad_() for shape in ((2, 8, 6), (5, 6), (3, 8, 5)))
    ops = torch.ops.dtensor_parallel
    return [torch.library.opcheck(ops.matmul_reduce_scatter.default, (x, w, 1, name, "copy")),
            torch.library.opcheck(ops.sequence_reduce_scatter.default, (y, 1, name))]


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the reduce in the interpreter")
def test_gloo_custom_ops_pass_opcheck() -> None:
    results = run_distributed(2, _opcheck_custom_ops)
    assert all(v == "SUCCESS" for r in results for d in r for v in d.values()), results


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the reduce in the interpreter")
@pytest.mark.parametrize("recompute,fuse,runs", [("selective", True, 1), ("selective", False, 1), ("full", True, 2)])
def test_gloo_selective_recompute_saves_the_reduce_scatter(recompute: str, fuse: bool, runs: int) -> None:
    """Selective recompute saves the custom ops' outputs (recompute.py): each runs once per
    layer, in forward only, as without recompute; full recompute (the control) reruns them."""
    plan = {**SP_TRITON, "recompute": recompute}
    results = run_distributed(2, fused_parity_counting, "llama", {"tp": 2}, plan, fuse=fuse, batch=8)
    want = (runs * rowwise_layers("llama"), 0) if fuse else (0, runs * rowwise_layers("llama"))
    assert len({loss for loss, _, _ in results}) == 1, results
    assert all((f, u) == want for _, f, u in results), (results, want)


# ----------------------------------------------------------------------------------------
# GPUs: symmetric memory against the same chunk GEMMs + NCCL
# ----------------------------------------------------------------------------------------


def _gpu_against_nccl(cases: list, rounds: int) -> dict:
    """Each case and push mode: forward bit-equal (W = 2; else close) to the same chunk GEMMs
    reduced by NCCL, within the tolerance rule of float64 vs the full GEMM + NCCL; backward
    close to autograd through F.linear with the gathered gradient. Then ``rounds`` calls
    back to back, alternating with the unfused op on the shared workspace, no sync between."""
    rank, world = dist.get_rank(), dist.get_world_size()
    group, dev = dist.group.WORLD, torch.device("cuda", torch.cuda.current_device())
    for shape, n, dtype in cases:
        g = torch.Generator(device=dev).manual_seed(10 + rank)
        x = torch.randn(shape, device=dev, generator=g).to(dtype)
        w = (torch.randn((n, shape[-1]), device=dev, generator=g) * shape[-1] ** -0.5).to(dtype)
        x3 = x.view(-1, shape[-2], shape[-1]) if x.dim() == 3 else x.view(1, *x.shape)
        r_loc = x3.shape[1] // world
        chunks = torch.empty((world, x3.shape[0], r_loc, n), device=dev, dtype=dtype)  # chunk c of our partial
        for c in range(world):
            mrs._gemm(x3[:, c * r_loc:(c + 1) * r_loc], w.t(), chunks[c])
        same_gemms = torch.empty_like(chunks[0])
        dist.reduce_scatter_tensor(same_gemms, chunks, group=group)
        full = torch.empty_like(chunks[0])
        dist.reduce_scatter_tensor(full, torch.stack((x3 @ w.t()).chunk(world, 1)).contiguous(), group=group)
        parts = [torch.empty_like(x3, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(parts, x3.double())
        ws_ = [torch.empty_like(w, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(ws_, w.double())
        exact = sum(p @ q.t() for p, q in zip(parts, ws_)).chunk(world, 1)[rank]
        for push in mrs.PUSH_MODES:
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            out = mrs.matmul_reduce_scatter(xr, wr, 1 if x.dim() == 3 else 0, group, push=push)
            got = out.detach().reshape(same_gemms.shape)
            if world == 2:
                assert torch.equal(got, same_gemms), (push, shape, (got - same_gemms).abs().max())
            else:
                torch.testing.assert_close(got, same_gemms, rtol=2e-2, atol=2e-2)
            check_against_torch(f"rank{rank} {push} {shape} {dtype}", got, full, exact, ATOL[dtype])
            gout = torch.randn(out.shape, device=dev, generator=g).to(dtype)
            out.backward(gout)
            gathered = [torch.empty_like(gout) for _ in range(world)]
            dist.all_gather(gathered, gout.contiguous())
            xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
            F.linear(xx, ww).backward(torch.cat(gathered, 1 if x.dim() == 3 else 0))
            tol = {"rtol": 2e-2, "atol": 2e-2} if dtype != torch.float32 else {"rtol": 1e-4, "atol": 1e-4}
            torch.testing.assert_close(xr.grad, xx.grad, **tol)
            torch.testing.assert_close(wr.grad, ww.grad, **tol)
    shape, n, dtype = cases[0]
    xs = [torch.randn(shape, device=dev, dtype=dtype) for _ in range(rounds)]
    w = torch.randn((n, shape[-1]), device=dev, dtype=dtype) * shape[-1] ** -0.5
    outs = []
    with torch.no_grad():
        for i, x in enumerate(xs):  # fused, unfused, fused, ...: one call counter, two halves
            outs.append(mrs.matmul_reduce_scatter(x, w, 1, group, push=mrs.PUSH_MODES[i % 2]))
            outs.append(sprs.sequence_reduce_scatter(x @ w.t(), 1, group))
    for i, x in enumerate(xs):
        ref = torch.empty_like(outs[2 * i])
        dist.reduce_scatter_tensor(ref, torch.stack((x @ w.t()).chunk(world, 1)).contiguous(), group=group)
        torch.testing.assert_close(outs[2 * i], ref, rtol=2e-2, atol=2e-2)
        if world == 2:
            assert torch.equal(outs[2 * i + 1], ref)
    return {"calls": sprs._WORKSPACES[group.group_name].calls}


GPU_CASES = [((1, 512, 256), 384, torch.bfloat16), ((3, 76, 136), 200, torch.bfloat16),
             ((2, 256, 512), 256, torch.float32), ((4096, 1024), 2048, torch.bfloat16),
             ((1, 4096, 7168), 8192, torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
class TestGPU:
    """``pytest -m gpu tests/test_matmul_reduce_scatter.py`` on 2 (and 4) GPUs (nccl ranks)."""

    def test_fused_matches_chunk_gemms_then_nccl(self) -> None:
        stats = run_distributed(2, _gpu_against_nccl, GPU_CASES, 12, backend="nccl")
        assert stats[0] == stats[1], stats

    @pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 CUDA GPUs")
    def test_fused_tp4(self) -> None:
        stats = run_distributed(4, _gpu_against_nccl, GPU_CASES[:3], 6, backend="nccl")
        assert len(set(map(str, stats))) == 1, stats

    def test_custom_ops_pass_opcheck(self) -> None:
        results = run_distributed(2, _opcheck_custom_ops, backend="nccl")
        assert all(v == "SUCCESS" for r in results for d in r for v in d.values()), results

    @pytest.mark.parametrize("kind", ["llama", "toy"])
    def test_one_step_parity_tp2_sp_fused(self, kind: str) -> None:
        results = run_distributed(2, fused_parity_counting, kind, {"tp": 2}, SP_TRITON, batch=8, backend="nccl")
        assert results[0][0] == results[1][0], results
        assert all((f, u) == (rowwise_layers(kind), 0) for _, f, u in results), results

    @pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 CUDA GPUs")
    @pytest.mark.parametrize("kind", ["llama", "toy"])
    def test_one_step_parity_fsdp2_tp2_sp_fused(self, kind: str) -> None:
        mesh = {"tp": 2, "dp_shard": 2}
        results = run_distributed(4, fused_parity_counting, kind, mesh, SP_TRITON, batch=8, backend="nccl")
        assert len({loss for loss, _, _ in results}) == 1, results
        assert all((f, u) == (rowwise_layers(kind), 0) for _, f, u in results), results


def _bf16_autocast_counting() -> tuple[float, int]:
    """TP2+SP under bf16 autocast (mixed_precision without FSDP): the fused forward casts as
    F.linear does, and the loss stays within the bf16 check of test_meta_init."""
    from .test_meta_init import _bf16_case

    counted = []
    orig = mrs._forward

    def spy(x, weight, *a, **k):
        counted.append((x.dtype, weight.dtype))
        return orig(x, weight, *a, **k)

    mrs._forward = spy
    try:
        loss = _bf16_case({"tp": 2}, SP_TRITON)
    finally:
        mrs._forward = orig
    assert counted and all(d == (torch.bfloat16, torch.bfloat16) for d in counted), counted
    return loss, len(counted)


@pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the reduce in the interpreter")
def test_gloo_bf16_autocast_takes_the_fused_path() -> None:
    results = run_distributed(2, _bf16_autocast_counting)
    assert results[0] == results[1] and results[0][1] == rowwise_layers("llama"), results
