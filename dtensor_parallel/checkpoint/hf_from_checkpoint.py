"""A training checkpoint of any layout to a Hugging Face folder, one tensor at a time:
``dtensor-parallel export-hf CHECKPOINT_DIR OUT_DIR``.

One process, no process group, no model: ``checkpoint.json`` gives the model args and
the names, DCP's index the global shapes, and each tensor is read whole (DCP assembles it
from whatever shards the layout saved: FSDP, TP, PP stages alike) into one buffer, renamed,
its q/k rows permuted to transformers' rotary layout, cast, and added to the current
safetensors shard, which is written when it reaches ``max_shard_bytes``. Peak memory is one
shard plus one tensor, whatever the model's size. The folder (config, shards, index) is
written to a temporary directory and renamed into place; an existing one is never
overwritten. An MoE checkpoint of a Mixtral-shaped flavour is written as a Mixtral folder
(``hf_mixtral.py``: one tensor per expert); other MoE flavours are refused.
Every file is first checked against the checkpoint's content hashes (:mod:`.manifest`), and
DCP's index is read by the restricted unpickler (:mod:`.safe_metadata`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from ..models.llama import ModelArgs
from ..models.moe import MoEArgs
from . import atomic
from .dcp import read_meta
from .hf import hf_name, hf_names, permute_to_hf
from .hf_mixtral import EXPERT_BIAS, check_mixtral_args, expert_param
from .manifest import verify
from .safe_metadata import SafeFileSystemReader, read_dcp_metadata
from .hf_llama_config import hf_config
from .safetensors_dir import CONFIG_FILE, INDEX_FILE, SINGLE_FILE

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _model_args(meta: dict, path: Path) -> ModelArgs:
    saved = meta.get("model_args")
    if not saved:
        raise ValueError(f"checkpoint {path} records no model args (not a checkpoint of our Llama)")
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"checkpoint {path} has model args this version does not know: {unknown}")
    if saved.get("moe"):  # a Mixtral-shaped MoE flavour (hf_mixtral.py): others are refused
        args = ModelArgs(**{**saved, "moe": MoEArgs(**saved["moe"])})
        check_mixtral_args(args)
        return args
    return ModelArgs(**saved)


def _global_shapes(path: Path) -> dict[str, torch.Size]:
    metadata = read_dcp_metadata(path)  # the restricted unpickler: no code runs from a checkpoint
    return {k: v.size for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}


def export_checkpoint_to_hf(checkpoint: str | Path, out: str | Path, *, dtype: str | None = "bf16",
                            max_shard_bytes: int = 5 * 2 ** 30) -> Path:
    """Write the model of a training checkpoint (a ``step_N`` directory, or a root: its newest
    complete checkpoint) as a Hugging Face ``LlamaForCausalLM`` (MoE: ``MixtralForCausalLM``)
    folder at ``out``."""
    path = atomic.resolve(checkpoint)
    verify(path, collective=False)  # every file against the checkpoint's content hashes
    meta = read_meta(path)
    args = _model_args(meta, path)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: export into a new directory (nothing is overwritten)")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(_DTYPES)} (or None: as saved)")
    shapes = _global_shapes(path)
    names = meta.get("model_names") or sorted(k.removeprefix("model.") for k in shapes if k.startswith("model."))
    tmp = out.parent / f"{atomic.TMP_PREFIX}{out.name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    written: list[str] = []
    weight_map: dict[str, str] = {}
    cast = _DTYPES.get(dtype) if dtype else None

    def flush(final: bool) -> None:
        if not files[-1]:
            return
        name = f"part-{len(written):05d}.safetensors"
        save_file(files[-1], str(tmp / name), metadata={"format": "pt"})
        written.append(name)
        weight_map.update({k: name for k in files[-1]})
        if not final:
            files.append({})
            sizes.append(0)

    saved_dtype, total = None, 0
    for name in names:
        key = f"model.{name}"
        if key not in shapes:
            raise ValueError(f"checkpoint {path}: tensor {key!r} is listed in checkpoint.json but not in the index")
        if name.endswith(("rope", EXPERT_BIAS)):  # a buffer our Llama recomputes; the router's zero bias
            continue
        full = torch.empty(shapes[key], dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(TypedStorage|torch.distributed is disabled).*")
            dcp.load({key: full}, storage_reader=SafeFileSystemReader(str(path)), no_dist=True)
        heads = args.n_heads if name.endswith("attention.wq.weight") else (
            args.n_kv_heads if name.endswith("attention.wk.weight") else None)
        if expert_param(name) is not None:  # (E, in, out) -> one (out, in) tensor per expert
            pieces = {hf: full[e].T for e, hf in enumerate(hf_names(name, args))}
        else:
            pieces = {hf_name(name): permute_to_hf(full, heads) if heads else full}
        for hf, piece in pieces.items():
            tensor = piece.to(cast or full.dtype).contiguous()
            saved_dtype = tensor.dtype
            nbytes = tensor.numel() * tensor.element_size()
            if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
                flush(final=False)
            files[-1][hf] = tensor
            sizes[-1] += nbytes
            total += nbytes
        del full, pieces
    flush(final=True)
    n = len(written)
    final_names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for old, new in zip(written, final_names):
        os.rename(tmp / old, tmp / new)
    rename = dict(zip(written, final_names))
    if n > 1:
        (tmp / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total},
             "weight_map": dict(sorted((k, rename[v]) for k, v in weight_map.items()))}, indent=2))
    (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(args, saved_dtype or torch.float32), indent=2))
    atomic._fsync_dir(tmp)
    os.rename(tmp, out)
    atomic._fsync_dir(out.parent)
    return out
