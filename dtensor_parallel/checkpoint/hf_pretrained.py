"""A transformers model built on the meta device, parallelized, then given its weights:
random init (layout-independent) and loading a ``save_pretrained`` folder into the shards.

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    pm = parallelize(model, mesh)            # any layout; nothing allocated yet
    pm.init_weights(seed=0)                  # materialize on the mesh's device, transformers' init
    load_pretrained(pm, "path/to/folder")    # each rank reads only the slices it owns

**Init** (:func:`init_hf_weights`). Each module's parameters and buffers are drawn as full
tensors by transformers' own ``_init_weights(module)`` (its distributions: N(0,
initializer_range) for linears and embeddings, ones for norms, the rotary tables computed
from the config), under a generator seeded by ``(seed, module name)``; each rank keeps its
slice (``distribute_tensor(..., src_data_rank=None)`` slices locally). So one seed gives the
same weights in every layout, as ``init.py`` does for our own models. Cost: one module's
full tensors at a time. Non-persistent buffers (``rotary_emb.inv_freq``), which no
checkpoint holds, are made here too. Tied weights' copies on two pipeline stages are made
equal afterwards (one broadcast over the ranks holding them).

**Load** (:func:`load_pretrained`). Names are transformers' own, so a parameter's name is its
key in the folder (MoE experts: the per-expert tensors ``save_pretrained`` writes,
``hf_expert_keys.py``); a tied copy (``lm_head.weight`` with ``tie_word_embeddings``) reads its
canonical key (``model.embed_tokens.weight``), which is all ``save_pretrained`` writes. Every
check runs on the headers before the first tensor is written: a tensor of another shape, a
config of another model (sizes, heads, vocabulary, tying), a tensor the model lacks. A
parameter the folder lacks keeps its init; ``strict=True`` (default) refuses that instead,
naming it. No collective is needed: each rank reads its own boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..init import param_seed
from ..tied import to_empty_keeping_ties
from .hf_expert_keys import expert_keys, per_expert_reads, stored_names
from .safetensors_dir import HFCheckpoint, by_file, local_box

#: config entries that decide tensor shapes or numerics: a folder whose config differs is
#: another model (checked when both configs have the key)
_SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "num_local_experts",
               "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")


def is_transformers_model(module: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (or a pipeline stage copy of one)."""
    return hasattr(module, "_init_weights") and hasattr(module, "config") and hasattr(module, "post_init")


@torch.no_grad()
def init_hf_weights(stage_modules: list[nn.Module], device: torch.device, seed: int = 0,
                    skip: set[str] = frozenset()) -> None:
    """Materialize meta tensors on ``device`` and initialize every parameter and buffer of
    each stage module with transformers' ``_init_weights``, layout-independently (above).
    ``skip``: parameter names left alone (tied copies: their canonical use initializes them,
    and another stage's copy is then made equal to it)."""
    for root in stage_modules:
        materialize = any(t.is_meta for t in list(root.parameters()) + list(root.buffers()))
        if materialize:
            to_empty_keeping_ties(root, device)
        for name, module in root.named_modules():
            prefix = f"{name}." if name else ""
            params = {n: p for n, p in module.named_parameters(recurse=False) if prefix + n not in skip}
            buffers = {n: b for n, b in module.named_buffers(recurse=False) if b is not None}
            if params or buffers:
                _init_module(root, name, module, params, buffers, device, seed, materialize)


def _init_module(root: nn.Module, name: str, module: nn.Module, params: dict, buffers: dict,
                 device: torch.device, seed: int, materialized: bool) -> None:
    # full-size stand-ins, zero (or the buffer's own value on a model that was not on meta):
    # a tensor transformers' init does not touch is then zero or kept, never garbage
    full_params = {n: nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=device), requires_grad=False)
                   for n, p in params.items()}
    full_buffers = {n: torch.zeros(b.shape, dtype=b.dtype, device=device) if materialized else b.clone()
                    for n, b in buffers.items()}
    module._parameters.update(full_params)
    module._buffers.update(full_buffers)
    try:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(param_seed(seed, name))
            root._init_weights(module)
    finally:
        module._parameters.update(params)
        module._buffers.update(buffers)
    for n, p in params.items():
        _copy_slice(p, full_params[n].data)
    for n, b in buffers.items():
        b.copy_(full_buffers[n])


def _copy_slice(param: torch.Tensor, full: torch.Tensor) -> None:
    """This rank's slice of ``full`` into ``param`` (plain or DTensor), no communication."""
    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


@dataclass
class LoadResult:
    """What :func:`load_pretrained` did: ``loaded`` tensors (this rank's names), ``missing``
    (this rank's parameters the folder lacks: they keep their init)."""

    loaded: list[str]
    missing: list[str]


def _stage_modules(model) -> list[nn.Module]:
    return list(getattr(model, "stage_modules", None) or [model])


def _check_config(ckpt: HFCheckpoint, config) -> None:
    if ckpt.config is None or config is None:
        return
    ours = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for key in _SHAPE_KEYS:
        if key in ckpt.config and key in ours and ckpt.config[key] != ours[key]:
            raise ValueError(f"{ckpt.path / 'config.json'}: {key}={ckpt.config[key]!r} but this model has "
                             f"{ours[key]!r}: the checkpoint is of another model")


