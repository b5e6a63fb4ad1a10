"""Every recipe's layout under compile, on 2 GPUs (issue 23: the fast path by default).

A recipe's layout needs its full world size (up to 512 ranks). What 2 GPUs can check is
each of its strategies at degree 2 with the recipe's own plan: one layout per mesh
dimension the recipe uses (that dimension 2, the others 1), with the recipe's sequence
parallelism, recompute, pipeline schedule and virtual stages, kernels, expert parallelism
(folded over the 2-rank dimension) and its ``compile`` setting ("auto": compiled on CUDA),
on a tiny model of the recipe's kind, in fp32 so one-step parity with one device holds to
1e-5 (the recipes' bf16 is the throughput benchmark's). ``recipe_layouts`` is checked on
the CPU; the parity cases run with ``pytest -m gpu``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dtensor_parallel.trainer.config import load_config

from .harness import run_distributed
from .parity import one_step_parity

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))
DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def recipe_layouts(recipe: Path) -> dict[str, tuple[str, dict, dict]]:
    """``{name: (model kind, mesh kwargs, plan kwargs)}``: the recipe's strategies at degree 2."""
    cfg = load_config(recipe)
    plan, par = cfg.plan, cfg.parallel
    moe = cfg.model.args().moe is not None
    layouts = {}
    for dim in DIMS:
        if getattr(par, dim) == 1:  # (dp_shard = -1 fills the rest of a cluster: used)
            continue
        mesh = {d: 1 for d in DIMS}
        mesh[dim] = 2
        kw = {"recompute": plan.recompute, "kernels": plan.kernels, "compile": plan.compile}
        if plan.recompute == "full" and plan.recompute_method == "block":
            kw.update(recompute_method="block", recompute_num_layers=1)
        if dim == "tp":
            kw["sequence_parallel"] = plan.sequence_parallel
        if dim == "pp":
            kw.update(pipeline_schedule=plan.pipeline_schedule, micro_batch_size=2)
            if plan.virtual_stages and plan.virtual_stages > 1:
                kw["virtual_stages"] = plan.virtual_stages
        kind = "moe" if moe else "llama"
        if moe and par.ep > 1 and dim in ("dp_shard", "cp", "tp"):
            kw["expert_parallel"] = 2  # folded over this dimension, as the recipe folds it
        name = f"{recipe.stem}-{dim}2"
        layouts[name] = (kind, mesh, kw)
    return layouts


def _distinct(recipes: list[Path]) -> dict[str, tuple[str, dict, dict]]:
    """Each distinct layout once, under the first recipe's name that gives it."""
    out, seen = {}, set()
    for r in recipes:
        for name, (kind, mesh, kw) in recipe_layouts(r).items():
            key = (kind, tuple(sorted(mesh.items())), tuple(sorted((k, str(v)) for k, v in kw.items())))
            if key not in seen:
                seen.add(key)
                out[name] = (kind, mesh, kw)
    return out


ALL = _distinct(RECIPES)


def test_every_recipe_gives_its_layouts():
    """Every recipe yields a layout per dimension it uses (dp_shard=-1 fills the rest, so it
    counts), each with the recipe's compile setting; every recipe compiles ("auto")."""
    assert RECIPES
    for recipe in RECIPES:
        cfg = load_config(recipe)
        layouts = recipe_layouts(recipe)
        used = {d for d in DIMS if getattr(cfg.parallel, d) != 1}
        assert {name.rsplit("-", 1)[1][:-1] for name in layouts} == used, (recipe.name, layouts)
        for kind, mesh, kw in layouts.values():
            assert sorted(mesh.values()) == [1, 1, 1, 1, 2]
            assert kw["compile"] == cfg.plan.compile
            assert ("sequence_parallel" in kw) == (mesh["tp"] == 2)
            assert kind == ("moe" if cfg.model.args().moe is not None else "llama")
    assert all(kw["compile"] == "auto" for _, _, kw in ALL.values()), ALL
    assert len(ALL) < sum(len(recipe_layouts(r)) for r in RECIPES)  # shared layouts run once


def compiled_parity(kind: str, mesh_kwargs: dict, plan_kwargs: dict) -> float:
    """One-step parity (with a fresh Dynamo: ``one_step_parity`` resets it, else a pooled
    worker's earlier cases count towards the recompile limit, past which blocks silently run
    eagerly); asserts that blocks were compiled, with no graph break in a dense model (an
    MoE layer's all-to-all dispatch reads its split sizes on the host: a break there)."""
    counters = torch._dynamo.utils.counters
    counters.clear()
    loss = one_step_parity(kind, mesh_kwargs, plan_kwargs, batch=8)
    if plan_kwargs.get("compile") in (True, "auto"):
        assert counters["stats"]["unique_graphs"] > 0, "no block was compiled"
        if kind not in ("moe", "moe_aux"):  # MoE blocks break at the dispatch's split sizes
            assert not counters["graph_break"], dict(counters["graph_break"])  # (host sync: issue 22)
    return loss


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("layout", list(ALL))
def test_gpu_recipe_layout_compiled(layout: str) -> None:
    kind, mesh_kwargs, plan_kwargs = ALL[layout]
    losses = run_distributed(2, compiled_parity, kind, mesh_kwargs, plan_kwargs, backend="nccl")
    assert len(set(losses)) == 1, losses
