"""Fused all-gather + column-parallel matmul (``all_gather_matmul.py``, wired by
``gather_once.py``): the chunk logic with peers simulated by a stacked tensor, the backward's
matmul + addend + reduce-scatter (the reduce in the kernel's code, interpreter on CPU), the
layers sharing one gather against DTensor's gather + linear on gloo ranks (forward and every
gradient, fp32 and bf16; the fallback's log line and its single all-gather), model parity
through the wiring (TP2+SP Llama and a biased toy, FSDP2 x TP2, compiled with selective
recompute; spies prove the fused path ran), and on 2 GPUs (``pytest -m gpu``) the
symmetric-memory path against NCCL."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dtensor_parallel.tensor_parallel import all_gather_matmul as agm
from dtensor_parallel.tensor_parallel import gather_once
from dtensor_parallel.tensor_parallel import matmul_add_reduce_scatter as mars
from dtensor_parallel.tensor_parallel import matmul_reduce_scatter as mrs
from dtensor_parallel.tensor_parallel import sp_reduce_scatter as sprs
from .harness import run_distributed
from .kernel_checks import ATOL, check_against_torch, rel_err
from .parity import TINY_LLAMA, case_device, one_step_parity
from .toy_gpt import ToyGPT

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (DESIGN.md)
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SP_TRITON = {"sequence_parallel": True, "kernels": {"sp_reduce_scatter": "triton"}}
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
    assert "fake process group" in agm.cannot_serve(x, w, 1, dist.group.WORLD)


def test_styles_resolve_the_gather_into_the_colwise_layers() -> None:
    """With the Triton kernels under SP: the norm passes its shard on and the colwise style
    gathers once; with torch (or without SP, or fused_colwise off) the norm gathers."""
    from dtensor_parallel.tensor_parallel.styles import Colwise, Norm, TPKernels, _GatherOnceColwise

    on = TPKernels(reduce_scatter="triton")
    assert Norm().resolve(True, on).defer_gather and isinstance(Colwise().resolve(True, on), _GatherOnceColwise)
    assert Colwise(fused=False).resolve(True, on).fused is False
    for sp, kernels in [(True, TPKernels()), (False, on), (True, TPKernels(reduce_scatter="triton", fused_colwise=False))]:
        assert not Norm().resolve(sp, kernels).defer_gather
        assert not isinstance(Colwise().resolve(sp, kernels), _GatherOnceColwise)


# ----------------------------------------------------------------------------------------
# gloo ranks: layers sharing one gather against DTensor's gather + linear
# ----------------------------------------------------------------------------------------


def _shared_gather_against_dtensor(shape: tuple, dtype: torch.dtype) -> dict:
    """Three column-parallel Linears read one Shard(1) input (q with a bias, k, v): through
    FusedColwiseLinear (the op, then the gathered input twice) against F.linear on the input
    gathered by DTensor; outputs and the input, weight and bias gradients, twice (float64: the
    op cannot serve it, the logged fallback). Returns the spies' counts and the log lines."""
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    rank, world = dist.get_rank(), dist.get_world_size()
    dev = case_device()
    mesh = torch.distributed.device_mesh.init_device_mesh(dev.type, (world,))
    g = torch.Generator().manual_seed(3)
    x_full = torch.randn(shape, generator=g).to(dev, dtype)
    lins = [torch.nn.Linear(shape[-1], n, bias=i == 0, dtype=dtype, device=dev)
            for i, n in enumerate((2 * world, world, world))]
    g_outs = [torch.randn((*shape[:-1], lin.out_features // world), generator=torch.Generator().manual_seed(rank + i))
              .to(dev, dtype) for i, lin in enumerate(lins)]
    calls, records = {"op": 0, "dtensor_gather": 0}, []
    gather_once._LOGGED.clear()  # (a worker process may have logged before)
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(gather_once.__name__).addHandler(handler)
    orig_fwd, orig_gather = agm._forward, gather_once.gathered_dtensor

    def count(key, fn):
        def spy(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return spy

    def run(fused_layers: bool):
        x = DTensor.from_local(x_full.chunk(world, 1)[rank].clone(), mesh, [Shard(1)]).requires_grad_()
        params = []
        for lin in lins:
            w = torch.nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Shard(0)]))
            b = None if lin.bias is None else torch.nn.Parameter(distribute_tensor(lin.bias.detach(), mesh, [Shard(0)]))
            params.append((w, b))
        gathers = [0]
        # DTensor's Shard -> Replicate (torch 2.13: all_gather_single; CommDebugMode would
        # re-wrap the input, which the cache keys on)
        name = "all_gather_single" if hasattr(funcol, "all_gather_single") else "all_gather_tensor"
        orig_ag = getattr(funcol, name)

        def counting_all_gather(*a, **k):
            gathers[0] += 1
            return orig_ag(*a, **k)

        setattr(funcol, name, counting_all_gather)
        try:
            if fused_layers:
                outs = []
                for (w, b), lin in zip(params, lins):
                    mod = gather_once.FusedColwiseLinear.from_linear(lin, 1)
                    mod.weight, mod.bias = w, b
                    outs.append(mod(x))
            else:
                xr = x.redistribute(placements=[Replicate()])
                outs = [F.linear(xr, w, b) for w, b in params]
        finally:
            setattr(funcol, name, orig_ag)
        sum((o.to_local() * go).sum() for o, go in zip(outs, g_outs)).backward()
        grads = [x.grad.full_tensor()] + [t.grad.full_tensor() for wb in params for t in wb if t is not None]
        return [o.to_local().detach() for o in outs], grads, gathers[0]

    agm._forward, gather_once.gathered_dtensor = count("op", orig_fwd), count("dtensor_gather", orig_gather)
    try:
        got, got_grads, got_gathers = run(True)
        run(True)  # the fallback logs once
    finally:
        agm._forward, gather_once.gathered_dtensor = orig_fwd, orig_gather
        logging.getLogger(gather_once.__name__).removeHandler(handler)
    want, want_grads, want_gathers = run(False)
    tol = {"rtol": 1e-6, "atol": 1e-5} if dtype in (torch.float32, torch.float64) else {"rtol": 2e-2, "atol": 2e-2}
    for a, b_ in zip(got + got_grads, want + want_grads):
        torch.testing.assert_close(a, b_, **tol)
    assert want_gathers == 1, "the all-gather spy saw no gather in the reference"
    return {**calls, "dtensor_gathers_in_forward": got_gathers, "log_lines": [r.getMessage() for r in records]}


