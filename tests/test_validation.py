"""Bad input is a ValueError that names the fix, raised before any collective."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode

from dtensor_parallel import ParallelPlan, build_mesh, parallelize
from dtensor_parallel.models import Llama, ModelArgs

from .local_ranks import fake_world, simulated_ranks
from .parity import TINY_LLAMA, make_model, plan_for
from .toy_gpt import TOY_BLOCKS, TOY_RULES


def _raises_before_collectives(model, mesh, plan, match: str) -> None:
    with CommDebugMode() as comm, pytest.raises(ValueError, match=match):
        parallelize(model, mesh, plan)
    assert comm.get_total_counts() == 0
    assert all(not hasattr(p, "device_mesh") for p in model.parameters()), "model was modified"


def _llama(**overrides) -> Llama:
    with torch.device("meta"):
        return Llama(ModelArgs(**{**TINY_LLAMA.__dict__, **overrides}))


@pytest.mark.parametrize("overrides,tp,match", [
    ({"n_heads": 6, "n_kv_heads": 6, "dim": 48}, 4, r"tp=4 does not divide the 6 attention heads"),
    ({"n_heads": 8, "n_kv_heads": 2}, 4, r"tp=4 does not divide the 2 kv heads"),
    ({"vocab_size": 130}, 4, r"does not divide tok_embeddings.num_embeddings=130 \(the vocab size\).*pad"),
    ({"multiple_of": 6, "dim": 64}, 4, r"does not divide layers.0.feed_forward.w1.out_features=174 \(the hidden size\)"),
])
def test_degree_that_does_not_divide(overrides: dict, tp: int, match: str) -> None:
    fake_world(tp)
    _raises_before_collectives(_llama(**overrides), build_mesh(tp=tp), ParallelPlan(), match)


def test_rule_that_matches_nothing() -> None:
    fake_world(2)
    rules = {**TOY_RULES, "h.*.attn.qkv": "colwise"}
    _raises_before_collectives(make_model("toy"), build_mesh(tp=2),
                               ParallelPlan(blocks=TOY_BLOCKS, rules=rules),
                               r"'h\.\*\.attn\.qkv' matches no module.*c_q")


def test_blocks_glob_that_matches_nothing() -> None:
    fake_world(2)
    _raises_before_collectives(make_model("toy"), build_mesh(dp_shard=2),
                               ParallelPlan(blocks="layers.*", rules=TOY_RULES), r"blocks='layers\.\*' matches no")


def test_user_model_without_blocks() -> None:
    fake_world(2)
    _raises_before_collectives(make_model("toy"), build_mesh(dp_shard=2), ParallelPlan(rules=TOY_RULES),
                               r"name its repeated blocks")


def test_sequence_parallel_without_tp() -> None:
    fake_world(2)
    _raises_before_collectives(_llama(), build_mesh(dp_shard=2), ParallelPlan(sequence_parallel=True),
                               r"sequence_parallel=True needs tp > 1")


def test_style_on_wrong_module_type() -> None:
    fake_world(2)
    rules = {**TOY_RULES, "h.*.mlp": "colwise"}
    _raises_before_collectives(make_model("toy"), build_mesh(tp=2), ParallelPlan(blocks=TOY_BLOCKS, rules=rules),
                               r"needs a Linear")


def test_module_matched_twice() -> None:
    fake_world(2)
    rules = {**TOY_RULES, "h.0.attn.c_q": "rowwise"}
    _raises_before_collectives(make_model("toy"), build_mesh(tp=2), ParallelPlan(blocks=TOY_BLOCKS, rules=rules),
                               r"matched by two TP rules")


def test_global_batch_not_divisible() -> None:
    fake_world(4)
    _raises_before_collectives(_llama(), build_mesh(dp_shard=4),
                               ParallelPlan(micro_batch_size=3, global_batch_size=18),
                               r"global_batch_size\(18\) is not a multiple of micro_batch_size\(3\) \* dp\(4\) = 12")


def test_unknown_style_name() -> None:
    fake_world(2)
    with pytest.raises(ValueError, match="unknown style 'columnwise'"):
        parallelize(make_model("toy"), build_mesh(tp=2),
                    ParallelPlan(blocks=TOY_BLOCKS, rules={**TOY_RULES, "lm_head": "columnwise"}))


def test_sequence_not_divisible_under_sp() -> None:
    ref = make_model("llama")
    x = torch.zeros(2, 15, dtype=torch.long)
    with simulated_ranks(2):
        pm = parallelize(copy.deepcopy(ref), build_mesh(tp=2), plan_for("llama", sequence_parallel=True))
        with CommDebugMode() as comm, pytest.raises(ValueError, match="sequence length 15 is not divisible by tp=2"):
            pm.forward_backward(x, x)
    assert comm.get_total_counts() == 0


def test_local_batch_mismatch_with_global_batch() -> None:
    ref = make_model("llama")
    x = torch.zeros(3, 16, dtype=torch.long)
    with simulated_ranks(2):
        pm = parallelize(copy.deepcopy(ref), build_mesh(tp=2), plan_for("llama", global_batch_size=4))
        with pytest.raises(ValueError, match=r"local batch 3 \* dp\(1\) = 3 != global_batch_size\(4\)"):
            pm.forward_backward(x, x)


@pytest.mark.parametrize("kwargs,match", [
    ({"recompute": "partial"}, "recompute='partial'"),
    ({"kernels": "cuda"}, "kernels='cuda'"),
    ({"kernels": {"attn": "triton"}}, "unknown kernel families"),
    ({"micro_batch_size": 3, "global_batch_size": 8}, r"global_batch_size\(8\) is not a multiple"),
    ({"mixed_precision": "fp16"}, "mixed_precision='fp16'"),
    ({"moe_recv_bound": 0}, r"moe_recv_bound=0 must be a number > 0"),
    ({"moe_recv_bound": -1.25}, r"moe_recv_bound=-1.25 must be a number > 0"),
    ({"moe_recv_bound": float("nan")}, r"moe_recv_bound=nan must be a number > 0"),
    ({"moe_recv_bound": float("inf")}, r"moe_recv_bound=inf must be a number > 0"),
    ({"moe_recv_bound": True}, r"moe_recv_bound=True must be a number > 0"),
    ({"moe_recv_bound": "1.25"}, r"moe_recv_bound='1.25' must be a number > 0"),
])
def test_plan_rejects_bad_fields(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ParallelPlan(**kwargs)


def test_plan_moe_recv_bound_reaches_the_dispatcher() -> None:
    """The plan's receive bound (a recipe's [plan] key too) is the dispatcher's; None by default."""
    from dtensor_parallel.expert_parallel import ParallelDispatch
    from dtensor_parallel.trainer.config import load_config

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "debug_moe.toml"
    assert ParallelPlan().moe_recv_bound is None and ParallelPlan(moe_recv_bound=1).moe_recv_bound == 1
    cfg = load_config(recipe, overlay={"plan": {"moe_recv_bound": 1.25}})
    assert cfg.parallel_plan().moe_recv_bound == 1.25 and load_config(recipe).plan.moe_recv_bound is None
    with pytest.raises(ValueError, match=r"moe_recv_bound=0\.0 must be a number > 0"):  # (a float field)
        load_config(recipe, overlay={"plan": {"moe_recv_bound": 0}})
    with pytest.raises(ValueError, match=r"recv_bound=0 must be > 0.*ParallelPlan.moe_recv_bound"):
        ParallelDispatch(recv_bound=0)


