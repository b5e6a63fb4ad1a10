"""Our MoE Llama and transformers' Mixtral, both ways: names, expert layout and config.

A Mixtral layer is our Llama layer whose feed-forward is a routed MoE (softmax router,
top-k renormalized, dropless, no shared expert). In the folder ``save_pretrained`` writes
(transformers 4 and 5 alike; transformers 5 fuses the experts only in memory), per layer ``L``:

=====================================================  ==========================================
Hugging Face (``MixtralForCausalLM``)                   ours (``models/llama.py`` + ``models/moe.py``)
=====================================================  ==========================================
model.layers.L.block_sparse_moe.gate.weight (E, dim)   layers.L.feed_forward.router.gate.weight
model.layers.L.block_sparse_moe.experts.e.w1.weight    layers.L.feed_forward.w1[e] (dim, F), transposed
  (F, dim): the gate projection
...experts.e.w3.weight (F, dim): the up projection     layers.L.feed_forward.w3[e] (dim, F), transposed
...experts.e.w2.weight (dim, F)                        layers.L.feed_forward.w2[e] (F, dim), transposed
=====================================================  ==========================================

Attention, norms, embedding and head are the Llama names (``hf.py``, with its rotary row
permutation). Our flavours Mixtral cannot express -- dense layers, shared experts, sigmoid
scores, un-normalized top-k weights, an expert bias -- are a ``ValueError`` on export, as a
Mixtral config with a sliding window shorter than its context is on import. The balancing
loss is a training setting, not part of the weights: import reads ``router_aux_loss_coef``
(on when ``output_router_logits``, weighted as ``plans/hf_moe.py`` says) and export writes
ours back the same way.
"""

from __future__ import annotations

import re
from typing import Any

from ..models.llama import ModelArgs
from ..models.moe import MoEArgs

_EXPERT_RE = re.compile(r"^layers\.(\d+)\.feed_forward\.(w[123])$")
ROUTER = ("feed_forward.router.gate.weight", "block_sparse_moe.gate.weight")
EXPERT_BIAS = "feed_forward.router.expert_bias"  # our buffer; Mixtral has none (kept zero)


def check_mixtral_args(args: ModelArgs) -> None:
    """Our MoE flavour must be one a MixtralForCausalLM computes."""
    m = args.moe
    wrong = {"dense layers (n_dense_layers)": args.n_dense_layers != 0,
             "shared experts (n_shared_experts)": m.n_shared_experts != 0,
             f"score_func={m.score_func!r} (Mixtral: softmax)": m.score_func != "softmax",
             "route_norm=False (Mixtral renormalizes the top-k weights)": not m.route_norm and m.top_k > 1,
             "an expert bias (aux-loss-free balancing)": m.expert_bias}
    bad = [what for what, is_bad in wrong.items() if is_bad]
    if bad:
        raise ValueError(f"this MoE model has {', '.join(bad)}, which a Hugging Face MixtralForCausalLM cannot "
                         f"express: only Mixtral-shaped MoE flavours go to or come from Hugging Face")


def expert_param(name: str) -> tuple[int, str] | None:
    """(layer, our projection) of a routed-expert parameter name, else None."""
    m = _EXPERT_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def expert_key(layer: int, proj: str, e: int) -> str:
    """Mixtral's tensor of expert ``e``'s projection ``proj`` (w1/w3/w2: the same letters as ours)."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{e}.{proj}.weight"


def mixtral_config(args: ModelArgs, llama: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of a ``MixtralForCausalLM`` from the Llama config of the same args."""
    check_mixtral_args(args)
    m = args.moe
    n_moe = sum(args.is_moe_layer(i) for i in range(args.n_layers))
    balance = m.load_balance == "aux_loss" and m.aux_loss_coeff > 0
    if m.load_balance == "seq_aux_loss" or m.z_loss_coeff:
        raise ValueError("a sequence-level aux loss or a z-loss has no Mixtral config entry: set them off "
                         "(load_balance='aux_loss' or 'none', z_loss_coeff=0) to export")
    cfg = {k: v for k, v in llama.items() if k not in ("mlp_bias", "head_dim")}
    return cfg | {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                  "intermediate_size": m.hidden_dim, "num_local_experts": m.n_experts,
                  "num_experts_per_tok": m.top_k, "output_router_logits": balance,
                  "router_aux_loss_coef": m.aux_loss_coeff * n_moe / m.top_k if balance else 0.001,
                  "router_jitter_noise": 0.0, "sliding_window": None}


def moe_args_from_mixtral(config: dict[str, Any]) -> dict[str, Any]:
    """ModelArgs fields of a Mixtral ``config.json`` (its checks: the module docstring)."""
    window, context = config.get("sliding_window"), config.get("max_position_embeddings", 0)
    if window is not None and window < context:
        raise ValueError(f"config.json: sliding_window={window} is shorter than max_position_embeddings="
                         f"{context}; our Llama attends to the whole causal prefix")
    top_k, layers = config.get("num_experts_per_tok", 2), config["num_hidden_layers"]
    coeff = float(config.get("router_aux_loss_coef", 0.0) or 0.0)
    balance = bool(config.get("output_router_logits")) and coeff > 0
    moe = MoEArgs(n_experts=config["num_local_experts"], top_k=top_k, hidden_dim=config["intermediate_size"],
                  load_balance="aux_loss" if balance else "none",
                  aux_loss_coeff=coeff * top_k / layers if balance else 0.0)
    return {"moe": moe, "n_dense_layers": 0}