@needs_interpreter
@pytest.mark.parametrize("world,shape,dtype", [(2, (3, 8, 6), torch.float32), (3, (2, 9, 5), torch.float32),
                                               (2, (2, 8, 6), torch.bfloat16)])
def test_gloo_layers_share_one_fused_gather(world: int, shape: tuple, dtype: torch.dtype) -> None:
    """One op call per input (q), k and v read its gathered input: no DTensor all-gather, no
    fallback; values and gradients equal DTensor's (fp32) or within bf16 rounding."""
    results = run_distributed(world, _shared_gather_against_dtensor, shape, dtype)
    assert all(r["op"] == 2 and r["dtensor_gather"] == 0 and r["dtensor_gathers_in_forward"] == 0
               and not r["log_lines"] for r in results), results


@needs_interpreter
def test_gloo_fallback_logs_once_and_still_gathers_once() -> None:
    """float64 (the kernels take fp16/bf16/fp32): one log line naming the reason over two
    steps, DTensor's all-gather once per input for the three layers, the same numbers."""
    results = run_distributed(2, _shared_gather_against_dtensor, (2, 8, 6), torch.float64)
    for r in results:
        assert r["op"] == 0 and r["dtensor_gathers_in_forward"] == 1, r
        assert len(r["log_lines"]) == 1 and "dtype torch.float64" in r["log_lines"][0], r


# ----------------------------------------------------------------------------------------
# Model parity through the wiring
# ----------------------------------------------------------------------------------------


def colwise_layers(kind: str) -> tuple[int, int]:
    """(gathering layers, column-parallel layers) per forward: q and w1 gather, k, v, w3 reuse
    (Llama); the toy's c_q gathers, c_k, c_v reuse, and its MLP's c_fc gathers alone."""
    blocks = TINY_LLAMA.n_layers if kind == "llama" else len(ToyGPT().h)
    return 2 * blocks, (5 if kind == "llama" else 4) * blocks


