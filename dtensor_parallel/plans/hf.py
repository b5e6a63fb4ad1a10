"""Built-in plans for Hugging Face ``transformers`` causal LMs, chosen from the model's class.

``transformers`` is never imported here at module import time: a model that is a
transformers model already brought it in, and the plan only reads module names and the
config. Supported decoder families (same module names, read from transformers 5.x):

===========  ==================================================================
Llama        q/k/v/o projections, gate/up/down MLP, RMSNorms; Llama 3.2 1B/3B tie
             the head to the embedding (refused under TP and PP, see below)
Mistral      the same; a sliding window longer than the sequence is plain causal
Qwen2        the same with q/k/v biases (colwise shards them with the weights)
Qwen3        the same with per-head ``q_norm`` / ``k_norm`` (style ``head_norm``)
Mixtral,     MoE layers (``hf_moe.py``: transformers' sparse blocks computed as our MoE
Qwen2-MoE,   layers, so expert parallelism and the ``moe`` TP style apply); Qwen2-MoE's
Qwen3-MoE    shared expert colwise/rowwise, Qwen3-MoE's q/k norms as Qwen3's
===========  ==================================================================

Sequence parallelism starts at the first decoder layer's input, not at the embedding:
transformers builds ``position_ids``, the rotary table and the causal mask from the
embedding output's length, so that output stays whole (an all-reduce instead of a
reduce-scatter, once per step) and the first layer takes its sequence shard (a local slice).

Any other transformers decoder-only causal LM (``...ForCausalLM``) takes ``blocks`` and
``rules`` from the user (the module names of this family are a starting point) and gets
everything else here as the supported ones do: our attention, no KV cache, full or zigzag
``position_ids``, head counts from its config, and a ``ValueError`` before any collective
for what the attention below would not compute (soft-capping, bidirectional attention).

Attention runs through our own entry in transformers' registry (``AttentionInterface``):
causal SDPA with GQA, no mask tensor (``create_causal_mask`` returns None for an
implementation it has no mask function for). The mask is what every layout needs: it does
not depend on the sequence length a rank sees (SP, CP, PP stages), and ``position_ids`` that
are not ``arange`` (CP's zigzag shards) are never taken for packed documents. Under
context parallelism each attention module is an attention call site, so the same SDPA call
becomes the ring there. Padding masks are not supported (the trainer packs sequences);
packed documents are: ``document_ids``, a keyword argument of the model's forward that
transformers hands down to the attention function (``TransformersKwargs``), where it
becomes ``document_causal_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..document_attention import document_causal_attention
from .hf_moe import HF_MOE_LMS, feed_forward_rules

ATTENTION_NAME = "dtensor_parallel_causal"

#: class name -> whether its attention has per-head q/k norms
HF_CAUSAL_LMS: dict[str, bool] = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": False,
    "Qwen3ForCausalLM": True,
    **HF_MOE_LMS,  # Mixtral, Qwen2-MoE, Qwen3-MoE (hf_moe.py)
}


def is_transformers_causal_lm(model: nn.Module) -> bool:
    """Any transformers decoder-only causal LM (``...ForCausalLM``, not encoder-decoder): it
    gets our causal attention and the sequence checks below whether or not the library has a
    built-in plan for it (other architectures bring their own blocks and rules)."""
    cfg = getattr(model, "config", None)
    return (type(model).__name__.endswith("ForCausalLM") and cfg is not None
            and hasattr(model, "set_attn_implementation") and not getattr(cfg, "is_encoder_decoder", False))


def is_hf_causal_lm(model: nn.Module) -> bool:
    """A transformers causal LM the library has a built-in plan for."""
    return type(model).__name__ in HF_CAUSAL_LMS and is_transformers_causal_lm(model) and hasattr(model, "model")


def hf_head_counts(model: nn.Module) -> dict:
    """Head counts from a transformers config (for architectures without a built-in plan:
    their blocks and rules come from the user, the divisibility checks from the config)."""
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    if heads is None:
        return {}
    return {"num_heads": heads, "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads}


def check_hf_attention(model: nn.Module) -> None:
    """What our causal attention would silently not compute, from the config: refused before
    any collective."""
    cfg = model.config
    for key in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(cfg, key, None):
            raise ValueError(f"{type(model).__name__}: config.{key}={getattr(cfg, key)} (tanh soft-capping of the "
                             f"attention scores) is not supported under parallelize, whose attention is plain "
                             f"causal SDPA")
    if getattr(cfg, "is_causal", True) is False:
        raise ValueError(f"{type(model).__name__}: config.is_causal=False (bidirectional attention) is not "
                         f"supported under parallelize, whose attention is causal")


def hf_plan(model: nn.Module, sequence_parallel: bool = False) -> dict:
    """``{"blocks", "rules", "num_heads", "num_kv_heads"}`` for a supported transformers LM."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput

    from ..tensor_parallel.styles import VocabEmbedding

    cfg = model.config
    attn = "model.layers.*.self_attn"
    rules: dict = {
        # whole (Replicate) output: transformers derives positions and masks from its length
        "model.embed_tokens": VocabEmbedding(output_layout=Replicate()),
        "model.layers.*.input_layernorm": "norm",
        attn: "attention",
        f"{attn}.q_proj": "colwise",
        f"{attn}.k_proj": "colwise",
        f"{attn}.v_proj": "colwise",
        f"{attn}.o_proj": "rowwise",
        **feed_forward_rules(model),  # dense MLPs, or MoE layers (hf_moe.py)
        "model.norm": "norm",
        "lm_head": "head",
    }
    if sequence_parallel:
        # the first layer takes this rank's sequence shard (a local slice): its norm expects
        # the residual stream sequence-sharded
        rules["model.layers.0"] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                     use_local_output=True)
    if HF_CAUSAL_LMS[type(model).__name__]:
        rules |= {f"{attn}.q_norm": "head_norm", f"{attn}.k_norm": "head_norm"}
    return {"blocks": "model.layers.*", "rules": rules, "num_heads": cfg.num_attention_heads,
            "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads}


def hf_attention_window(model: nn.Module) -> int | None:
    """The shortest sliding attention window of any layer (None: every layer attends to the
    whole causal prefix). Mistral windows every layer (``sliding_window``); Qwen2/Qwen3 only
    the layers ``layer_types`` marks ``sliding_attention`` (``use_sliding_window``)."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def prepare_hf_model(model: nn.Module) -> None:
    """Make a transformers LM fit for training under parallelize (local, before any
    collective): our causal attention registered and selected; no KV cache."""
    try:
        from transformers import AttentionInterface
    except ImportError as e:  # a transformers model without transformers cannot happen; be clear anyway
        raise ImportError("transformers models need the transformers package: pip install transformers") from e
    AttentionInterface.register(ATTENTION_NAME, causal_attention)
    model.set_attn_implementation(ATTENTION_NAME)
    model.config.use_cache = False


def causal_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q (b, hq, s, d), k/v (b, hkv, s, d) ->
    ((b, s, hq, d), None). Causal, GQA without repeating k/v; the mask tensor is ignored
    (it is None: no mask function is registered for this implementation)."""
    if dropout:
        raise NotImplementedError(f"{type(module).__name__}: attention dropout {dropout} is not supported "
                                  f"under parallelize; set config.attention_dropout = 0.0")
    for name in ("softcap", "s_aux", "sinks"):  # what plain causal SDPA would silently leave out
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{type(module).__name__}: attention with {name!r} (soft-capping or "
                                      f"attention sinks) is not supported under parallelize")
    if sliding_window is not None and key.shape[2] > sliding_window:  # (the whole sequence is checked
        # before any collective, ParallelModel._check_inputs; this is the local backstop)
        raise NotImplementedError(f"{type(module).__name__}: a sliding window of {sliding_window} tokens is "
                                  f"shorter than this sequence ({key.shape[2]}): not supported under parallelize")
    document_ids = kwargs.get("document_ids")  # packed documents: ParallelModel's keyword argument,
    if document_ids is not None:  # handed down by the model's forward, its layers and attention
        out = document_causal_attention(query, key, value, document_ids, scale=scaling,
                                        position_ids=kwargs.get("position_ids"))
    else:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None
