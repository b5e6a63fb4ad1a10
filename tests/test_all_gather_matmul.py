"""Fused all-gather + column-parallel matmul (``all_gather_matmul.py``) and its input gradient
(``matmul_add_reduce_scatter.py``): the chunk logic and the pushes with peers simulated by a
stacked tensor, the wait kernel's sequence-number comparison (interpreter), the backward's
matmul + addend + reduce-scatter (the reduce in the kernel's code, interpreter on CPU), the
checks that refuse a call, opcheck on gloo ranks, and on 2 GPUs (``pytest -m gpu``) the
symmetric-memory path against NCCL. The wiring (one gather shared by the layers, model
parity): ``tests/test_gather_once.py``."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from dtensor_parallel.tensor_parallel import all_gather_matmul as agm
from dtensor_parallel.tensor_parallel import matmul_add_reduce_scatter as mars
from dtensor_parallel.tensor_parallel import matmul_reduce_scatter as mrs
from dtensor_parallel.tensor_parallel import sp_reduce_scatter as sprs

from .harness import run_distributed
from .kernel_checks import ATOL, check_against_torch, rel_err
from .parity import case_device

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (DESIGN.md)
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CASES = [(2, (3, 5, 7), 1), (3, (2, 3, 5), 1), (4, (3, 9), 0), (2, (2, 2, 3, 5), 1)]  # (W, shard shape, dim)
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the reduce in the interpreter")


def _inputs(world: int, shape: tuple, n: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(world + n + seed)
    xs = torch.randn((world, *shape), generator=g).to(device=device, dtype=dtype)  # every rank's shard
    ws = (torch.randn((world, n, shape[-1]), generator=g) * shape[-1] ** -0.5).to(device=device, dtype=dtype)
    return xs, ws  # ws: (W, N, K), each rank's rows of an nn.Linear weight


# ----------------------------------------------------------------------------------------
# One process: peers simulated by a stacked tensor
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world,shape,dim", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_simulated_forward_is_the_gathered_matmul(world, shape, dim, dtype) -> None:
    """Every rank's gathered input is the concatenation of the shards, bit for bit, and its
    output is within the kernel tolerance rule of the float64 GEMM (PyTorch's own: one GEMM
    over the gathered input)."""
    xs, ws = _inputs(world, shape, 6, dtype)
    got, gathered, _ = agm.all_gather_matmul_simulated(xs, ws, dim)
    want, want_gathered = agm.all_gather_matmul_ref(xs, ws, dim)
    assert torch.equal(gathered, want_gathered)
    exact, _ = agm.all_gather_matmul_ref(xs.double(), ws.double(), dim)
    check_against_torch(f"forward W{world} {shape} {dtype}", got, want, exact, ATOL[dtype])


@pytest.mark.parametrize("world,rank", [(2, 0), (2, 1), (4, 1), (3, 2)])
def test_own_chunk_first_and_no_chunk_before_it_arrives(world: int, rank: int) -> None:
    """consume_chunks multiplies the own chunk first, from the shard itself (no wait), then
    chunks rank+1, rank+2, ... each after its wait and never before it."""
    b, r, k, n = 2, 3, 4, 5
    g = torch.Generator().manual_seed(world)
    x3, wt = torch.randn((b, r, k), generator=g), torch.randn((k, n), generator=g)
    full = torch.randn((b, world * r, k), generator=g)
    full[:, rank * r:(rank + 1) * r] = x3
    slots = torch.full((world, b, r, k), float("nan"))  # nothing arrived yet
    out3 = torch.full((b, world * r, n), float("nan"))
    waits = []

    def wait(i: int, c: int) -> None:
        assert not out3[:, rank * r:(rank + 1) * r].isnan().any(), "own chunk not first"
        assert out3[:, c * r:(c + 1) * r].isnan().all(), f"chunk {c} multiplied before it arrived"
        waits.append((i, c))
        slots[c] = full[:, c * r:(c + 1) * r]

    agm.consume_chunks(x3, wt, out3, rank, world, lambda c: slots[c], wait)
    assert waits == [(i, (rank + i) % world) for i in range(1, world)]
    assert agm.gather_order(1, 4) == [1, 2, 3, 0] and agm.push_order(1, 4) == [0, 3, 2]
    torch.testing.assert_close(out3, full @ wt, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("world,shape,dim", CASES)
def test_simulated_pushes_fill_every_peer_slot_once(world: int, shape: tuple, dim: int) -> None:
    """Rank p's shard lands in slot p of every peer's buffer (never its own), each receiver
    waits for exactly its peers' chunks in gather order, and each pushes first to the peer
    that multiplies its chunk soonest."""
    xs, ws = _inputs(world, shape, 4, torch.float32)
    waits = []
    _, _, slots = agm.all_gather_matmul_simulated(xs, ws, dim, wait=lambda r, i, c: waits.append((r, i, c)))
    for q in range(world):
        for p in range(world):
            if p == q:
                assert slots[q, p].isnan().all(), "a rank pushed to itself"
            else:
                torch.testing.assert_close(slots[q, p], mrs._as_3d(xs[p].contiguous(), dim)[0], rtol=0, atol=0)
    assert waits == [(r, i, (r + i) % world) for r in range(world) for i in range(1, world)]
    for p in range(world):  # peer q multiplies chunk p at step (p - q) mod W: 1, 2, ... in push order
        assert [(p - q) % world for q in agm.push_order(p, world)] == list(range(1, world))


@needs_interpreter
@pytest.mark.parametrize("seq,expected,arrived", [(5, 5, True), (6, 5, True), (0, 65535, True), (3, 65534, True),
                                                   (5 + 0x7FFF, 5, True), (4, 5, False), (65535, 0, False),
                                                   (5 + 0x8000, 5, False)])
def test_wait_kernel_serial_comparison(seq: int, expected: int, arrived: bool) -> None:
    """The wait kernel (interpreted) returns once the pad holds the expected sequence number
    or a later one (mod 2^16; a peer may be ahead), and spins on an earlier one until it comes."""
    import threading

    pad = torch.zeros(96, dtype=torch.int32)
    pad[70] = seq
    t = threading.Thread(target=agm.wait_for, args=(pad, 70, expected), daemon=True)
    t.start()
    t.join(0.5 if not arrived else 30)
    assert t.is_alive() != arrived, f"seq {seq}, expected {expected}: {'spun' if arrived else 'returned'}"
    if not arrived:
        pad[70] = expected
        t.join(30)
        assert not t.is_alive(), "did not return once the expected sequence number arrived"


@needs_interpreter
@pytest.mark.parametrize("world,shape,dim", CASES)
@pytest.mark.parametrize("dtype,addend", [(torch.float32, True), (torch.float32, False), (torch.float16, True)])
def test_simulated_input_grad_is_the_reduce_scattered_matmul_plus_addend(world, shape, dim, dtype, addend) -> None:
    """dx_r = chunk r of sum_p (dout_p @ w_p + add_p): within the tolerance rule of float64,
    PyTorch's own being the same sum in the dtype (fp32 rank order)."""
    xs, ws = _inputs(world, shape, 6, dtype)
    gathered_shape = list(shape)
    gathered_shape[dim] *= world
    g = torch.Generator().manual_seed(5)
    grads = torch.randn((world, *gathered_shape[:-1], 6), generator=g).to(dtype)
    adds = torch.randn((world, *gathered_shape), generator=g).to(dtype) if addend else None
    got = mars.input_grad_simulated(grads, ws, adds, dim)
    same = mars.input_grad_ref(grads, ws, adds, dim)
    exact = mars.input_grad_ref(grads.double(), ws.double(), None if adds is None else adds.double(), dim)
    assert got.shape == (world, *shape)
    check_against_torch(f"input grad W{world} {shape} {dtype}", got, same, exact, ATOL[dtype])