def agm_parity_counting(kind: str, mesh_kwargs: dict, plan_kwargs: dict, **kwargs) -> tuple[float, dict]:
    """one_step_parity (loss and every gradient against one device), counting the op's forwards
    and, in eager blocks, the column-parallel forwards and DTensor's fallback gathers (spies;
    dynamo traces those two, and a counter inside a checkpointed block is a side effect it
    refuses: a graph break)."""
    names = ("_forward",) if plan_kwargs.get("compile") else ("_forward", "colwise_forward", "gathered_dtensor")
    owners = {"_forward": agm, "colwise_forward": gather_once, "gathered_dtensor": gather_once}
    keys = {"_forward": "op", "colwise_forward": "colwise", "gathered_dtensor": "dtensor_gather"}
    calls = {keys[n]: 0 for n in names}
    originals = {n: getattr(owners[n], n) for n in names}

    def count(key, fn):
        def spy(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return spy

    for n in names:
        setattr(owners[n], n, count(keys[n], originals[n]))
    try:
        loss = one_step_parity(kind, mesh_kwargs, plan_kwargs, **kwargs)
    finally:
        for n in names:
            setattr(owners[n], n, originals[n])
    return loss, calls


@needs_interpreter
@pytest.mark.parametrize("world,mesh_kwargs,kind,extra", [(2, {"tp": 2}, "llama", {}), (2, {"tp": 2}, "toy", {}),
                                                          (4, {"tp": 2, "dp_shard": 2}, "toy", {}),
                                                          (2, {"tp": 2}, "llama", {"fused_loss": True})])
def test_gloo_parity_through_the_fused_colwise_linear(world: int, mesh_kwargs: dict, kind: str, extra: dict) -> None:
    """Loss and every gradient equal the single-device model's (toy: biased q/v and a lone
    c_fc, whose gathered input nothing else reads; world 4: FSDP2 x TP2; the fused loss, whose
    head gathers the final norm's shard); each norm's output was gathered once, inside the
    first layer's GEMM."""
    results = run_distributed(world, agm_parity_counting, kind, mesh_kwargs, {**SP_TRITON, **extra}, batch=8)
    leaders, layers = colwise_layers(kind)
    assert len({loss for loss, _ in results}) == 1, results
    assert all(c == {"op": leaders, "colwise": layers, "dtensor_gather": 0} for _, c in results), results


@needs_interpreter
@pytest.mark.parametrize("recompute,runs", [("selective", 1), ("full", 2)])
def test_gloo_selective_recompute_saves_the_op(recompute: str, runs: int) -> None:
    """Selective recompute saves the op's outputs (recompute.py): one run per gathering layer,
    in forward only; full recompute (the control) reruns it in backward."""
    results = run_distributed(2, agm_parity_counting, "llama", {"tp": 2}, {**SP_TRITON, "recompute": recompute},
                              batch=8)
    leaders, layers = colwise_layers("llama")
    assert len({loss for loss, _ in results}) == 1, results
    assert all(c == {"op": runs * leaders, "colwise": 2 * layers, "dtensor_gather": 0} for _, c in results), results


def _hf_counting(arch: str) -> tuple[float, int]:
    from .hf_parity import hf_one_step_parity

    calls, orig = [0], agm._forward

    def spy(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    agm._forward = spy
    try:
        loss = hf_one_step_parity(arch, {"tp": 2}, SP_TRITON, layers=2)
    finally:
        agm._forward = orig
    return loss, calls[0]


@needs_interpreter
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_gloo_hf_parity_tp2_sp(arch: str) -> None:
    """transformers models through their built-in plan (Qwen2: q/k/v biases; Qwen3: per-head
    q/k norms after the projections): parity with one device, q_proj and gate_proj gathering."""
    pytest.importorskip("transformers")
    results = run_distributed(2, _hf_counting, arch)
    assert len({loss for loss, _ in results}) == 1 and all(n == 2 * 2 for _, n in results), results


def _compiled_counting() -> tuple[float, dict, int, int]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a fresh cache: the worker compiled other cases' blocks (the recompile limit)
    counters.clear()
    plan = {**SP_TRITON, "compile": True, "recompute": "selective"}
    loss, calls = agm_parity_counting("llama", {"tp": 2}, plan, batch=8)
    return loss, calls, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _check_compiled(results: list) -> None:
    leaders, _ = colwise_layers("llama")
    assert len({r[0] for r in results}) == 1, results
    for _, calls, graphs, breaks in results:
        assert graphs >= 1 and breaks == 0, f"{graphs} graphs compiled, {breaks} graph breaks"
        # once per layer: the selective recompute saves the op's outputs (recompute.py)
        assert calls == {"op": leaders}, results


@needs_interpreter
def test_gloo_compiled_selective_recompute_keeps_parity_without_graph_breaks() -> None:
    """Compiled blocks with selective recompute: the ops in the graph (no break), parity, and
    no rerun of the gather + GEMM in backward."""
    _check_compiled(run_distributed(2, _compiled_counting))


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

    @pytest.mark.parametrize("kind", ["llama", "toy"])
    def test_one_step_parity_tp2_sp(self, kind: str) -> None:
        results = run_distributed(2, agm_parity_counting, kind, {"tp": 2}, SP_TRITON, batch=8, backend="nccl")
        leaders, layers = colwise_layers(kind)
        assert results[0][0] == results[1][0], results
        assert all(c == {"op": leaders, "colwise": layers, "dtensor_gather": 0} for _, c in results), results

    def test_compiled_selective_recompute(self) -> None:
        _check_compiled(run_distributed(2, _compiled_counting, backend="nccl"))
