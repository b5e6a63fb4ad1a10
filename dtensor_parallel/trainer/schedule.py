"""Learning-rate schedule and AdamW with Megatron's weight-decay grouping.

Schedule, as a function of the optimizer step ``s`` (0-based, the step about to be taken),
peak ``lr``, floor ``min_lr``, ``W`` warmup steps and ``T`` total steps:

- warmup, ``s < W``: ``lr (s + 1) / W`` (linear; the first step already moves, the
  step ``W - 1`` reaches the peak);
- decay, ``W <= s``: with progress ``x = min(1, (s - W) / (T - W))``,

  - cosine: ``min_lr + (lr - min_lr) (1 + cos(pi x)) / 2``,
  - linear: ``min_lr + (lr - min_lr) (1 - x)``,
  - constant: ``lr``,

  so ``s = W`` is the peak and ``s = T`` is ``min_lr`` (Megatron's ``lr_decay_iters = T``).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..adamw import AdamW, state_dtype_of


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          style: str = "cosine") -> float:
    """The learning rate of optimizer step ``step`` (see the module docstring)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if style == "constant":
        return lr
    span = max(total_steps - warmup_steps, 1)
    x = min(max(step - warmup_steps, 0) / span, 1.0)
    if style == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * x))
    if style == "linear":
        return min_lr + (lr - min_lr) * (1.0 - x)
    raise ValueError(f"lr decay style {style!r}: choose cosine, linear or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int,
                    total_steps: int, style: str = "cosine") -> LambdaLR:
    """``LambdaLR`` whose factor is ``lr_at(step) / lr`` (the optimizer's lr is the peak)."""
    def factor(step: int) -> float:
        peak = lr_at(step, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
                     total_steps=total_steps, style=style)
        return peak / lr if lr > 0 else 0.0

    return LambdaLR(optimizer, factor)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights and every 1-D parameter (gains, biases) are not decayed (Megatron,
    GPT-2/3): decay pulls a gain towards 0, i.e. towards switching the layer off."""
    parts = name.split(".")
    owner = parts[-2] if len(parts) > 1 else ""  # the module holding the parameter
    return param.ndim < 2 or "norm" in owner


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, keep = [], []
    for name, p in named_params:
        if p.requires_grad:
            (keep if no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    state_dtype: str = "fp32") -> torch.optim.Optimizer:
    """AdamW (decoupled decay, Loshchilov & Hutter 2019) over two groups: decayed matrices
    (projections, embedding, head) and undecayed norm weights / 1-D parameters. Works on
    DTensor parameters: each rank updates its own shards. ``state_dtype`` "fp32": torch's
    AdamW; "bf16": ours with bf16 moments (``dtensor_parallel/adamw.py``)."""
    groups = param_groups(named_params, weight_decay)
    if state_dtype_of(state_dtype) is torch.bfloat16:
        return AdamW(groups, lr=lr, betas=betas, eps=eps, state_dtype=torch.bfloat16)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)



def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's settings (lr, initial_lr, betas, eps, weight_decay ...), without
    its parameters: what :func:`reapply_hyperparameters` puts back after a load."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def reapply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, groups: list[dict]) -> None:
    """After a checkpoint load: this run's settings, at the checkpoint's position.

    Loading restores the saved param groups (their lr, ``initial_lr``, betas, eps, weight
    decay) and the scheduler's ``base_lrs``, while the schedule's factor comes from this
    run's config: a new ``--lr`` changed only the factor's denominator (asked peak 1e-4,
    got 5.14e-4). Here every group setting but the current lr goes back to ``groups`` (the
    freshly built optimizer's, from :func:`hyperparameters`), ``base_lrs`` to its
    ``initial_lr`` (the config's peak), and the current lr is recomputed by the config's
    schedule at the loaded position ``scheduler.last_epoch`` (the optimizer steps taken)."""
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"the optimizer has {len(optimizer.param_groups)} param groups, the settings "
                         f"{len(groups)}")
    for g, fresh in zip(optimizer.param_groups, groups):
        g.update({k: v for k, v in fresh.items() if k != "lr"})
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for g, factor, base in zip(optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs):
        g["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
