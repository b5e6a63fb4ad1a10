"""The fused loss at the output head: ``plan.fused_loss`` (``fused_cross_entropy.py``).

``parallelize`` replaces the model's output head (an ``nn.Linear`` without bias) by a
:class:`LossHead`: an ``nn.Linear`` that owns the same weight ``Parameter`` under the same
name (state dicts, checkpoints and tied embeddings are unchanged) and computes the same
logits, except inside :meth:`LossHead.hidden_states`, which ``ParallelModel.forward_backward``
enters: there the head returns its input hidden states and the loss is
``linear_cross_entropy_sum(hidden, weight, labels)``, so the (tokens, vocab) logits are never
made. ``pm(x)`` (inference) still returns real logits.

Which head: the module whose TP rule is ``"head"`` (``VocabHead``), else a transformers
LM's ``get_output_embeddings()``. What is fused (checked once, before any collective):

- a plain ``nn.Linear`` (exactly that class) without bias; under TP it is vocab-parallel
  (``VocabHead``: weight ``Shard(0)`` on tp) or has no rule (replicated);
- no post-processing of the logits the config announces (transformers' ``final_logit_softcapping``,
  ``logit_scale``, ``logits_scaling``); and at run time the model's output must be exactly
  the head's output (any other transformation of the logits is an error naming the fix).

``fused_loss="auto"`` fuses where all of that holds and otherwise keeps the unfused loss;
``True`` raises a ``ValueError`` saying why not.

Tensor parallelism: the head's input is what ``VocabHead`` makes of it (the norm's
replicated output, all-gathered from the sequence shards under SP); the head returns it as
a local tensor whose gradient is ``Partial`` over tp (each rank's vocabulary shard adds its
part), so that gradient leaves through the same reduction the unfused head's backward does.
The weight is this rank's vocabulary rows; the op's one all-gather makes the loss global.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Shard

from .fused_cross_entropy import linear_cross_entropy_sum

#: transformers config keys that transform the logits after the head: not fused
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": None, "logits_scaling": 1.0,
                    "output_multiplier_scale": None}


class LossHead(nn.Linear):
    """The output head, able to hand its input to the fused loss (module docstring)."""

    def __init__(self, head: nn.Linear, chunk_tokens: int | None = None):
        super().__init__(head.in_features, head.out_features, bias=False, device="meta")
        self.weight = head.weight  # the same Parameter: same name, ties kept
        self.chunk_tokens = chunk_tokens
        self._emit_hidden = False
        self._emitted: torch.Tensor | None = None

    @contextlib.contextmanager
    def hidden_states(self) -> Iterator[None]:
        """Inside: forward returns the hidden states (b, s, D) instead of the logits."""
        self._emit_hidden = True
        try:
            yield
        finally:
            self._emit_hidden, self._emitted = False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._emit_hidden:
            return F.linear(x, self.weight)
        if isinstance(x, DTensor):  # replicated over tp: each vocab shard's gradient is a partial sum
            x = x.to_local(grad_placements=[Partial() if p.is_replicate() else p for p in x.placements])
        self._emitted = x
        return x

    def check_output(self, out: torch.Tensor) -> None:
        """The model returned the head's output untouched (else the fused loss would not be
        the model's loss)."""
        emitted = self._emitted
        if out is emitted or (emitted is not None and out is emitted._base):
            return
        raise ValueError(
            "plan.fused_loss: the model's forward transforms the output head's result before returning it "
            "(scaling, soft-capping, slicing, or another module after the head), so the fused loss would not be "
            "its loss: set ParallelPlan(fused_loss=False)")

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed token cross entropy of the head's logits: hidden (b, s, D), labels (b, s)."""
        weight, group, start = self.weight, None, 0
        if isinstance(weight, DTensor):  # vocab-parallel: this rank's rows
            mesh = weight.device_mesh
            if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
                raise ValueError(f"fused_loss: the head's weight is {weight.placements} on {mesh}; the fused loss "
                                 f"needs it whole or vocab-sharded (Shard(0) on tp): set fused_loss=False")
            local = weight.to_local()
            group, start = mesh.get_group(), mesh.get_local_rank() * local.shape[0]
            weight = local
        if isinstance(hidden, DTensor):
            raise TypeError("LossHead.loss_sum takes the local hidden states its forward returned")
        return linear_cross_entropy_sum(hidden.flatten(0, 1), weight, labels.flatten(),
                                        chunk_tokens=self.chunk_tokens, vocab_group=group, vocab_start=start)

    def output_loss_sum(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:meth:`loss_sum` of what the model (or the last pipeline stage) returned, which must
        be the hidden states this head returned."""
        self.check_output(out)
        return self.loss_sum(out, labels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused_loss=True"


def find_head(model: nn.Module, styles: dict) -> str | None:
    """The name of the output head: the module with the ``"head"`` rule, else a transformers
    LM's output embeddings; None when neither names one."""
    from .tensor_parallel.styles import VocabHead

    named = [n for n, st in styles.items() if isinstance(st, VocabHead)]
    if len(named) == 1:
        return named[0]
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        return next((n for n, m in model.named_modules() if m is head), None)
    return None


def why_not_fused(model: nn.Module, styles: dict, tp: int) -> tuple[str | None, str | None]:
    """(head name, None) when the fused loss applies, else (head name or None, the reason)."""
    from .tensor_parallel.styles import VocabHead

    name = find_head(model, styles)
    if name is None:
        return None, (f"no output head is known for {type(model).__name__}: give it the rule 'head' in "
                      f"ParallelPlan.rules (e.g. {{'lm_head': 'head'}})")
    head = model.get_submodule(name)
    if type(head) is not nn.Linear:
        return name, (f"the output head {name!r} is a {type(head).__name__}, not a plain nn.Linear whose "
                      f"forward is the matmul the fused loss computes")
    if head.bias is not None:
        return name, f"the output head {name!r} has a bias, which the fused loss does not add"
    cfg = getattr(model, "config", None)
    for key, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(cfg, key, None)
        if value is not None and value != neutral:
            return name, f"config.{key}={value} transforms the logits after the head"
    style = styles.get(name)
    if tp > 1 and style is not None and not isinstance(style, VocabHead):
        return name, (f"under tp={tp} the output head {name!r} has the rule {type(style).__name__}: the fused "
                      f"loss needs the vocab-parallel 'head' rule (or none)")
    return name, None


def resolve_fused_loss(model: nn.Module, styles: dict, tp: int, fused_loss: bool | str) -> str | None:
    """The head to fuse (None: the unfused loss). ``fused_loss=True`` where it cannot apply is
    a ValueError naming the fix; ``"auto"`` quietly keeps the unfused loss there."""
    if fused_loss is False:
        return None
    name, reason = why_not_fused(model, styles, tp)
    if reason is None:
        return name
    if fused_loss is True:
        raise ValueError(f"fused_loss=True: {reason}. Use fused_loss='auto' (fused where it applies) or False")
    return None


def install_loss_head(model: nn.Module, name: str, chunk_tokens: int | None) -> LossHead:
    """Replace the head ``name`` of ``model`` by a :class:`LossHead` sharing its weight."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    head = LossHead(model.get_submodule(name), chunk_tokens)
    setattr(parent, attr, head)
    return head
