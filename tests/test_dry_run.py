"""`dtensor-parallel plan`: every recipe dry-runs at its full world size (meta model, the
real parallelize on a fake process group), and the estimator's parameter, gradient and
optimizer bytes equal those of the real shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtensor_parallel.cli import main
from dtensor_parallel.mesh import ParallelDims
from dtensor_parallel.planning.dry_run import dry_run, mesh_groups, run_plan
from dtensor_parallel.planning.memory import estimate_memory, local_param_numels
from dtensor_parallel.trainer import load_config

RECIPES = sorted(Path(__file__).parent.parent.glob("recipes/*.toml"))
_RUNS: dict[str, object] = {}


def _run(recipe: Path):
    if recipe.name not in _RUNS:
        _RUNS[recipe.name] = dry_run(load_config(recipe))
    return _RUNS[recipe.name]


def test_all_recipes_listed() -> None:
    names = {r.stem for r in RECIPES}
    assert {"debug", "debug_moe", "llama3_8b", "llama3_70b", "llama3_70b_tp8", "llama3_405b", "mixtral_8x7b",
            "deepseek_v3_5d"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_dry_run_matches_estimator(recipe: Path) -> None:
    cfg = load_config(recipe)
    run = _run(recipe)
    assert run.world_size == cfg.cluster.nodes * cfg.cluster.nproc_per_node
    assert len(run.ranks) == run.dims.pp
    for rr in run.ranks:
        pp_rank = rr.estimate.coords["pp"]
        analytic = local_param_numels(run.args, run.dims, run.plan, pp_rank, run.n_micro)
        assert analytic == rr.numels  # every parameter, name by name
        est = estimate_memory(run.args, run.dims, run.plan, seq_len=run.seq_len,
                              micro_batch_size=run.micro_batch_size, n_micro=run.n_micro, pp_rank=pp_rank)
        n = sum(rr.numels.values())
        assert (est.param_bytes, est.grad_bytes, est.optimizer_bytes) == (4 * n, 4 * n, 8 * n)
        assert est.peak_bytes == rr.estimate.peak_bytes
        assert est.buffer_bytes == rr.buffer_bytes
    if run.dims.pp == 1:  # all the layers on the one stage; every parameter once
        assert len(run.ranks[0].numels) == len(list(_param_names(run.args)))


def _param_names(args):
    from dtensor_parallel.planning.memory import param_specs
    return [p.name for p in param_specs(args)]


@pytest.mark.parametrize("recipe", [r for r in RECIPES if not r.stem.startswith("debug")], ids=lambda p: p.stem)
def test_gpu_recipes_fit_80gib(recipe: Path) -> None:
    run = _run(recipe)
    usable = 80 * 2 ** 30 * 0.9
    assert max(r.estimate.peak_bytes for r in run.ranks) <= usable


def test_deepseek_5d_folds_ep64_into_1024_ranks() -> None:
    run = _run(next(r for r in RECIPES if r.stem == "deepseek_v3_5d"))
    d = run.dims
    assert run.world_size == 1024 and d.shape == (16, 1, 16, 2, 2) and run.ep == 64
    w1 = next(v for k, v in run.ranks[-1].numels.items() if k.endswith("feed_forward.w1"))
    assert w1 == 256 // 64 * 7168 * 2048  # 4 experts a rank, not FSDP-sharded
    assert len({r.built_from for r in run.ranks}) < run.dims.pp  # equivalent pp ranks share a call


def test_mesh_groups() -> None:
    dims = ParallelDims(pp=4, dp_shard=4, tp=4, world_size=64)
    g = mesh_groups(dims, ep=1)
    assert g["tp"][0] == [0, 1, 2, 3] and g["pp"][0] == [0, 16, 32, 48] and g["dp_shard"][0] == [0, 4, 8, 12]
    assert len(g["tp"]) == 16 and sorted(sum(g["dp_shard_cp"], [])) == list(range(64))
    g = mesh_groups(ParallelDims(pp=2, dp_shard=4, cp=2, tp=2, world_size=32), ep=8)
    assert g["ep"][0] == list(range(8)) and g["cp"][0] == [0, 2] and g["dp_shard_cp"][0][:3] == [0, 2, 4]


def test_plan_command_fits_and_writes_png(tmp_path, capsys) -> None:
    out = tmp_path / "plan.png"
    assert main(["plan", "recipes/llama3_70b.toml", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fits: peak" in text and "rule of thumb" in text
    assert "[0, 1, 2, 3]" in text and "[0, 16, 32, 48]" in text  # a tp group and a pp group
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_command_names_the_fix(tmp_path) -> None:
    code, report = run_plan("recipes/llama3_70b.toml", ["--recompute-granularity", "selective"], gpu_memory="80GiB",
                            world_size=None, out=str(tmp_path / "p.png"))
    assert code == 1
    assert "DOES NOT FIT" in report and 'fix: set [plan] recompute = "full"' in report


def test_plan_command_recipe_error(tmp_path, capsys) -> None:
    assert main(["plan", "recipes/llama3_70b.toml", "--world-size", "48", "--out", str(tmp_path / "p.png")]) == 2
    assert "48" in capsys.readouterr().err


def test_dry_run_counts_the_copy_engine_where_a_gpu_run_takes_it() -> None:
    """p2p_as_run: the copy engine for an interleaved schedule on one node of GPUs (the
    default pipeline_p2p="auto"), NCCL across nodes, for 1F1B, on the CPU or when asked."""
    from dtensor_parallel.planning.dry_run import format_report, p2p_as_run, plan_of
    from dtensor_parallel.trainer.preflight import check_recipe

    recipe = Path(__file__).parent.parent / "recipes" / "llama3_70b.toml"  # PP4, interleaved, 8 nodes

    def resolved(**overlay) -> str:
        cfg = load_config(recipe, overlay=overlay)
        dims = check_recipe(cfg, 64, device=False, data=False, layout=False, paths=False)
        return p2p_as_run(cfg, dims, *plan_of(cfg, dims))

    one_node = {"cluster": {"nodes": 1, "nproc_per_node": 64}}
    assert resolved() == "nccl"  # P2P crosses nodes
    assert resolved(**one_node) == "copy_engine"
    assert resolved(cluster={"nodes": 1, "nproc_per_node": 64, "device": "cpu"}) == "nccl"
    assert resolved(**one_node, plan={"pipeline_p2p": "nccl"}) == "nccl"
    assert resolved(**one_node, plan={"pipeline_schedule": "1f1b", "virtual_stages": None}) == "nccl"
    run = dry_run(load_config(recipe, overlay=one_node))
    assert run.pipeline_p2p == "copy_engine" and all(r.estimate.detail["p2p_rings"] > 0 for r in run.ranks)
    assert "of receive rings a rank" in format_report(run, 141 << 30, 0.1)


def test_dry_run_follows_the_moments_dtype() -> None:
    """``--exp-avg-dtype bf16``: the plan counts 4 B a parameter of AdamW state, not 8."""
    cfg = load_config(Path(__file__).parent.parent / "recipes" / "llama3_8b.toml")
    cfg.training.optimizer_state_dtype = "bf16"
    run, fp32 = dry_run(cfg), _run(Path(__file__).parent.parent / "recipes" / "llama3_8b.toml")
    for ours, ref in zip(run.ranks, fp32.ranks):
        n = sum(ours.numels.values())
        assert (ours.estimate.optimizer_bytes, ref.estimate.optimizer_bytes) == (4 * n, 8 * n)
        assert ours.estimate.peak_bytes < ref.estimate.peak_bytes
