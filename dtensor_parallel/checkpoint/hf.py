"""Llama 3 (and Mixtral: ``hf_mixtral.py``) weights in Hugging Face's safetensors format:
import into any layout, export back.

A Hugging Face checkpoint is ``config.json`` plus either ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` listed in ``model.safetensors.index.json``
(``{"weight_map": {hf name: file}}``). Names map one to one:

==========================================  ===================================
Hugging Face (``LlamaForCausalLM``)          ours (``models/llama.py``, Meta's)
==========================================  ===================================
model.embed_tokens.weight                    tok_embeddings.weight
model.layers.{i}.self_attn.{q,k,v,o}_proj    layers.{i}.attention.w{q,k,v,o}
model.layers.{i}.mlp.{gate,up,down}_proj     layers.{i}.feed_forward.w{1,3,2}
model.layers.{i}.input_layernorm             layers.{i}.attention_norm
model.layers.{i}.post_attention_layernorm    layers.{i}.ffn_norm
model.norm.weight / lm_head.weight           norm.weight / output.weight
==========================================  ===================================

The rotary permutation. Meta's RoPE (ours) rotates interleaved pairs ``(x[2j], x[2j+1])``
of each head; Hugging Face's ``rotate_half`` rotates ``(x[j], x[j + d/2])``. Its converter
(``convert_llama_weights_to_hf.py``) therefore reorders the rows of ``wq`` and ``wk``
within each head, so that row ``2j`` goes to ``j`` and ``2j+1`` to ``j + d/2``::

    hf = w.view(heads, d/2, 2, dim).transpose(1, 2).reshape(heads * d, dim)     # ours -> HF
    ours = w.view(heads, 2, d/2, dim).transpose(1, 2).reshape(heads * d, dim)   # HF -> ours

with ``heads = n_heads`` for ``wq`` and ``n_kv_heads`` for ``wk``. Both give the same
attention scores: q.k is a sum over pairs, and each pair is rotated by the same angle.

Import reads only what each rank holds: a parameter's local shard is one box of the global
tensor (DCP's own ``__create_chunk_list__`` gives its offsets for any placement), read with
``safe_open(...).get_slice``; for ``wq``/``wk`` the rows of the heads the box touches are
read and un-permuted. Everything that can be wrong with the files -- a missing shard, a
truncated file, a tensor of another shape, a config of another model -- is checked from
the headers before any parameter is written, and the error names the file or tensor.

The config (``hf_llama_config.py``): both RoPE formats (transformers 5's ``rope_parameters``
and the older top-level keys) and the RoPE types our Llama computes; anything it would
compute differently is a ``ValueError`` naming the key, checked before any tensor is read.

Export: each pipeline stage's writer rank (coordinate 0 on every non-pp mesh dim) gathers
its stage's tensors one by one (``full_tensor()``, over the stage's own mesh) and writes
them into shards of at most ``max_shard_bytes``; global rank 0 writes the index and
``config.json``. Files go to a temporary directory renamed into place at the end, and an
existing directory is never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from ..models.llama import ModelArgs
from . import atomic
from .dcp import _full_model_names, _stages, checkpoint_group, model_state_dict
from .hf_llama_config import check_config, hf_config, model_args_from_hf
from .hf_mixtral import EXPERT_BIAS, ROUTER, check_mixtral_args, expert_key, expert_param
from .safetensors_dir import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, HFCheckpoint, by_file, local_box


_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_name(name: str) -> str:
    """Our parameter name -> Hugging Face's (routed experts: :func:`hf_names`)."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    if m and m.group(2) == ROUTER[0]:
        return f"model.layers.{m.group(1)}.{ROUTER[1]}"
    raise ValueError(f"parameter {name!r} has no Hugging Face Llama / Mixtral name (a non-Llama model?)")


def hf_names(name: str, args: ModelArgs) -> list[str]:
    """Every Hugging Face tensor of our tensor ``name``: one, or one per expert."""
    expert = expert_param(name)
    if expert is None:
        return [hf_name(name)]
    return [expert_key(*expert, e) for e in range(args.moe.n_experts)]


def _skipped(name: str) -> bool:
    """Our state Hugging Face has no tensor for: the router's expert bias (zero in every
    flavour Mixtral expresses)."""
    return name.endswith(EXPERT_BIAS)


