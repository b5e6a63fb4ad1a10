"""Where a training step's bytes go: ``torch.cuda.memory_allocated()`` at phase boundaries and
the peak within each phase, over one step (issue 23).

Phases, each ending at a mark:

- ``forward``: the step's start to the end of the model's forward (a forward hook on the root
  module): the activations kept for backward, plus the model's output;
- ``loss``: to the gradient of the model's output (a hook on that tensor): the loss, and its
  backward as far as the output (the logits and their gradient, or the fused loss's chunks);
- ``backward``: to the return of the backward (the step says so: ``mark("backward")``);
- ``optimizer``: to the end of gradient clipping and the optimizer step (``mark("optimizer")``).

The peak counter restarts at each mark (``reset_peak_memory_stats``), so the caller reads the
step-level peaks it reports before :func:`measure_phases` runs its step. Under pipeline
parallelism forward and backward interleave (1F1B), so there are no such phases (the caller
passes no root). On the CPU the marks still come in order, with no bytes (``None``).
"""

from __future__ import annotations

from typing import Callable

import torch

GIB = 2**30


class PhaseMarks:
    """The marks of one step: ``[{"phase", "allocated_gib", "peak_gib"}]`` in order."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.rows: list[dict] = []

    def begin(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.rows = [{"phase": "start", **self._read()}]

    def _read(self) -> dict:
        if not self.cuda:
            return {"allocated_gib": None, "peak_gib": None}
        return {"allocated_gib": torch.cuda.memory_allocated() / GIB, "peak_gib": torch.cuda.max_memory_allocated() / GIB}

    def mark(self, phase: str) -> None:
        """Close ``phase``: bytes allocated now and the peak since the previous mark."""
        self.rows.append({"phase": phase, **self._read()})
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def on_forward(self, module: torch.nn.Module, args, out) -> None:
        """Forward hook of the root module: the ``forward`` mark, and a hook on the output's
        gradient for the ``loss`` mark."""
        if any(r["phase"] == "forward" for r in self.rows):  # (a second forward in the step: not ours to split)
            return
        self.mark("forward")
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: self.mark("loss"))


def measure_phases(step: Callable, x: torch.Tensor, y: torch.Tensor, root: torch.nn.Module) -> list[dict]:
    """One more step, ``step(x, y, mark=...)``, with the marks above; returns their rows
    (``start`` first: what the step began with, parameters, gradients and optimizer state)."""
    marks = PhaseMarks()
    handle = root.register_forward_hook(marks.on_forward)
    try:
        marks.begin()
        step(x, y, mark=marks.mark)
        if marks.cuda:
            torch.cuda.synchronize()
    finally:
        handle.remove()
    return marks.rows
