"""Default plans of the models the library knows: blocks, rules and head counts as data.

``default_plan(model, plan)`` fills the ``ParallelPlan`` fields a user leaves as None.
Lookup order: a plan registered for the model's class (the built-in Llama); a supported
Hugging Face ``transformers`` causal LM, by its class name (``hf.py``: Llama, Mistral,
Qwen2, Qwen3; any other transformers causal LM: head counts from its config); else the model's own ``parallel_defaults()`` method, for a user's model that
carries its plan with it. Models stay plain ``nn.Module``s: they never import this package.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..models.llama import Llama
from ..plan import ParallelPlan
from .hf import hf_head_counts, hf_plan, is_hf_causal_lm, is_transformers_causal_lm
from .llama import llama_plan

PLANS: dict[type, Callable[[nn.Module], dict]] = {Llama: llama_plan}


def default_plan(model: nn.Module, plan: ParallelPlan | None = None) -> dict:
    """The plan fields the library knows for ``model`` (empty when it knows none)."""
    for cls in type(model).__mro__:
        if cls in PLANS:
            return PLANS[cls](model)
    if is_hf_causal_lm(model):
        return hf_plan(model, sequence_parallel=plan is not None and plan.sequence_parallel)
    if is_transformers_causal_lm(model):  # another architecture: its blocks and rules are the user's
        return hf_head_counts(model)
    if hasattr(model, "parallel_defaults"):
        return model.parallel_defaults()
    return {}


__all__ = ["PLANS", "default_plan", "hf_plan", "is_hf_causal_lm", "llama_plan"]