def test_op_rejects_what_it_cannot_serve() -> None:
    from .local_ranks import fake_world

    group = type("G", (), {"size": lambda self: 2})()
    x, w = torch.randn(2, 4, 6), torch.randn(5, 6)
    assert "before the last" in agm.cannot_serve(x, w, 2, group)
    assert "weight" in agm.cannot_serve(x, torch.randn(5, 7), 1, group)
    assert "weight" in agm.cannot_serve(x, w.half(), 1, group)
    assert "dtype" in agm.cannot_serve(x.double(), w.double(), 1, group)
    assert "group of 9" in agm.cannot_serve(x, w, 1, type("G", (), {"size": lambda self: 9})())
    with pytest.raises(ValueError, match="before the last"):
        agm.all_gather_matmul(x, w, -1, group)
    fake_world(2)
    try:
        assert "fake process group" in agm.cannot_serve(x, w, 1, dist.group.WORLD)
    finally:  # later tests of this process start from no group (checkpoint tests make their own)
        dist.destroy_process_group()


def _opcheck_ops() -> list[dict]:
    """torch.library.opcheck of both ops: schema, fake against real (shapes, strides), the
    autograd registration, and AOTAutograd tracing."""
    dev = case_device()
    name = dist.group.WORLD.group_name
    g = torch.Generator().manual_seed(dist.get_rank())
    x, w = (torch.randn(s, generator=g).to(dev).requires_grad_() for s in ((2, 4, 6), (5, 6)))
    grad, add = (torch.randn(s, generator=g).to(dev) for s in ((2, 8, 5), (2, 8, 6)))
    ops = torch.ops.dtensor_parallel
    return [torch.library.opcheck(ops.all_gather_matmul.default, (x, w, 1, name)),
            torch.library.opcheck(ops.all_gather_matmul_input_grad.default, (grad, w.detach(), add, 1, name)),
            torch.library.opcheck(ops.all_gather_matmul_input_grad.default, (grad, w.detach(), None, 1, name))]


@needs_interpreter
def test_gloo_ops_pass_opcheck() -> None:
    results = run_distributed(2, _opcheck_ops)
    assert all(v == "SUCCESS" for r in results for d in r for v in d.values()), results


