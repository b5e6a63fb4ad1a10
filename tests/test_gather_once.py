"""One SP all-gather per norm output, done inside the first column-parallel layer's GEMM and
shared by the layers after it (``gather_once.py``, ``styles.py``): the styles a plan resolves to,
the layers sharing one gather against DTensor's gather + linear on gloo ranks (forward and every
gradient, fp32 and bf16; the fallback's log line and its single all-gather), model parity
through the wiring (TP2+SP Llama and a biased toy, FSDP2 x TP2, the fused loss, transformers
Qwen2/Qwen3, selective and full recompute, compiled with selective recompute; spies prove the
fused path ran), and on 2 GPUs (``pytest -m gpu``) the same parity over symmetric memory."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dtensor_parallel.tensor_parallel import all_gather_matmul as agm
from dtensor_parallel.tensor_parallel import gather_once
from dtensor_parallel.warn_once import forget

from .harness import run_distributed
from .parity import TINY_LLAMA, case_device, one_step_parity
from .toy_gpt import ToyGPT

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (DESIGN.md)
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SP_TRITON = {"sequence_parallel": True, "kernels": {"sp_reduce_scatter": "triton"}}
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU ranks run the reduce in the interpreter")


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
    forget()  # (a worker process may have logged before)
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
                    mod = gather_once.FusedColwiseLinear.from_linear(lin, gather_dim=1)
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


# ----------------------------------------------------------------------------------------
# GPUs: the wiring over symmetric memory
# ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
class TestGPU:
    """``pytest -m gpu tests/test_gather_once.py`` on 2 GPUs (nccl ranks)."""

    @pytest.mark.parametrize("kind", ["llama", "toy"])
    def test_one_step_parity_tp2_sp(self, kind: str) -> None:
        results = run_distributed(2, agm_parity_counting, kind, {"tp": 2}, SP_TRITON, batch=8, backend="nccl")
        leaders, layers = colwise_layers(kind)
        assert results[0][0] == results[1][0], results
        assert all(c == {"op": leaders, "colwise": layers, "dtensor_gather": 0} for _, c in results), results

    def test_compiled_selective_recompute(self) -> None:
        _check_compiled(run_distributed(2, _compiled_counting, backend="nccl"))
