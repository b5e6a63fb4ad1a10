"""A shape probe of one block under its tensor-parallel shapes, on the meta device.

Where the plan gives no head counts (a user's own model without a config), ``tp`` dividing
every linear's width does not mean it divides the heads: 2 kv heads of 16 features at tp=4
leave each rank 8 features, and the block's ``view(b, s, -1, head_dim)`` fails deep inside
the first forward, after collectives have started. The probe finds that before any: it
runs the first block on meta tensors twice with ``torch.func.functional_call``, once with
its full parameter shapes and once with each rank's local shapes (colwise: ``out / tp``
rows, rowwise: ``in / tp`` columns; the computation TP runs on one rank, without SP), and
a failure only in the second run is a ``ValueError`` naming the innermost module that was
running. Meta tensors cost no memory or time; a block the probe cannot run at all (its
inputs cannot be captured, or it needs data on meta) is not probed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .styles import Colwise, Rowwise, VocabHead


def _block_inputs(model: nn.Module, block: nn.Module, seq_len: int):
    """The first block's (args, kwargs) as meta tensors, from a meta forward of the model
    on ``seq_len`` tokens; None if the model cannot run on meta."""
    captured = {}

    def grab(_module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Captured

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    tensors = {n: _meta_like(t) for n, t in _named_tensors(model)}
    tokens = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    try:
        functional_call(model, tensors, (tokens,), strict=False, tie_weights=False)
    except _Captured:
        return captured["args"], captured["kwargs"]
    except Exception:  # noqa: BLE001 - a model that does not run on meta is not probed
        return None
    finally:
        handle.remove()
    return None


class _Captured(Exception):
    pass


def _named_tensors(module: nn.Module):
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _meta_like(t: torch.Tensor, shape=None) -> torch.Tensor:
    return torch.empty(shape if shape is not None else t.shape, dtype=t.dtype, device="meta")


def _local_shape(style, param_name: str, shape: torch.Size, tp: int):
    """A parameter's shape on one tp rank under its style (None: unchanged)."""
    if isinstance(style, (Colwise, VocabHead)):  # weight (out, in) and bias (out,) by rows
        return (shape[0] // tp, *shape[1:])
    if isinstance(style, Rowwise) and param_name == "weight":  # (out, in) by columns; bias whole
        return (shape[0], shape[1] // tp)
    return None


def probe_tp_shapes(model: nn.Module, block_name: str, styles: dict, tp: int, seq_len: int = 8) -> None:
    """Raise a ValueError if ``block_name`` runs with its full shapes but not with its
    tp-local ones (the module docstring says how)."""
    block = model.get_submodule(block_name)
    inputs = _block_inputs(model, block, seq_len)
    if inputs is None:
        return
    args, kwargs = inputs
    full = {n: _meta_like(t) for n, t in _named_tensors(block)}
    local = dict(full)
    for name, t in block.named_parameters(remove_duplicate=False):
        owner, _, pname = name.rpartition(".")
        style = styles.get(f"{block_name}.{owner}" if owner else block_name)
        shape = _local_shape(style, pname, t.shape, tp)
        if shape is not None:
            local[name] = _meta_like(t, shape)
    try:
        functional_call(block, full, args, kwargs, strict=False, tie_weights=False)
    except Exception:  # noqa: BLE001 - the block does not run on meta at all: not probed
        return
    running: list[str] = []
    names = {id(m): f"{block_name}.{n}" if n else block_name for n, m in block.named_modules()}
    hooks = []
    for m in block.modules():
        hooks.append(m.register_forward_pre_hook(lambda mod, _a: running.append(names[id(mod)])))
        hooks.append(m.register_forward_hook(lambda _m, _a, _o: running.pop() and None))
    try:
        functional_call(block, local, args, kwargs, strict=False, tie_weights=False)
    except Exception as e:  # noqa: BLE001 - the shapes TP gives this block do not run
        where = running[-1] if running else block_name
        raise ValueError(
            f"tp={tp}: {where} fails with the shapes tensor parallelism gives each rank ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}). The plan has no head counts to check, and most likely tp does not "
            f"divide the attention heads or kv heads there: choose a tp that divides them, or give "
            f"ParallelPlan(num_heads=..., num_kv_heads=...) to have them checked") from None
    finally:
        for h in hooks:
            h.remove()