# ----------------------------------------------------------------------------------------
# GPUs: symmetric memory against NCCL
# ----------------------------------------------------------------------------------------


def _gpu_against_nccl(cases: list, rounds: int) -> int:
    """Each case: gathered bit-equal to NCCL's all-gather; the output within the tolerance rule
    of float64 (PyTorch's own: one GEMM over NCCL's gathered input); a follower reading the
    gathered input; input, weight and follower gradients against float64 (PyTorch's own: the
    partials reduce-scattered by NCCL). Then ``rounds`` calls back to back, no sync,
    interleaved with the row-parallel op and the SP reduce-scatter (the backward op shares
    their workspace), each checked against NCCL."""
    rank, world = dist.get_rank(), dist.get_world_size()
    group, dev = dist.group.WORLD, torch.device("cuda", torch.cuda.current_device())
    torch.backends.cuda.matmul.allow_tf32 = False

    def nccl_gather(t: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim)

    def nccl_rs(t: torch.Tensor, dim: int) -> torch.Tensor:
        chunks = [c.contiguous() for c in t.chunk(world, dim)]
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, chunks)
        return out

    for shape, n, dtype in cases:
        dim = 1 if len(shape) == 3 else 0
        g = torch.Generator(device=dev).manual_seed(10 + rank)
        x = torch.randn(shape, device=dev, generator=g).to(dtype)
        w, w2 = ((torch.randn((m, shape[-1]), device=dev, generator=g) * shape[-1] ** -0.5).to(dtype) for m in (n, 64))
        full = nccl_gather(x, dim)
        xr, wr, w2r = (t.clone().requires_grad_() for t in (x, w, w2))
        out, gathered = agm.all_gather_matmul(xr, wr, dim, group)
        assert torch.equal(gathered, full), (shape, "gathered input differs from NCCL's all-gather")
        check_against_torch(f"rank{rank} fwd {shape} {dtype}", out, full @ w.t(), full.double() @ w.double().t(),
                            ATOL[dtype])
        go, go2 = torch.randn(out.shape, device=dev, generator=g).to(dtype), torch.randn(
            (*full.shape[:-1], 64), device=dev, generator=g).to(dtype)
        ((out * go).sum() + ((gathered @ w2r.t()) * go2).sum()).backward()
        part = go @ w + go2 @ w2  # (.., S, K): this rank's partial of the gathered input's gradient
        part64 = go.double() @ w.double() + go2.double() @ w2.double()
        check_against_torch(f"rank{rank} dx {shape} {dtype}", xr.grad, nccl_rs(part, dim), nccl_rs(part64, dim),
                            ATOL[dtype])
        for got, gout, wname in ((wr.grad, go, "dw"), (w2r.grad, go2, "dw2")):
            flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
            check_against_torch(f"rank{rank} {wname} {shape} {dtype}", got, flat(gout).t() @ flat(full),
                                flat(gout).double().t() @ flat(full).double(), ATOL[dtype])
    shape, n, dtype = cases[0]
    xs = [torch.randn(shape, device=dev, dtype=dtype) for _ in range(rounds)]
    w = torch.randn((n, shape[-1]), device=dev, dtype=dtype) * shape[-1] ** -0.5
    outs = []
    with torch.no_grad():
        for x in xs:  # no sync between: both workspaces' double buffering
            out, _ = agm.all_gather_matmul(x, w, 1, group)
            outs.append((out, mrs.matmul_reduce_scatter(out, w.t().contiguous(), 1, group),
                         mars.input_grad_op(out, w, None, 1, group.group_name),
                         sprs.sequence_reduce_scatter(x, 1, group)))
    for x, (out, rs, ig, srs) in zip(xs, outs):
        full = nccl_gather(x, 1)
        assert rel_err(out, full @ w.t()) < 1e-2
        want = nccl_rs(full @ w.t() @ w, 1)
        assert rel_err(rs, want) < 2e-2 and rel_err(ig, want) < 2e-2
        assert rel_err(srs, nccl_rs(x, 1)) < 1e-2
    return agm._GATHER_STATES[group.group_name].ws.calls


GPU_CASES = [((1, 256, 256), 384, torch.bfloat16), ((3, 38, 136), 200, torch.bfloat16),
             ((2, 128, 512), 256, torch.float32), ((2048, 1024), 2048, torch.bfloat16),
             ((1, 2048, 8192), 5120, torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
class TestGPU:
    """``pytest -m gpu tests/test_all_gather_matmul.py`` on 2 GPUs (nccl ranks)."""

    def test_fused_matches_nccl(self) -> None:
        calls = run_distributed(2, _gpu_against_nccl, GPU_CASES, 12, backend="nccl")
        assert calls[0] == calls[1], calls

    def test_ops_pass_opcheck(self) -> None:
        results = run_distributed(2, _opcheck_ops, backend="nccl")
        assert all(v == "SUCCESS" for r in results for d in r for v in d.values()), results