def _rotary_heads(name: str, args: ModelArgs) -> int | None:
    """Heads whose rows the rotary permutation reorders (wq: n_heads, wk: n_kv_heads)."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def permute_to_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's interleaved rotary rows -> Hugging Face's rotate_half rows (per head)."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (h d, dim)


def permute_from_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_to_hf`."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)  # (h d, dim)


def _read_box(handle, hf: str, offsets, sizes, heads: int | None, rows: int) -> torch.Tensor:
    """The box ``offsets``/``sizes`` of our (Meta-layout) tensor from the HF tensor ``hf``."""
    sl = handle.get_slice(hf)
    if any(s == 0 for s in sizes):
        return torch.empty(sizes)
    if heads is None:
        return sl[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
    hd = rows // heads  # rows of one head; the permutation stays inside a head
    r0, r1 = offsets[0], offsets[0] + sizes[0]
    h0, h1 = r0 // hd, -(-r1 // hd)
    block = sl[h0 * hd:h1 * hd, offsets[1]:offsets[1] + sizes[1]]  # (heads touched * hd, cols)
    return permute_from_hf(block, h1 - h0)[r0 - h0 * hd:r1 - h0 * hd]


def _llama_args(model) -> ModelArgs:
    args = getattr(_stages(model)[0], "args", None)
    if not isinstance(args, ModelArgs):
        raise TypeError(f"{type(_stages(model)[0]).__name__} is not our Llama: Hugging Face interop maps Llama 3 "
                        f"and Mixtral")
    if args.moe is not None:
        check_mixtral_args(args)
    return args


def _reads(ckpt: HFCheckpoint, name: str, t: torch.Tensor, args: ModelArgs, tied: bool) -> list:
    """``[(file, hf key, read(handle) -> tensor, local tensor, its slices)]`` filling this
    rank's box of our tensor ``name``, every key's shape checked first."""
    offsets, sizes = local_box(t)
    local = t.to_local() if isinstance(t, DTensor) else t
    expert = expert_param(name)
    if expert is None:
        hf = hf_name(name)
        if hf == "lm_head.weight" and tied:
            hf = "model.embed_tokens.weight"
        if hf not in ckpt.entries:
            raise ValueError(f"tensor {hf!r} (our {name!r}) is not in the Hugging Face checkpoint {ckpt.path}")
        f = ckpt.file_of(hf, tuple(t.shape), f"our {name!r}")
        heads = _rotary_heads(name, args)
        return [(f, hf, lambda h, hf=hf: _read_box(h, hf, offsets, sizes, heads, t.shape[0]), local, ...)]
    # ours[e] (in, out) is Mixtral's expert e (out, in) transposed: read the box's transpose
    (o0, o1, o2), (s0, s1, s2) = offsets, sizes
    reads = []
    for e in range(o0, o0 + s0):
        key = expert_key(*expert, e)
        if key not in ckpt.entries:
            raise ValueError(f"tensor {key!r} (expert {e} of our {name!r}) is not in the Hugging Face checkpoint "
                             f"{ckpt.path}")
        f = ckpt.file_of(key, (t.shape[2], t.shape[1]), f"expert {e} of our {name!r} (transposed)")
        reads.append((f, key, lambda h, key=key: h.get_slice(key)[o2:o2 + s2, o1:o1 + s1].T, local, e - o0))
    return reads


@torch.no_grad()
def import_hf(model, path: str | Path, *, strict: bool = True) -> None:
    """Load Hugging Face Llama or Mixtral weights (``path``: the directory) into ``model``
    -- a ParallelModel in any layout, or a plain Llama -- each rank reading only its shards.
    Every check runs before the first parameter is written; no collective is needed."""
    args = _llama_args(model)
    ckpt = HFCheckpoint(path)
    check_config(ckpt.config, args, ckpt.path / CONFIG_FILE)
    tied = bool(ckpt.config and ckpt.config.get("tie_word_embeddings")) and "lm_head.weight" not in ckpt.entries
    params = {n: t for n, t in model_state_dict(model).items() if not _skipped(n)}
    reads = [r for name, t in params.items() for r in _reads(ckpt, name, t, args, tied)]
    if strict:
        ours = {h for n in (_full_model_names(model) or params) if not _skipped(n) for h in hf_names(n, args)}
        extra = sorted(n for n in ckpt.entries if n not in ours and not n.endswith("rotary_emb.inv_freq"))
        if extra:
            raise ValueError(f"the Hugging Face checkpoint {ckpt.path} holds tensors this model lacks: "
                             f"{extra[:4]}{' ...' if len(extra) > 4 else ''} (another model shape?)")
    for handle, (f, key, read, local, where) in by_file(reads, lambda r: r[0]):
        piece = read(handle)
        dst = local[where]
        if dst.numel():
            if piece.shape != dst.shape:
                raise RuntimeError(f"import_hf: box of {key!r} read as {tuple(piece.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(piece)  # (casts on the way: no second, fp32 copy of the box)


def _writer_of_stage(model) -> bool:
    mesh = getattr(model, "mesh", None)
    if mesh is None:  # a plain module: the calling process writes it all
        return True
    coord = mesh.get_coordinate()
    return all(c == 0 for d, c in zip(mesh.mesh_dim_names, coord) if d != "pp")


def export_hf(model, path: str | Path, *, dtype: torch.dtype | None = None,
              max_shard_bytes: int = 5 * 2 ** 30) -> Path:
    """Write ``model`` (any layout) as a Hugging Face Llama (MoE: Mixtral) checkpoint at ``path``
    (collective). ``dtype``: cast on the way out (None: the parameters' dtype)."""
    args = _llama_args(model)
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: export into a new directory (nothing is overwritten)")
    # a plain module is exported by the one process that calls this, whatever process
    # group may exist; a ParallelModel (it has a mesh) is exported by all its ranks
    distributed = getattr(model, "mesh", None) is not None and dist.is_initialized() and dist.get_world_size() > 1
    group = checkpoint_group() if distributed else None
    rank = dist.get_rank() if distributed else 0
    tmp = path.parent / f"{atomic.TMP_PREFIX}{path.name}"
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    params = {n: t for n, t in model_state_dict(model).items() if not _skipped(n)}
    writer = _writer_of_stage(model)
    mine = []  # (hf name, bytes) of this stage, if this rank writes it
    for name, t in params.items():
        keys = hf_names(name, args)
        mine += [(hf, t.numel() * (dtype or t.dtype).itemsize // len(keys)) for hf in keys]
    plans: list[Any] = [mine if writer else None]
    if distributed:
        plans = [None] * dist.get_world_size()
        dist.all_gather_object(plans, mine if writer else None, group=group)
    files: list[list[str]] = []  # tensors of each file, writers in rank order
    owner: list[int] = []
    for r, plan in enumerate(plans):
        if not plan:
            continue
        size = None
        for hf, nbytes in plan:
            if size is None or (size + nbytes > max_shard_bytes and size > 0):
                files.append([])
                owner.append(r)
                size = 0
            files[-1].append(hf)
            size += nbytes
    n = len(files)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    file_of = {hf: names[i] for i, tensors in enumerate(files) for hf in tensors}
    my_files = {i for i, o in enumerate(owner) if o == rank}
    pending: dict[str, torch.Tensor] = {}
    for name, t in params.items():  # every rank of the stage gathers, in the same order
        full = t.full_tensor() if isinstance(t, DTensor) else t.detach()
        if not writer:
            continue
        full = full.to(device="cpu", dtype=dtype or full.dtype)
        heads = _rotary_heads(name, args)
        if expert_param(name) is not None:  # one (out, in) tensor per expert
            pending |= {hf: full[e].T.contiguous() for e, hf in enumerate(hf_names(name, args))}
        else:
            pending[hf_name(name)] = (permute_to_hf(full, heads) if heads else full).contiguous()
        for i in sorted(my_files):
            if all(h in pending for h in files[i]):
                save_file({h: pending.pop(h) for h in files[i]}, str(tmp / names[i]), metadata={"format": "pt"})
                my_files.discard(i)
    if writer and my_files:
        raise RuntimeError(f"export: files {sorted(my_files)} of rank {rank} were not completed")
    if distributed:
        dist.barrier(group=group)
    if rank == 0:
        if n > 1:
            total = sum(nbytes for plan in plans if plan for _, nbytes in plan)
            (tmp / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(file_of.items()))}, indent=2))
        some = next(iter(params.values()))
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(args, dtype or some.dtype), indent=2))
        atomic._fsync_dir(tmp)
        os.rename(tmp, path)
        atomic._fsync_dir(path.parent)
    if distributed:
        dist.barrier(group=group)
    return path


__all__ = ["import_hf", "export_hf", "hf_config", "model_args_from_hf", "hf_name", "permute_to_hf",
           "permute_from_hf", "HFCheckpoint"]
