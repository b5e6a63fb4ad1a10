"""transformers causal LMs through parallelize() with no rules written: each layout against
the same model on one device (loss, every gradient, every parameter after an AdamW step),
and every unsupported case a ValueError before any collective (issue 18)."""

from __future__ import annotations

import pytest
import torch
import transformers  # the test extra: a missing install fails collection instead of skipping
from torch.distributed.tensor.debug import CommDebugMode

from dtensor_parallel import ParallelPlan, build_mesh, parallelize

from .harness import run_distributed
from .hf_parity import ARCHS, hf_one_step_parity, make_hf_model
from .local_ranks import fake_world

PP = {"micro_batch_size": 1}
LAYOUTS = {  # name: (world, mesh, plan)
    "fsdp4": (4, {"dp_shard": 4}, {}),
    "tp2_fsdp2": (4, {"tp": 2, "dp_shard": 2}, {}),
    "tp2_sp_fsdp2": (4, {"tp": 2, "dp_shard": 2}, {"sequence_parallel": True}),
    "tp4_sp": (4, {"tp": 4}, {"sequence_parallel": True}),
    "cp2": (2, {"cp": 2}, {}),
    "cp2_tp2_sp": (4, {"cp": 2, "tp": 2}, {"sequence_parallel": True}),
    "cp2_fsdp2": (4, {"cp": 2, "dp_shard": 2}, {}),
    "pp2": (2, {"pp": 2}, PP),
    "pp2_tp2_sp": (4, {"pp": 2, "tp": 2}, {"sequence_parallel": True, **PP}),
    "pp2_fsdp2": (4, {"pp": 2, "dp_shard": 2}, PP),
    "cp2_pp2": (4, {"cp": 2, "pp": 2}, PP),
}
# every layout on Llama; each other architecture on the layouts that exercise what it adds
# (Qwen2's biases and Qwen3's per-head norms under TP and SP, positions under CP and PP)
CASES = [("llama", name) for name in LAYOUTS] + [
    ("qwen3", "tp2_sp_fsdp2"), ("qwen3", "cp2_tp2_sp"), ("qwen3", "pp2_tp2_sp"), ("qwen2", "tp2_sp_fsdp2"),
    ("mistral", "tp2_sp_fsdp2"), ("llama_tied", "fsdp4"), ("llama_tied", "cp2_fsdp2")]


@pytest.mark.parametrize("arch,layout", CASES, ids=[f"{a}-{n}" for a, n in CASES])
def test_hf_model_matches_one_device(arch: str, layout: str) -> None:
    world, mesh_kwargs, plan_kwargs = LAYOUTS[layout]
    losses = run_distributed(world, hf_one_step_parity, arch, mesh_kwargs, plan_kwargs)
    assert len(set(losses)) == 1


def test_hf_training_tracks_one_device_for_20_steps() -> None:
    run_distributed(4, hf_one_step_parity, "qwen3", {"tp": 2, "dp_shard": 2}, {"sequence_parallel": True}, steps=20)


def _meta_hf(arch: str, **overrides):
    from .hf_parity import hf_config

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config(arch, **overrides))


@pytest.mark.parametrize("arch", ARCHS)
def test_builtin_plan_covers_every_parameter(arch: str) -> None:
    """No rules written: the plan comes from the class, and every parameter of every
    supported architecture is covered by a rule (the check that refuses a loose one runs in
    parallelize)."""
    from dtensor_parallel.plans import default_plan
    from dtensor_parallel.tensor_parallel import resolve_rules
    from dtensor_parallel.validation import check_tp_coverage

    model = _meta_hf(arch)
    plan = default_plan(model, ParallelPlan(sequence_parallel=True))
    assert plan["blocks"] == "model.layers.*" and plan["num_kv_heads"] == 4
    check_tp_coverage(model, resolve_rules(model, plan["rules"]), tp=2)
    names = {n for n, _ in model.named_parameters()}
    if arch == "qwen3":
        assert any(n.endswith("q_norm.weight") for n in names)
    if arch == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in names)


@pytest.mark.parametrize("arch,mesh_kwargs,match", [
    ("llama", {"tp": 4}, r"tp=4 does not divide the 2 kv heads"),
    ("llama_tied", {"tp": 2, "dp_shard": 2}, r"lm_head.weight is the same parameter as model.embed_tokens.weight"),
    ("llama_tied", {"pp": 2, "dp_shard": 2}, r"tied weights.*pp=2"),
])
def test_hf_errors_before_any_collective(arch: str, mesh_kwargs: dict, match: str) -> None:
    fake_world(4)
    model = _meta_hf(arch, num_key_value_heads=2) if mesh_kwargs.get("tp") == 4 else _meta_hf(arch)
    with CommDebugMode() as comm, pytest.raises(ValueError, match=match):
        parallelize(model, build_mesh(**mesh_kwargs), ParallelPlan(micro_batch_size=1))
    assert comm.get_total_counts() == 0


def test_qwen3_head_norm_without_rule_is_refused() -> None:
    """A per-head norm no rule names, under TP: its gradient would be one rank's share."""
    from dtensor_parallel.plans import hf_plan

    fake_world(2)
    model = _meta_hf("qwen3")
    rules = {k: v for k, v in hf_plan(model)["rules"].items() if not k.endswith(("q_norm", "k_norm"))}
    with pytest.raises(ValueError, match=r"no TP rule covers .*q_norm.weight.*'head_norm'"):
        parallelize(model, build_mesh(tp=2), ParallelPlan(rules=rules))


def test_model_outputs_are_understood() -> None:
    from dtensor_parallel.parallel_model import logits_of

    t = torch.zeros(2, 3, 5)
    out = transformers.modeling_outputs.CausalLMOutputWithPast(logits=t)
    assert logits_of(t) is t and logits_of(out) is t and logits_of({"logits": t}) is t and logits_of((t, None)) is t
    with pytest.raises(ValueError, match=r"returned dict with keys \['hidden'\]"):
        logits_of({"hidden": t})


def test_hf_reference_is_independent() -> None:
    """The reference runs transformers' own sdpa path; parallelize switches the parallel copy
    to our registered causal attention (and never touches the reference)."""
    import copy

    ref = make_hf_model("llama")
    model = copy.deepcopy(ref)
    fake_world(1)
    parallelize(model, build_mesh(), ParallelPlan())
    assert ref.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "dtensor_parallel_causal"