@torch.no_grad()
def load_pretrained(model, path: str | Path, *, strict: bool = True) -> LoadResult:
    """Load a transformers ``save_pretrained`` folder into ``model`` (a ParallelModel in any
    layout, or a plain transformers model), each rank reading only the slices it owns.

    ``strict=True``: every parameter of the model must be in the folder and every tensor of
    the folder must belong to the model; ``strict=False``: missing parameters keep their
    init (call ``pm.init_weights()`` first) and are listed in the result."""
    stages = _stage_modules(model)
    ckpt = HFCheckpoint(path)
    _check_config(ckpt, getattr(stages[0], "config", None))
    if any(t.is_meta for m in stages for t in list(m.parameters()) + list(m.buffers())):
        raise ValueError("the model still has meta tensors: call pm.init_weights() (it materializes them on the "
                         "mesh's device) before load_pretrained")
    aliases = _tied_aliases(model, stages)
    config = getattr(stages[0], "config", None)
    model_type = getattr(config, "model_type", None)
    n_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
    # every name of the whole model (under PP, the other stages' too) as the folder may hold it
    names = set(getattr(model, "_state_order", None) or []) | {n for m in stages for n in m.state_dict()} | set(aliases)
    all_keys = {k for n in names for k in stored_names(n, model_type) + expert_keys(n, n_experts, model_type)}
    reads, loaded, missing = [], [], []
    for m in stages:
        for name, t in _persistent_tensors(m):
            r = _reads_of(ckpt, name, t, aliases.get(name), model_type)
            if r is None:
                missing.append(name)
            else:
                loaded.append(name)
                reads += r
    extra = sorted(n for n in ckpt.entries if n not in all_keys)
    if strict and extra:
        raise ValueError(f"{ckpt.path} holds tensors this model lacks: {extra[:4]}{' ...' if len(extra) > 4 else ''} "
                         f"(another model?); load_pretrained(..., strict=False) ignores them")
    missing_params = [n for n in missing if not _is_buffer(stages, n)]
    if strict and missing_params:
        raise ValueError(f"{ckpt.path} lacks parameter(s) {missing_params[:4]}"
                         f"{' ...' if len(missing_params) > 4 else ''}; load_pretrained(..., strict=False) keeps "
                         f"their init (pm.init_weights())")
    for handle, (f, key, src, local, dst) in by_file(reads, lambda r: r[0]):
        piece = handle.get_slice(key)[src]
        local[dst].copy_(piece.view(local[dst].shape))  # (casts on the way: no second copy of the box)
    return LoadResult(loaded=loaded, missing=missing)


def _reads_of(ckpt: HFCheckpoint, name: str, t: torch.Tensor, alias: str | None, model_type: str | None):
    """``[(file, stored key, its slices, this rank's local tensor, slices of it)]`` that fill
    this rank's box of tensor ``name``, every key's shape checked; None if the folder lacks
    it. The tensor under its own name (or its Hub name, or a tied copy's canonical name), or
    a fused expert weight from its per-expert tensors (``hf_expert_keys.py``)."""
    offsets, sizes = local_box(t)
    local = t.to_local() if isinstance(t, DTensor) else t
    everything = (slice(None),) * local.dim()
    for key in stored_names(name, model_type) + (stored_names(alias, model_type) if alias else []):
        if key in ckpt.entries:
            f = ckpt.file_of(key, tuple(t.shape), f"the model's {name!r}")
            if any(s == 0 for s in sizes):
                return []
            return [(f, key, tuple(slice(o, o + s) for o, s in zip(offsets, sizes)), local, everything)]
    pieces = per_expert_reads(name, tuple(t.shape), (offsets, sizes), model_type)
    if not pieces or any(key not in ckpt.entries for key, *_ in pieces):
        return None
    return [(ckpt.file_of(key, shape, f"expert weight {name!r}"), key, src, local, dst)
            for key, shape, src, dst in pieces]


def _persistent_tensors(module: nn.Module):
    """Parameters and persistent buffers by name (what ``state_dict`` holds), each once;
    the tensors themselves (DTensors under TP/FSDP), not detached copies."""
    seen: set[int] = set()
    for name, p in module.named_parameters():
        seen.add(id(p))
        yield name, p
    state = set(module.state_dict())
    for name, b in module.named_buffers():
        if name in state and id(b) not in seen:
            yield name, b


def _is_buffer(stages: list[nn.Module], name: str) -> bool:
    return any(name in dict(m.named_buffers()) for m in stages)


def _tied_aliases(model, stages: list[nn.Module]) -> dict[str, str]:
    """{tied copy's name: canonical name}: the canonical one is the name ``save_pretrained``
    keeps (the first registered: the input embedding)."""
    from ..tied import tied_groups

    groups = getattr(model, "tied_names", None)
    if groups is None:
        groups = [g for m in stages for g in tied_groups(m)]
    return {n: names[0] for names in groups for n in names[1:]}
