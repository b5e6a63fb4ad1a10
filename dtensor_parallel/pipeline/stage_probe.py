"""Does a later pipeline stage hand its input to its first block unchanged?

A stage runs the model's own ``forward`` with the modules of other stages replaced by
pass-throughs (``split.py``). That is right only if the forward passes what the embedding
returns straight to the first block. Code between them runs again on every later stage, on
hidden states instead of token ids: transformers' Gemma multiplies the embedding by
sqrt(hidden) and Granite by ``embedding_multiplier``; a GPT-2-style model adds a learned
position embedding, whose module becomes a pass-through of its *input* (the positions).
Each would be silently wrong from stage 1 on.

The probe builds a later stage's module (every rank builds the same one, so every rank
reaches the same verdict before any collective) and runs its forward on meta tensors up
to the first block, in eval mode: if the first block's input is not the very tensor a
pass-through returned, parallelize raises a ``ValueError``. A forward that cannot run on
meta is not probed; a dropout after the embedding (eval: the identity) is let through, so
in training a later stage applies it again.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.func import functional_call

from .split import PassThrough, build_stage_module


class _Reached(Exception):
    pass


def check_stage_input(model: nn.Module, block_names: list[str], later_blocks: list[str], seq_len: int = 8) -> None:
    stage = build_stage_module(model, block_names, later_blocks, is_first=False, is_last=False)
    stage.eval()  # (a copy: an embedding dropout of p=0 returns its input instead of a new tensor)
    first_block = stage.get_submodule(later_blocks[0])
    passed: list[torch.Tensor] = []
    seen: dict[str, object] = {}

    def on_pass_through(_m, _args, out):
        passed.append(out)

    def on_block(_m, args, kwargs):
        seen["input"] = args[0] if args else next(iter(kwargs.values()), None)
        raise _Reached

    hooks = [m.register_forward_hook(on_pass_through) for m in stage.modules() if isinstance(m, PassThrough)]
    hooks.append(first_block.register_forward_pre_hook(on_block, with_kwargs=True))
    params = dict(stage.named_parameters(remove_duplicate=False)) | dict(stage.named_buffers(remove_duplicate=False))
    tensors = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in params.items()}
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    width = _hidden_width(model)
    if width is None:
        return
    x = torch.empty(1, seq_len, width, dtype=dtype, device="meta")
    kwargs = {}
    if "position_ids" in inspect.signature(stage.forward).parameters:
        kwargs["position_ids"] = torch.arange(seq_len, device="meta")[None]
    try:
        functional_call(stage, tensors, (x,), kwargs, strict=False, tie_weights=False)
    except _Reached:
        pass
    except Exception:  # noqa: BLE001 - a forward that cannot run on meta is not probed
        return
    finally:
        for h in hooks:
            h.remove()
    block_input = seen.get("input")
    if block_input is None or any(block_input is t for t in passed):
        return
    raise ValueError(
        f"pp: {type(model).__name__}.forward changes the embedding's output before the first block "
        f"(a scale, an added position embedding, ...), which every later pipeline stage would apply "
        f"again to the hidden states it receives. Move that computation into the embedding module "
        f"(or the first block), or train this model without pipeline parallelism")


def _hidden_width(model: nn.Module) -> int | None:
    """The residual stream's width: the embedding dim of the model's first nn.Embedding."""
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m.embedding_dim
    return None
