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
from .hf_parity import ARCHS, USER_RULES, hf_one_step_parity, make_hf_model
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
    # 4 layers: tied copies on pp ranks 0 and 3 (their own group), and on one rank (V shape)
    "pp4_interleaved": (4, {"pp": 4}, {"virtual_stages": 2, **PP}),
    "pp2_zbv": (2, {"pp": 2}, {"pipeline_schedule": "zbv", **PP}),
}
LAYERS = {"pp4_interleaved": 8, "pp2_zbv": 4}
# every architecture (Llama tied and untied, Mistral, Qwen2's biases, Qwen3's per-head
# norms) on every layout; the tied Llama also on interleaved PP4 (its copies on pp ranks 0
# and 3, their own group) and ZBV (both copies on one rank)
MATRIX = [name for name in LAYOUTS if name not in ("pp4_interleaved", "pp2_zbv")]
CASES = [(arch, name) for arch in ARCHS for name in MATRIX] + [
    ("llama_tied", "pp4_interleaved"), ("llama_tied", "pp2_zbv"), ("llama", "pp2_zbv")]


@pytest.mark.parametrize("arch,layout", CASES, ids=[f"{a}-{n}" for a, n in CASES])
def test_hf_model_matches_one_device(arch: str, layout: str) -> None:
    world, mesh_kwargs, plan_kwargs = LAYOUTS[layout]
    losses = run_distributed(world, hf_one_step_parity, arch, mesh_kwargs, plan_kwargs,
                             layers=LAYERS.get(layout, 2))
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
    # tied embedding and head with a rule that would shard the head's copy differently
    ("llama_tied", {"tp": 2, "dp_shard": 2},
     r"model.embed_tokens.weight and lm_head.weight are one parameter .* Got \{'lm_head.weight': 'Colwise'\}"),
])
def test_hf_errors_before_any_collective(arch: str, mesh_kwargs: dict, match: str) -> None:
    from dtensor_parallel.plans import hf_plan

    fake_world(4)
    model = _meta_hf(arch, num_key_value_heads=2) if mesh_kwargs.get("tp") == 4 else _meta_hf(arch)
    rules = None
    if arch == "llama_tied":
        rules = hf_plan(model)["rules"] | {"lm_head": "colwise"}
    with CommDebugMode() as comm, pytest.raises(ValueError, match=match):
        parallelize(model, build_mesh(**mesh_kwargs), ParallelPlan(micro_batch_size=1, rules=rules))
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


@pytest.mark.parametrize("arch,overrides,window", [
    ("mistral", {"sliding_window": 8}, 8),
    ("qwen2", {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 1}, 8),
    ("qwen2", {"sliding_window": 8, "use_sliding_window": False}, None),
])
def test_sliding_window_shorter_than_the_sequence_is_refused(arch: str, overrides: dict, window) -> None:
    """The whole sequence against the window, before any collective (under CP each rank
    sees only s/cp keys, so the attention call alone could not tell)."""
    from dtensor_parallel.plans.hf import hf_attention_window

    fake_world(2)
    model = _meta_hf(arch, **overrides)
    assert hf_attention_window(model) == window
    pm = parallelize(model, build_mesh(cp=2), ParallelPlan())
    x = torch.zeros(2, 16, dtype=torch.long)
    if window is None:
        return
    with CommDebugMode() as comm, pytest.raises(ValueError, match=r"sequence length 16 is longer than .* \(8 tokens\)"):
        pm.forward_backward(x, x)
    assert comm.get_total_counts() == 0


@pytest.mark.parametrize("layout", ["tp2_sp_fsdp2", "cp2_tp2_sp", "cp2_fsdp2"])
def test_other_transformers_lm_with_user_rules(layout: str) -> None:
    """An architecture without a built-in plan (Granite: multipliers on the embedding, the
    residuals, the attention scores and the logits) through blocks and rules a user writes:
    our attention, positions and head counts still apply, and it matches one device."""
    world, mesh_kwargs, plan_kwargs = LAYOUTS[layout]
    plan_kwargs = {**plan_kwargs, "blocks": "model.layers.*", "rules": USER_RULES}
    losses = run_distributed(world, hf_one_step_parity, "granite", mesh_kwargs, plan_kwargs)
    assert len(set(losses)) == 1


@pytest.mark.parametrize("arch,mesh_kwargs,match", [
    # Granite's forward scales the embedding output: a later stage would scale its input again
    ("granite", {"pp": 2}, r"pp: GraniteForCausalLM.forward changes the embedding's output before the first block"),
    ("gemma2", {"tp": 2}, r"attn_logit_softcapping=50.0 .* not supported"),
])
def test_what_an_unsupported_architecture_would_get_wrong_is_refused(arch: str, mesh_kwargs: dict, match: str) -> None:
    fake_world(2)
    rules = USER_RULES if arch == "granite" else {}
    with CommDebugMode() as comm, pytest.raises(ValueError, match=match):
        parallelize(_meta_hf(arch), build_mesh(**mesh_kwargs),
                    ParallelPlan(blocks="model.layers.*", rules=rules or None, micro_batch_size=1))
    assert comm.get_total_counts() == 0
