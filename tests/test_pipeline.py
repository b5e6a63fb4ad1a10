"""Pipeline parallel: splitting rules, bad splits rejected before any collective, and
every schedule and combination matching the single-device model on gloo ranks."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode

from dtensor_parallel import ParallelPlan, build_mesh, parallelize
from dtensor_parallel.models import Llama
from dtensor_parallel.pipeline.layout import pipeline_layout
from dtensor_parallel.pipeline.schedules import theoretical_bubble
from dtensor_parallel.pipeline.split import (PassThrough, build_stage_module, split_pre_post, stage_layer_counts,
                                             stages_of_rank, virtual_stages_from_layers)

from .harness import run_distributed
from .local_ranks import fake_world
from .parity import TINY_LLAMA, make_model, one_step_parity, training_parity
from .toy_gpt import ToyGPT

# ---- splitting (no ranks) -------------------------------------------------------------


def test_even_and_uneven_layer_counts() -> None:
    assert stage_layer_counts(80, 8) == [10] * 8
    assert stage_layer_counts(126, 16, first_stage_layers=7, last_stage_layers=7) == [7] + [8] * 14 + [7]
    assert stage_layer_counts(10, 4, layers_per_stage=[2, 3, 3, 2]) == [2, 3, 3, 2]
    assert stage_layer_counts(9, 4, first_stage_layers=0) == [0, 3, 3, 3]


@pytest.mark.parametrize("kwargs,match", [
    ({"n_layers": 10, "n_stages": 4}, r"10 layers do not split evenly over 4 stages \(10 / 4 = 2.50\)"),
    ({"n_layers": 10, "n_stages": 4, "layers_per_stage": [3, 3, 3, 3]}, r"sums to 12.*every layer must be placed once"),
    ({"n_layers": 10, "n_stages": 4, "layers_per_stage": [5, 5]}, r"has 2 entries but there are 4 stages"),
    ({"n_layers": 10, "n_stages": 4, "first_stage_layers": 3}, r"10 layers - first/last stage layers 3 = 7 layers do not split"),
    ({"n_layers": 8, "n_stages": 4, "layers_per_stage": [4, 0, 2, 2]}, r"stage 1 would get 0 layers"),
])
def test_bad_layer_counts(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stage_layer_counts(**kwargs)


def test_megatron_virtual_stage_pitfall_is_an_error() -> None:
    """80 layers at PP16 with 2 layers per virtual stage is 2.5 virtual stages: Megatron
    once ran it as 64 layers; here it is an error."""
    with pytest.raises(ValueError, match=r"80 layers / \(pp 16 x 2 layers per virtual stage\) = 2.50"):
        virtual_stages_from_layers(80, 16, 2)
    assert virtual_stages_from_layers(80, 8, 5) == 2


def test_stage_to_rank_maps() -> None:
    assert [stages_of_rank(r, 4, 2, "loop") for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [stages_of_rank(r, 4, 2, "v") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]


def test_pre_post_modules_and_stage_pruning_keep_names() -> None:
    model = Llama(TINY_LLAMA)
    assert split_pre_post(model, "layers") == (["tok_embeddings"], ["norm", "output"])
    names = [f"layers.{i}" for i in range(4)]
    mid = build_stage_module(model, names, ["layers.2"], is_first=False, is_last=False)
    assert [n for n, _ in mid.named_parameters()][0].startswith("layers.2.")
    assert isinstance(mid.tok_embeddings, PassThrough) and isinstance(mid.output, PassThrough)
    assert mid.layers["2"].attention.wq.weight is model.layers["2"].attention.wq.weight  # shared
    first = build_stage_module(ToyGPT(), [f"h.{i}" for i in range(4)], ["h.0", "h.1"], True, False)
    assert sorted({n.split(".")[0] + "." + n.split(".")[1] for n, _ in first.named_parameters()
                   if n.startswith("h.")}) == ["h.0", "h.1"]
    assert isinstance(first.lm_head, PassThrough) and isinstance(first.ln_f, PassThrough)
    assert isinstance(first.wte, torch.nn.Embedding)
    # a module without parameters registered after the blocks (a rotary embedding) stays on
    # every stage; other stages' modules pass their input on
    toy = ToyGPT()
    toy.rotary = torch.nn.Identity()
    first = build_stage_module(toy, [f"h.{i}" for i in range(4)], ["h.0", "h.1"], True, False)
    assert isinstance(first.rotary, torch.nn.Identity)
    x = torch.randn(2, 3, 32)
    assert first.lm_head(x, "ignored", key=1) is x


def test_layout_from_plan() -> None:
    names = [f"layers.{i}" for i in range(8)]
    layout = pipeline_layout(names, 2, ParallelPlan(pipeline_schedule="interleaved_1f1b", virtual_stages=2))
    assert layout.stages_of(1) == [1, 3] and layout.blocks_of(3) == ["layers.6", "layers.7"]
    assert theoretical_bubble(4, 2, 8) == 3 / 16


@pytest.mark.parametrize("plan_kwargs,match", [
    ({"pipeline_schedule": "1f1b", "virtual_stages": 2}, r"takes exactly 1 stages per pp rank.*interleaved_1f1b"),
    ({"pipeline_schedule": "interleaved_1f1b", "virtual_stages": 1}, r"at least 2 stages per pp rank"),
    ({"layers_per_stage": [1, 2]}, r"sums to 3"),
    ({"pipeline_schedule": "1f1b", "micro_batch_size": 4, "global_batch_size": 4}, r"1 micro-batches for pp=2"),
    ({"virtual_stages": 3, "pipeline_schedule": "interleaved_1f1b"}, r"4 layers do not split evenly over 6 stages"),
])
def test_bad_pipeline_plans_fail_before_any_collective(plan_kwargs: dict, match: str) -> None:
    fake_world(2)
    mesh = build_mesh(pp=2)
    with torch.device("meta"):
        model = Llama(TINY_LLAMA)
    with CommDebugMode() as comm, pytest.raises(ValueError, match=match):
        parallelize(model, mesh, ParallelPlan(**plan_kwargs))
    assert comm.get_total_counts() == 0


# ---- parity on gloo ranks ---------------------------------------------------------------

PP_LAYOUTS = {
    # name: (world, build_mesh kwargs, plan kwargs); 8 sequences a step, micro-batches of 2
    "pp2_1f1b": (2, {"pp": 2}, {"pipeline_schedule": "1f1b"}),
    "pp2_gpipe": (2, {"pp": 2}, {"pipeline_schedule": "gpipe"}),
    "pp2_interleaved_v2": (2, {"pp": 2}, {"pipeline_schedule": "interleaved_1f1b", "virtual_stages": 2}),
    "pp2_zero_bubble_v2": (2, {"pp": 2}, {"pipeline_schedule": "zero_bubble", "virtual_stages": 2}),
    "pp2_zbv": (2, {"pp": 2}, {"pipeline_schedule": "zbv"}),
    "pp2_tp2_sp": (4, {"pp": 2, "tp": 2}, {"sequence_parallel": True}),
    "pp2_fsdp2": (4, {"pp": 2, "dp_shard": 2}, {}),
    "pp2_tp2_dp2": (8, {"pp": 2, "tp": 2, "dp_shard": 2}, {"sequence_parallel": True}),
    "pp2_interleaved_tp2_fsdp2": (8, {"pp": 2, "tp": 2, "dp_shard": 2},
                                  {"pipeline_schedule": "interleaved_1f1b", "virtual_stages": 2,
                                   "sequence_parallel": True}),
    "pp2_zbv_tp2_sp": (4, {"pp": 2, "tp": 2}, {"pipeline_schedule": "zbv", "sequence_parallel": True}),
    "pp2_uneven_first": (2, {"pp": 2}, {"first_stage_layers": 1}),
    "pp2_explicit_split": (2, {"pp": 2}, {"layers_per_stage": [3, 1]}),
}


@pytest.mark.parametrize("kind", ["llama", "toy"])
@pytest.mark.parametrize("layout", list(PP_LAYOUTS))
def test_pipeline_parity(layout: str, kind: str) -> None:
    world, mesh_kwargs, plan_kwargs = PP_LAYOUTS[layout]
    losses = run_distributed(world, one_step_parity, kind, mesh_kwargs,
                             {"micro_batch_size": 2, **plan_kwargs}, batch=8)
    assert len(set(losses)) == 1, f"ranks disagree on the global loss: {losses}"


# the four-rank pipelines of the GPU matrix (tests/test_gpu_world4.py), here on gloo
PP4_LAYOUTS = {
    "pp4_1f1b": ("llama", {"pp": 4}, {"pipeline_schedule": "1f1b"}),
    "pp4_interleaved_v2": ("llama8", {"pp": 4}, {"pipeline_schedule": "interleaved_1f1b", "virtual_stages": 2}),
    "pp2_cp2": ("llama", {"pp": 2, "cp": 2}, {}),
}


@pytest.mark.parametrize("layout", list(PP4_LAYOUTS))
def test_four_rank_pipeline_parity(layout: str) -> None:
    kind, mesh_kwargs, plan_kwargs = PP4_LAYOUTS[layout]
    losses = run_distributed(4, one_step_parity, kind, mesh_kwargs, {"micro_batch_size": 2, **plan_kwargs},
                             batch=8, seq=32)
    assert len(set(losses)) == 1, f"ranks disagree on the global loss: {losses}"


@pytest.mark.parametrize("layout", ["pp2_interleaved_v2", "pp2_tp2_dp2"])
def test_pipeline_training_tracks_single_device(layout: str) -> None:
    world, mesh_kwargs, plan_kwargs = PP_LAYOUTS[layout]
    run_distributed(world, training_parity, "llama", mesh_kwargs,
                    {"micro_batch_size": 2, **plan_kwargs}, steps=10, batch=8)


def test_pipeline_with_recompute_and_accumulation() -> None:
    run_distributed(4, one_step_parity, "toy", {"pp": 2, "dp_shard": 2},
                    {"micro_batch_size": 1, "global_batch_size": 8, "recompute": "selective"}, batch=8)


def _forward_only_case() -> bool:
    import copy

    from .parity import make_batch, plan_for, rel_err
    ref = make_model("llama")
    pm = parallelize(copy.deepcopy(ref), build_mesh(pp=2), plan_for("llama", micro_batch_size=2))
    x, _ = make_batch(TINY_LLAMA.vocab_size, 4, 16)
    logits = pm(x)
    if pm.pipeline.is_last:
        with torch.no_grad():
            assert rel_err(logits, ref(x)) <= 1e-5
    else:
        assert logits is None
    return pm.pipeline.is_last


def test_pipeline_forward_only() -> None:
    """pm(x) under PP: the logits on the last stage's ranks, equal to one device's."""
    assert run_distributed(2, _forward_only_case) == [False, True]


def _carveout_seen_by_the_stages() -> tuple[set, object]:
    """The SM carveout each stage forward and backward ran under, and the one after the step."""
    import copy

    from .parity import make_batch, plan_for
    ref = make_model("llama")
    pm = parallelize(copy.deepcopy(ref), build_mesh(pp=2),
                     plan_for("llama", micro_batch_size=2, pipeline_sm_carveout=3))
    seen = set()
    for m in pm.stage_modules:
        m.register_forward_pre_hook(lambda mod, args: seen.add(torch._C._get_sm_carveout_experimental()))
        m.register_full_backward_pre_hook(lambda mod, g: seen.add(torch._C._get_sm_carveout_experimental()))
    x, y = make_batch(TINY_LLAMA.vocab_size, 4, 16)
    pm.forward_backward(x, y)
    return seen, torch._C._get_sm_carveout_experimental()


def test_pipeline_sm_carveout_holds_inside_the_step_only() -> None:
    """plan.pipeline_sm_carveout: cuBLAS targets that many fewer SMs while the schedule runs
    (every stage's forward and backward), and the setting before the step is back after it."""
    for seen, after in run_distributed(2, _carveout_seen_by_the_stages):
        assert seen == {3} and after is None, (seen, after)


@pytest.mark.parametrize("value", [-1, 65, True, 1.5])
def test_pipeline_sm_carveout_is_checked(value) -> None:
    with pytest.raises(ValueError, match="pipeline_sm_carveout"):
        ParallelPlan(pipeline_sm_carveout=value)
