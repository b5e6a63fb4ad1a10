"""Sharded, resharding checkpoints of a ParallelModel through torch.distributed.checkpoint.

What one checkpoint holds (``DIR/step_N/``):

=====================  ======================================================================
DCP key                 what
=====================  ======================================================================
``model.<name>``        every stage module's state dict under the model's original names,
                        as the layout holds it: FSDP / TP / EP shards stay DTensors
``optim.<name>.<key>``  the optimizer's per-parameter state (AdamW: ``step``, ``exp_avg``,
                        ``exp_avg_sq``; the moments are DTensors placed like the parameter)
``rng.rank<r>.<dev>``   each rank's torch RNG states (cpu, and cuda when present)
``checkpoint.json``     (rank 0, plain JSON) step, layout, model args, LR-scheduler state,
                        optimizer hyperparameters, data position, torch version
=====================  ======================================================================

Resharding. DCP records each tensor's *global* shape and, for every saved chunk, its offsets
in it. A load asks, rank by rank, for the boxes its own shards cover in the *new* layout
(``DTensor`` placements over the new mesh: FSDP's ``Shard(0)``, TP's row/column shards,
FSDP x TP's ``_StridedShard``, plain tensors in full) and DCP reads the overlapping pieces
of the saved chunks. Pipeline stages need nothing special: a stage module keeps the model's
parameter names, so a rank asks for just its stages' names. Hence TP2 x PP2 x DP2 loads
under DP8, PP4, TP4 ... with parameters and optimizer moments bit for bit equal.

Why not ``get_optimizer_state_dict``: DCP's helper maps parameters to names through one
root module, while a pipeline rank holds several stage modules under one optimizer; the
same id -> name translation is done here over ``pm.named_parameters()`` (the model state
does use ``get_model_state_dict`` / ``set_model_state_dict``, per stage module).

Checks before any tensor is read: the checkpoint's content hashes (:mod:`.manifest`:
``checkpoint.json`` and ``.metadata`` on every rank before either is trusted, the data
files split over the ranks), then, on every rank alike (every rank reads the same index
files, so all ranks raise the same error and none hangs), that every tensor this model
needs is in it with the same global shape (else the error names the tensor and both
shapes), that the checkpoint holds no model tensor this model lacks, and that every data
file exists and is long enough for the bytes the index says it holds. Only then does
``dcp.load`` write into the model, so a rejected checkpoint changes nothing. DCP's
``.metadata`` (a pickle) is only ever read by :mod:`.safe_metadata`'s restricted unpickler.

Saving: :mod:`.saver` (:class:`Checkpointer`, atomic publication through :mod:`.atomic`).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)

from . import atomic, manifest
from .atomic import CorruptCheckpointError
from .safe_metadata import SafeFileSystemReader, read_dcp_metadata

FORMAT = "dtensor_parallel.checkpoint/1"


# ---- what a layout holds ----------------------------------------------------------------
def _stages(model) -> list[nn.Module]:
    """The stage modules of a ParallelModel, or ``[model]`` for a plain module."""
    return list(model.stage_modules) if hasattr(model, "stage_modules") else [model]


def _named_parameters(model) -> Iterator[tuple[str, nn.Parameter]]:
    """This rank's parameters, a tied weight's copy under its canonical name (the one every
    layout has: ``lm_head.weight`` tied to ``model.embed_tokens.weight`` is a parameter of its
    own only on the last pipeline stage), so its optimizer state reshards across PP."""
    canonical = {n: names[0] for names in (getattr(model, "tied_names", None) or []) for n in names[1:]}
    for m in _stages(model):
        for name, p in m.named_parameters():
            yield canonical.get(name, name), p


def model_state_dict(model) -> dict[str, torch.Tensor]:
    """This rank's model state under the original names (DTensors stay sharded): the union
    of its stage modules' state dicts, which never share a name."""
    out: dict[str, torch.Tensor] = {}
    for m in _stages(model):
        for name, t in get_model_state_dict(m, options=StateDictOptions()).items():
            if name in out:
                raise RuntimeError(f"two stage modules of this rank both hold {name!r}")
            out[name] = t
    return out


def _full_model_names(model) -> set[str] | None:
    """Names of the *whole* model's state (None where unknown): under PP a rank holds only
    its stages', and ParallelModel keeps the whole model's order."""
    order = getattr(model, "_state_order", None)
    if order is not None:
        return set(order)
    if getattr(model, "pipeline", None) is None:
        return set(model_state_dict(model))
    return None


