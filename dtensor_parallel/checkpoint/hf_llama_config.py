"""A Hugging Face Llama (or Mixtral: ``hf_mixtral.py``) ``config.json`` and our ``ModelArgs``,
both ways.

RoPE settings come in two formats, both read:

- transformers 5 writes ``"rope_parameters": {"rope_type", "rope_theta", "factor", ...}``;
- transformers 4 (and Meta's converted releases) wrote ``"rope_theta"`` at the top level and
  ``"rope_scaling": {"rope_type" | "type", "factor", ...}`` or null.

RoPE types our Llama computes: ``default``; ``llama3`` (Llama 3.1's smooth per-frequency
scaling: factor, low/high frequency factors, original context); ``linear`` (every
frequency divided by ``factor``: positions interpolated). ``dynamic`` NTK, ``yarn``,
``longrope`` and any other type are a ``ValueError`` naming the key: their tables depend on
the sequence length or scale the attention, which our Llama does not; a transformers model
through ``parallelize()`` runs them with transformers' own RoPE. Every other entry that
changes the numerics and that our Llama does not have (biases, another activation, a
head size other than hidden / heads, a partial rotary factor, dropout) is refused the same
way: an import that silently computed something else would be worse than none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..models.llama import ModelArgs
from .hf_mixtral import mixtral_config, moe_args_from_mixtral
from .safetensors_dir import CONFIG_FILE

#: the RoPE dict's keys we read, per type (``type`` is transformers 4's old spelling)
_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
    "linear": {"rope_type", "type", "rope_theta", "factor"},
}
_FIX = ("load the checkpoint with transformers (AutoModelForCausalLM) and parallelize that model, "
        "which keeps transformers' own implementation")


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """``config.json`` of a ``LlamaForCausalLM`` with these args (RoPE in both formats:
    transformers 5 reads ``rope_parameters``, older readers the top-level keys)."""
    scaling = None
    if args.rope_scaling_factor is not None:
        scaling = {"rope_type": args.rope_scaling_type, "factor": args.rope_scaling_factor}
        if args.rope_scaling_type == "llama3":
            scaling |= {"low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                        "original_max_position_embeddings": args.rope_original_max_len}
    parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": args.rope_theta}
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
            "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
            "rms_norm_eps": args.norm_eps, "rope_parameters": parameters, "rope_theta": args.rope_theta,
            "rope_scaling": scaling, "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "torch_dtype": str(dtype).removeprefix("torch.")}
    return mixtral_config(args, llama) if args.moe is not None else llama


def rope_args(config: dict[str, Any]) -> dict[str, Any]:
    """The ModelArgs RoPE fields of a config in either format (module docstring)."""
    if config.get("rope_parameters") is not None:
        where, rope = "rope_parameters", dict(config["rope_parameters"])
        if any(isinstance(v, dict) for v in rope.values()):
            raise ValueError(f"config.json: rope_parameters per layer type ({sorted(rope)}): not a Llama; {_FIX}")
        theta = rope.get("rope_theta", config.get("rope_theta"))
        if theta is None:
            raise ValueError("config.json: rope_parameters has no rope_theta (and there is no top-level one): "
                             "the RoPE base is unknown, and guessing 10000 would be silently wrong")
    else:
        where, rope = "rope_scaling", dict(config.get("rope_scaling") or {})
        theta = config.get("rope_theta", 10000.0)  # transformers 4's LlamaConfig default
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in _ROPE_KEYS:
        raise ValueError(f"config.json: {where}.rope_type={rtype!r}: our Llama computes RoPE of types "
                         f"{sorted(_ROPE_KEYS)}; {_FIX}")
    unknown = sorted(k for k, v in rope.items() if k not in _ROPE_KEYS[rtype] and v is not None)
    if unknown:
        raise ValueError(f"config.json: {where}.{unknown[0]}={rope[unknown[0]]!r} is not part of {rtype!r} RoPE as "
                         f"our Llama computes it; {_FIX}")
    kw: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling_factor": None}
    if rtype == "default":
        return kw
    for key in _ROPE_KEYS[rtype] - {"rope_type", "type", "rope_theta"}:
        if rope.get(key) is None:
            raise ValueError(f"config.json: {where} of type {rtype!r} lacks {key!r}")
    kw |= {"rope_scaling_factor": float(rope["factor"]), "rope_scaling_type": rtype}
    if rtype == "llama3":
        kw |= {"rope_low_freq_factor": float(rope["low_freq_factor"]),
               "rope_high_freq_factor": float(rope["high_freq_factor"]),
               "rope_original_max_len": int(rope["original_max_position_embeddings"])}
    return kw


def _refuse_other_numerics(config: dict[str, Any]) -> None:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("model_type", "llama") not in ("llama", "mixtral"):
        raise ValueError(f"config.json: model_type={config['model_type']!r}, not 'llama' or 'mixtral'; {_FIX}")
    if config.get("head_dim") is not None and config["head_dim"] != hidden // heads:
        raise ValueError(f"config.json: head_dim={config['head_dim']} != hidden_size / num_attention_heads = "
                         f"{hidden // heads}; {_FIX}")
    checks = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "partial_rotary_factor": 1.0,
              "attention_dropout": 0.0}
    for key, ours in checks.items():
        if config.get(key) is not None and config[key] != ours:
            raise ValueError(f"config.json: {key}={config[key]!r}, but our Llama has {key}={ours!r}; {_FIX}")


def model_args_from_hf(config: dict[str, Any] | str | Path, **overrides) -> ModelArgs:
    """ModelArgs of a Hugging Face Llama ``config.json`` (a dict, the file, or its directory)."""
    if not isinstance(config, dict):
        p = Path(config)
        config = json.loads((p / CONFIG_FILE if p.is_dir() else p).read_text())
    _refuse_other_numerics(config)
    heads = config["num_attention_heads"]
    kw = dict(dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=heads,
              n_kv_heads=config.get("num_key_value_heads") or heads, vocab_size=config["vocab_size"],
              ffn_hidden=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6),
              max_seq_len=config.get("max_position_embeddings", 8192), **rope_args(config))
    if config.get("model_type") == "mixtral":
        kw |= moe_args_from_mixtral(config)
    return ModelArgs(**{**kw, **overrides})


def check_config(config: dict[str, Any] | None, args: ModelArgs, path: Path) -> None:
    """A checkpoint's config against the model it is loaded into: shapes, norm epsilon and
    every RoPE setting, in either format (a config without RoPE keys means theta 10000)."""
    if config is None:
        return
    _refuse_other_numerics(config)
    ours = hf_config(args)
    if config.get("model_type", "llama") != ours["model_type"]:
        raise ValueError(f"{path}: model_type={config.get('model_type', 'llama')!r} but this model is a "
                         f"{ours['model_type']!r} (dense Llama / MoE Mixtral): the checkpoint is of another model")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "num_local_experts", "num_experts_per_tok"):
        if key not in config or key not in ours:
            continue
        if float(config[key]) != float(ours[key]):
            raise ValueError(f"{path}: {key}={config[key]} but this model has {ours[key]}: the checkpoint is of "
                             f"another model shape")
    theirs = rope_args(config)
    for key, value in theirs.items():
        mine = getattr(args, key)
        if key != "rope_scaling_type" or theirs.get("rope_scaling_factor") is not None:
            if mine != value:
                raise ValueError(f"{path}: RoPE {key}={value} but this model has {mine}: build the model with "
                                 f"model_args_from_hf(checkpoint)")
