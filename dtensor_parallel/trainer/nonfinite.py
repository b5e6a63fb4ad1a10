"""Non-finite steps: skipped (never applied), counted, and a run that keeps producing them stops.

A step whose loss or global gradient norm is NaN or infinite is *skipped*: its gradients
are dropped, the optimizer, the LR schedule and the MoE expert biases do not move, and its
batch is not retried (the next step reads the next batch), as Megatron skips and counts an
iteration whose gradients overflowed. A spike from one bad batch costs one step; a run
whose weights have diverged produces nothing but non-finite steps, so after
``max_nonfinite_steps`` skipped steps *in a row* the next non-finite one stops the run with
:class:`NonFiniteError` (``0``: stop at the first). A run so stopped never applied a
non-finite update, so its state, and every checkpoint it published, is the last finite one.

The decision is collective. The loss is reduced over dp x cp (and pp) and the norm over
the whole world, so every rank already holds the same two numbers; still, every rank's pair
is all-gathered (two floats a rank) and each rank decides from all of them, so no rank can
take the other branch, whatever a backend's or a loss path's rounding does: the branch a
rank takes decides which collectives it runs next, and a rank on the other branch would
hang the job. The error message is then the same on every rank too (it names the first
rank that saw a non-finite value where the ranks disagree). The cost is one tiny all-gather
and one host sync per step, before the optimizer step (Megatron syncs there too, to read its
grad norm).

Saving: a finite step can still overflow a weight or a moment (an enormous learning rate),
and the next step's loss will say so only after the save. :func:`state_is_finite` checks
every local parameter and optimizer tensor, agreed over the world the same way, and the
loop does not save a state that fails it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


class NonFiniteError(FloatingPointError):
    """The run stopped: too many non-finite steps in a row, or a non-finite state to save."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _gather_pairs(loss: torch.Tensor, grad_norm: torch.Tensor, device: torch.device) -> list[tuple[float, float]]:
    """Every rank's (loss, grad norm), on every rank (collective over the world)."""
    mine = torch.stack([t.detach().reshape(()).float().to(device) for t in (loss, grad_norm)])
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [tuple(mine.tolist())]
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [tuple(t.tolist()) for t in everyone]


def _agree_any(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank (collective over the world)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


class NonFiniteGuard:
    """Decides, identically on every rank, whether a step is applied; counts the skipped ones.

    ::

        guard = NonFiniteGuard(limit=3, device=pm.device)
        ok = guard.check(step, loss, grad_norm)    # collective; raises NonFiniteError past the limit
        if ok:
            opt.step(); sched.step()
        opt.zero_grad(set_to_none=True)
    """

    def __init__(self, limit: int, device: torch.device, *, skipped: int = 0):
        if limit < 0:
            raise ValueError(f"max_nonfinite_steps={limit} must be >= 0")
        self.limit, self.device = limit, device
        self.skipped = skipped  # non-finite steps skipped in all (carried across resumes)
        self.in_a_row = 0
        self.first_in_a_row: int | None = None
        self.last_reason = ""

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether optimizer step ``step`` (1-based) may be applied (collective).

        Skipped steps are counted; the ``limit + 1``-th in a row raises :class:`NonFiniteError`
        on every rank (the same message)."""
        pairs = _gather_pairs(loss, grad_norm, self.device)  # the same list on every rank
        bad = [r for r, (lv, gv) in enumerate(pairs) if not (math.isfinite(lv) and math.isfinite(gv))]
        if not bad:
            self.in_a_row, self.first_in_a_row = 0, None
            return True
        loss_v, gn_v = pairs[bad[0]]
        self.last_reason = f"loss {_fmt(loss_v)}, grad norm {_fmt(gn_v)}"
        if len(bad) < len(pairs):  # the ranks disagree: name who saw it
            self.last_reason += f" on rank {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
        self.in_a_row += 1
        self.first_in_a_row = self.first_in_a_row or step
        if self.in_a_row > self.limit:
            steps = (f"step {step}" if self.in_a_row == 1
                     else f"{self.in_a_row} steps in a row, {self.first_in_a_row}-{step}")
            raise NonFiniteError(
                f"non-finite loss or gradient norm at {steps} ({self.last_reason}); none of them was "
                f"applied and no non-finite state was saved; stopping (the limit is "
                f"--max-nonfinite-steps {self.limit} skipped steps in a row): resume from the last "
                f"checkpoint with a lower --lr, a longer --lr-warmup-iters or a smaller --clip-grad")
        self.skipped += 1
        return False

    def describe_skip(self) -> str:
        """One line about the step just skipped."""
        return (f"skipped: {self.last_reason}; not applied ({self.in_a_row} in a row, {self.skipped} in all; "
                f"the run stops after {self.limit} in a row: --max-nonfinite-steps)")


@torch.no_grad()
def state_is_finite(params, optimizer: torch.optim.Optimizer | None, device: torch.device) -> bool:
    """Whether every parameter and optimizer-state tensor on every rank is finite (collective).

    Each rank checks its local shards; the verdict is agreed over the world."""
    tensors = [_local(p) for p in params]
    if optimizer is not None:
        tensors += [_local(v) for s in optimizer.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor) and v.is_floating_point()]
    flags = [(~torch.isfinite(t)).any().to(device) for t in tensors if t.numel()]  # no host sync per tensor
    local_bad = bool(torch.stack(flags).any()) if flags else False
    return not _agree_any(local_bad, device)