@torch.no_grad()
def init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (placed like their parameters) by one step with
    zero gradients and lr 0, as DCP's ``_init_optim_state`` does; a load then fills them
    in place. A no-op when the state exists."""
    if opt.state:
        return
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    if any(p.grad is not None for p in params):
        raise RuntimeError("initializing optimizer state needs no gradients: zero_grad(set_to_none=True) first")
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = torch.tensor(0.0) if isinstance(g["lr"], torch.Tensor) else 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)


def optimizer_state_dict(model, opt: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """``{parameter name: {state key: value}}``: the optimizer's state keyed by name
    instead of position, so that it reshards like the parameters."""
    names = {p: n for n, p in _named_parameters(model)}
    out: dict[str, dict[str, Any]] = {}
    for p, state in opt.state.items():
        if p not in names:
            raise ValueError("the optimizer holds a parameter that is not the model's: build it from "
                             "pm.named_parameters() / pm.parameters()")
        out[names[p]] = state
    return out


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _flat_state(model, opt: torch.optim.Optimizer | None, rng: bool) -> dict[str, Any]:
    flat: dict[str, Any] = {f"model.{k}": v for k, v in model_state_dict(model).items()}
    if opt is not None:
        for name, state in optimizer_state_dict(model, opt).items():
            for key, value in state.items():
                flat[f"optim.{name}.{key}"] = value
    if rng:
        rank = dist.get_rank() if dist.is_initialized() else 0
        flat.update({f"rng.rank{rank}.{k}": v for k, v in _rng_state().items()})
    return flat


def _layout(model) -> dict[str, int]:
    dims = getattr(model, "dims", None)
    if dims is not None:
        return dataclasses.asdict(dims)
    return {"world_size": dist.get_world_size() if dist.is_initialized() else 1}


def _model_args(model) -> dict | None:
    args = getattr(_stages(model)[0], "args", None)
    return dataclasses.asdict(args) if dataclasses.is_dataclass(args) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _meta(model, step: int, opt, sched, data: dict | None, extra: dict | None) -> dict[str, Any]:
    groups = None
    if opt is not None:
        groups = [{k: _jsonable(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {"format": FORMAT, "step": step, "time": time.time(), "torch": torch.__version__,
            "layout": _layout(model), "model_args": _model_args(model),
            "model_names": sorted(_full_model_names(model) or []),
            "has_optimizer": opt is not None, "optimizer_param_groups": groups,
            "scheduler": _jsonable(sched.state_dict()) if sched is not None else None,
            "data": data, "extra": extra}


# ---- the process group of checkpoint traffic --------------------------------------------
_GROUPS: dict[int, Any] = {}


def checkpoint_group():
    """A gloo group over the whole world for DCP's own collectives (plans, barriers):
    CPU objects work on any backend, and an asynchronous save's background thread never
    shares a group with the training step. Created once (collectively) per default group."""
    if not dist.is_initialized():
        return None
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(backend="gloo")
    return _GROUPS[key]


# ---- checks before any collective --------------------------------------------------------
def read_meta(path: str | Path) -> dict[str, Any]:
    f = Path(path) / atomic.META_FILE
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"checkpoint index {f} is unreadable ({type(e).__name__}: {e}): the file "
                                     f"is truncated or corrupt; load an earlier checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{f}: format {meta.get('format') if isinstance(meta, dict) else meta!r} "
                                     f"is not {FORMAT!r}")
    return meta


def _global_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)  # a DTensor's shape is the global one


def _args_diff(saved: dict | None, ours: dict | None) -> str:
    if not saved or not ours:
        return ""
    diff = [f"{k} {saved[k]} vs {ours[k]}" for k in ours if k in saved and saved[k] != ours[k]]
    return f" (checkpoint vs this model: {', '.join(diff)})" if diff else ""


def check_checkpoint(path: Path, flat: dict[str, Any], model, meta: dict[str, Any]) -> None:
    """Every local check of ``path`` against the state ``flat`` about to be loaded."""
    md = read_dcp_metadata(path)
    saved = md.state_dict_metadata
    why = _args_diff(meta.get("model_args"), _model_args(model))
    for key, t in flat.items():
        if key not in saved:
            kind = "optimizer state" if key.startswith("optim.") else "tensor"
            raise ValueError(f"{kind} {key!r} is not in checkpoint {path}: it was saved from another "
                             f"model{why or ' or without it'}")
        entry = saved[key]
        if isinstance(t, torch.Tensor):
            if not isinstance(entry, TensorStorageMetadata):
                raise ValueError(f"{key!r} in checkpoint {path} is not a tensor")
            if tuple(entry.size) != _global_shape(t):
                raise ValueError(f"tensor {key!r} has shape {list(entry.size)} in checkpoint {path} but "
                                 f"{list(_global_shape(t))} in this model: the checkpoint is of another "
                                 f"model shape{why}")
    ours = _full_model_names(model)
    if ours is not None:
        extra = sorted(k[len("model."):] for k in saved if k.startswith("model.") and k[len("model."):] not in ours)
        if extra:
            raise ValueError(f"checkpoint {path} holds model tensors this model lacks: {extra[:4]}"
                             f"{' ...' if len(extra) > 4 else ''}: it was saved from another model{why}")
    need: dict[str, tuple[int, str]] = {}  # file -> (bytes it must hold, a tensor in it)
    for index, info in getattr(md, "storage_data", {}).items():
        end = info.offset + info.length
        if end > need.get(info.relative_path, (-1, ""))[0]:
            need[info.relative_path] = (end, index.fqn)
    for rel, (end, fqn) in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            raise CorruptCheckpointError(f"checkpoint file {f} is missing (it holds tensor {fqn!r} and others): "
                             f"the checkpoint is incomplete; load an earlier one")
        size = f.stat().st_size
        if size < end:
            raise CorruptCheckpointError(f"checkpoint file {f} is truncated: {size} bytes, but tensor {fqn!r} is "
                             f"stored up to byte {end}; load an earlier checkpoint")


# ---- load ---------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, model, opt: torch.optim.Optimizer | None = None, sched=None, *,
                    load_optimizer: bool = True, load_rng: bool = True, verify: bool = True) -> dict[str, Any]:
    """Load ``path`` (a ``step_N`` directory, or a root: its newest complete checkpoint)
    into this layout, whatever layout saved it (collective). Restores the optimizer state
    and hyperparameters (``opt``), the LR schedule (``sched``), and the RNG states when the
    layout is the saved one. Returns ``checkpoint.json`` (``step``, ``data`` ...).

    First every file is checked against the checkpoint's manifest of content hashes
    (``verify``; collective: the ranks share the data files); a damaged checkpoint raises
    :class:`.atomic.CorruptCheckpointError` naming the file (and its tensors) with the
    model, optimizer and schedule unchanged."""
    path = atomic.resolve(path)
    hashes = manifest.verify_index_files(path)  # checkpoint.json and .metadata, before trusting them
    meta = read_meta(path)
    if verify and hashes is not None and not manifest.take_verified(path):
        manifest.verify(path, checkpoint_group(), manifest=hashes)
    with_opt = opt is not None and load_optimizer
    if with_opt and not meta.get("has_optimizer"):
        raise ValueError(f"checkpoint {path} has no optimizer state: load it with load_optimizer=False "
                         f"(or opt=None) to take its weights only")
    if with_opt:
        init_optimizer_state(opt)
    same_layout = meta.get("layout") == _layout(model)
    flat = _flat_state(model, opt if with_opt else None, rng=load_rng and same_layout)
    check_checkpoint(path, flat, model, meta)
    group = checkpoint_group()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(TypedStorage|torch.distributed is disabled).*")
        dcp.load(flat, storage_reader=SafeFileSystemReader(str(path)), process_group=group)
    for m in _stages(model):  # DCP loaded in place; this also covers state dicts of copies
        own = {k: flat[f"model.{k}"] for k in get_model_state_dict(m)}
        set_model_state_dict(m, own, options=StateDictOptions(strict=True))
    if with_opt:
        names = {p: n for n, p in _named_parameters(model)}
        taken: set[int] = set()
        for p, state in opt.state.items():
            for key in state:
                value = flat[f"optim.{names[p]}.{key}"]
                if isinstance(value, torch.Tensor) and id(value) in taken:  # two copies of a tied weight
                    value = value.clone()  # on one rank (the V schedule): each its own moments
                taken.add(id(value))
                state[key] = value
        saved_groups = meta.get("optimizer_param_groups") or []
        if len(saved_groups) == len(opt.param_groups):
            for g, saved in zip(opt.param_groups, saved_groups):
                for k, v in saved.items():
                    g[k] = tuple(v) if isinstance(g.get(k), tuple) else v
    if sched is not None and meta.get("scheduler") is not None:
        sched.load_state_dict(meta["scheduler"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    if load_rng and same_layout:
        torch.set_rng_state(flat[f"rng.rank{rank}.cpu"])
        if f"rng.rank{rank}.cuda" in flat:
            torch.cuda.set_rng_state(flat[f"rng.rank{rank}.cuda"])
    meta["path"] = str(path)
    return meta


__all__ = ["load_checkpoint", "model_state_dict", "optimizer_state_dict",
           "init_optimizer_state", "check_checkpoint", "read_meta", "checkpoint_group",
           "FORMAT"]
