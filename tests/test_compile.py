"""torch.compile per block keeps exact parity, with TP+SP, recompute and FSDP around it, and
really compiles: no graph break sends a block back to eager."""

from __future__ import annotations

import os

import pytest
import torch

from .harness import run_distributed
from .parity import one_step_parity
from .test_matmul_reduce_scatter import SP_TRITON, fused_parity_counting, rowwise_layers  # (and NCCL env)


def _parity_and_dynamo_stats(kind: str, mesh_kwargs: dict, plan_kwargs: dict,
                             documents: bool = False, backend: str | None = None) -> tuple[float, int, int]:
    from unittest import mock

    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a fresh cache: the worker compiled other cases' blocks (the recompile limit)
    counters.clear()
    with mock.patch.dict(os.environ, {"DTP_COMPILE_BACKEND": backend} if backend else {}):  # (pooled workers)
        loss = one_step_parity(kind, mesh_kwargs, {"compile": True, **plan_kwargs}, seq=32 if documents else 16,
                               documents=documents)
    if backend == "inductor":  # its FX graph cache looked up each graph: inductor compiled them
        assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] >= 1, \
            dict(counters["inductor"])
    return loss, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def test_compiled_blocks_parity_with_inductor() -> None:
    """The suite's compiled cases run aot_eager_decomp_partition on the CPU (tests/conftest.py);
    this one runs inductor's generated code too, as the GPU suite does."""
    results = run_distributed(2, _parity_and_dynamo_stats, "llama", {"dp_shard": 2}, {"recompute": "selective"},
                              False, "inductor")
    assert len({loss for loss, _, _ in results}) == 1, results
    assert all(graphs >= 1 and breaks == 0 for _, graphs, breaks in results), results


@pytest.mark.parametrize("kind,mesh_kwargs,plan_kwargs,documents", [
    ("llama", {"tp": 2}, {"sequence_parallel": True, "recompute": "selective"}, False),
    ("toy", {"dp_shard": 2}, {"recompute": "full"}, False),
    # the ring is a custom op: in the graph, also inside recompute (once a graph break per
    # block, then eager blocks): the toy's intercepted SDPA call, and the Llama's packed
    # documents (document_causal_attention finds the site's mode while Dynamo traces: it
    # once ran the one-rank path on each shard under compile, a loss off by 6e-5)
    ("llama", {"cp": 2}, {"recompute": "full"}, True),
    ("toy", {"cp": 2}, {"recompute": "selective"}, False),
])
def test_compiled_blocks_parity(kind: str, mesh_kwargs: dict, plan_kwargs: dict, documents: bool) -> None:
    # each rank asserts loss and gradients against one device; the ranks also agree
    results = run_distributed(2, _parity_and_dynamo_stats, kind, mesh_kwargs, plan_kwargs, documents)
    assert len({loss for loss, _, _ in results}) == 1, results
    for _, graphs, breaks in results:
        # a graph break inside a checkpointed block (it once was ContextVar.get in the RoPE
        # positions) makes dynamo run the whole block eagerly: 0 graphs, parity intact
        assert graphs >= 1 and breaks == 0, f"{graphs} graphs compiled, {breaks} graph breaks"