def test_plan_kernels_switch_normalizes() -> None:
    assert ParallelPlan(kernels="triton").kernel_backend("attention") == "triton"
    plan = ParallelPlan(kernels={"moe_dispatch": "auto"})
    assert plan.kernel_backend("moe_dispatch") == "auto" and plan.kernel_backend("attention") == "torch"


def test_triton_kernels_off_gpu_is_an_error(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fake_world(2)
    _raises_before_collectives(_llama(), build_mesh(cp=2), ParallelPlan(kernels="triton"),
                               r"kernels\['attention'\]='triton' needs CUDA devices.*kernels='torch'")


def test_forward_takes_any_batch_without_pipeline() -> None:
    """global_batch_size constrains forward_backward, not an inference forward."""
    ref = make_model("llama")
    x = torch.zeros(3, 16, dtype=torch.long)
    with simulated_ranks(2):
        pm = parallelize(copy.deepcopy(ref), build_mesh(tp=2), plan_for("llama", global_batch_size=4))
        assert pm(x).shape == (3, 16, TINY_LLAMA.vocab_size)


def test_user_model_heads_that_tp_does_not_divide_are_found_by_the_shape_probe() -> None:
    """No config, no head counts in the plan: 2 heads of 16 features at tp=4 divide every
    linear's width (32 / 4) but not the heads; a meta-device probe of one block turns the
    view error the first forward would raise into a ValueError naming the module."""
    from .toy_gpt import ToyGPT

    fake_world(4)
    _raises_before_collectives(ToyGPT(d=32, n_heads=2), build_mesh(tp=4),
                               ParallelPlan(blocks=TOY_BLOCKS, rules=TOY_RULES),
                               r"tp=4: h\.0\.attn fails with the shapes .*RuntimeError: shape .*num_heads=")
    fake_world(2)  # tp=2 divides the 2 heads: the probe passes, the layout builds
    parallelize(ToyGPT(d=32, n_heads=2), build_mesh(tp=2), ParallelPlan(blocks=TOY_BLOCKS, rules=TOY_RULES))