def _sp_triton_compiled_stats(fuse: bool) -> tuple[float, int, int, int, int]:
    """TP2+SP with the Triton reduce-scatter, compiled, selective recompute: one_step_parity,
    the fused / unfused Triton calls (spies) and the dynamo stats."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a fresh cache: the worker compiled other cases' blocks (the recompile limit)
    counters.clear()
    plan = {**SP_TRITON, "compile": True, "recompute": "selective"}
    loss, fused, unfused = fused_parity_counting("llama", {"tp": 2}, plan, fuse=fuse, batch=8)
    return loss, fused, unfused, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _check_sp_triton_compiled(results: list, fuse: bool) -> None:
    n = rowwise_layers("llama")  # one call per row-parallel layer: none rerun by recompute
    assert len({r[0] for r in results}) == 1, results
    for _, fused, unfused, graphs, breaks in results:
        # the ops were once @torch.compiler.disable: a break per layer, every block eager
        assert graphs >= 1 and breaks == 0, f"{graphs} graphs compiled, {breaks} graph breaks"
        assert (fused, unfused) == ((n, 0) if fuse else (0, n)), results


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU ranks run Triton in the interpreter")
@pytest.mark.parametrize("fuse", [True, False], ids=["fused_matmul", "unfused"])
def test_compiled_sp_triton_reduce_scatter(fuse: bool) -> None:
    """The Triton SP path (custom ops) compiles without a graph break under selective
    recompute, keeps parity, and the compiled backward does not rerun the ops."""
    _check_sp_triton_compiled(run_distributed(2, _sp_triton_compiled_stats, fuse), fuse)


# On 2 x H100 (torch 2.11, 2026-11-27) the unfused case compiled with no break and kept
# parity, but never called the Triton op: the output hook took DTensor's NCCL path under
# compile. On 2 x H200 (2026-11-30, TORCH_LOGS=graph_code) the traced graph holds the
# fallback line of sp_reduce_scatter.redistribute_rowwise_output (DTensor's redistribute), so
# its Triton branch's condition was false while Dynamo traced on CUDA; on CPU ranks the same
# trace takes the op. Not yet understood; strict, so a fix shows. The default path (the fused
# row-parallel matmul) is not affected (the case above it), nor is eager.
_UNFUSED_ON_GPU = pytest.param(False, id="unfused", marks=pytest.mark.xfail(
    strict=True, reason="under compile on CUDA the unfused hook falls back to NCCL"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("fuse", [pytest.param(True, id="fused_matmul"), _UNFUSED_ON_GPU])
def test_gpu_compiled_sp_triton_reduce_scatter(fuse: bool) -> None:
    """``pytest -m gpu tests/test_compile.py``: the same on 2 GPUs (symmetric memory, nccl)."""
    _check_sp_triton_compiled(run_distributed(2, _sp_triton_compiled_stats, fuse, backend="nccl"), fuse)



def _loss_choice(compile_: bool | str) -> str:
    from dtensor_parallel import build_mesh, parallelize
    from dtensor_parallel.tensor_parallel.loss import compiled_cross_entropy_sum, eager_cross_entropy_sum

    from .parity import make_model, plan_for

    pm = parallelize(make_model("llama"), build_mesh(dp_shard=2), plan_for("llama", compile=compile_))
    fns = {compiled_cross_entropy_sum(): "compiled", eager_cross_entropy_sum: "eager"}
    return fns.get(pm._loss_sum_of, "other") + "/" + fns.get(pm.pipeline.loss_sum if pm.pipeline else None, "-")


def test_compile_compiles_the_loss() -> None:
    """With compiled blocks the cross entropy is compiled too (no fp32 logits or their fp32
    gradient kept: tensor_parallel/loss.py); "auto" on the CPU and False keep it eager. The
    parity cases above run it compiled (their counters: no graph break)."""
    assert run_distributed(2, _loss_choice, True) == ["compiled/-"] * 2
    assert run_distributed(2, _loss_choice, "auto") == ["eager/-"] * 2


def _cache_dirs(base: str) -> tuple[str, str]:
    from dtensor_parallel.compiling import isolate_compile_cache

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = base  # (pooled workers: restored below)
    try:
        return isolate_compile_cache(), isolate_compile_cache()  # a second call keeps it
    finally:
        if before is None:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def test_each_rank_compiles_into_its_own_cache(tmp_path) -> None:
    """Ranks sharing an inductor cache directory were served each other's compiled graphs on
    a warm cache (torch's keys do not tell them apart: compiling.py), so parallelize gives
    each rank a directory of its own under the configured one. (Without it the TP parity
    cases above and the MoE one below computed another loss on every run after the first.)"""
    dirs = run_distributed(2, _cache_dirs, str(tmp_path))
    assert dirs == [(str(tmp_path / f"rank{r}"),) * 2 for r in range(2)], dirs


def _moe_compiled_parity(mesh_kwargs: dict, plan_kwargs: dict) -> float:
    torch._dynamo.reset()
    return one_step_parity("moe", mesh_kwargs, {"compile": True, **plan_kwargs})


@pytest.mark.parametrize("mesh_kwargs,plan_kwargs", [
    ({"dp_shard": 2}, {"expert_parallel": 2, "recompute": "selective"}),
    ({"tp": 2}, {"sequence_parallel": True, "recompute": "selective"}),  # token parallel over tp
])
def test_compiled_moe_matches_one_device(mesh_kwargs: dict, plan_kwargs: dict) -> None:
    """Compiled MoE blocks match one device: EP folded over dp_shard (the all-to-all dispatch
    is a graph break inside), and token parallel over tp with SP (wrong on a warm shared
    cache before the per-rank cache directories)."""
    losses = run_distributed(2, _moe_compiled_parity, mesh_kwargs, plan_kwargs)
    assert len(set(losses)) == 1, losses


def test_zero_bubble_schedules_keep_blocks_eager():
    """zero_bubble / zbv run each backward in two halves, which a compiled block's one backward
    graph cannot (pytorch/pytorch#161904: "donated buffers" on the second half, seen on
    2 x H200 with the compile default): compile=True with them is an error naming the fix,
    "auto" keeps the blocks eager with one log line, and other schedules still compile."""
    import logging

    from dtensor_parallel import ParallelPlan
    from dtensor_parallel.compiling import compiles_blocks

    with pytest.raises(ValueError, match=r"compile=True: pipeline_schedule='zbv' splits each backward.*"
                                         r"set compile=False"):
        compiles_blocks(ParallelPlan(compile=True, pipeline_schedule="zbv"), "cuda", "zbv")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("dtensor_parallel.compiling")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        assert not compiles_blocks(ParallelPlan(pipeline_schedule="zero_bubble"), "cuda", "zero_bubble")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert len(records) == 1 and "blocks stay eager" in records[0].getMessage()
    assert compiles_blocks(ParallelPlan(pipeline_schedule="1f1b"), "cuda", "1f1b")
    assert compiles_blocks(ParallelPlan(), "cuda", None) and not compiles_blocks(ParallelPlan(), "cpu", None)
    assert not compiles_blocks(ParallelPlan(compile=False, pipeline_schedule="zbv"), "cuda", "zbv")
