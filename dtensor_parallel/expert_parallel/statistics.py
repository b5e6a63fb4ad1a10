"""MoE load balancing across ranks: where the router's statistics are summed, the
auxiliary loss's weight per micro-batch, the step's balancing statistics and the
aux-loss-free bias update.

Semantics (the reference is one device running the same micro-batches): each MoE
layer's balancing losses are those of a whole micro-batch, the sum over every rank's
tokens of it (the router sums its statistics through the layer's dispatcher, which
``ParallelDispatch`` gives the sequence and batch groups; see ``models.moe.balancing_loss``), and a
training step adds the mean
over its micro-batches to the objective. This is Megatron-Core's ``aux_loss`` computed
over the global micro-batch rather than per data-parallel rank (its
``global_aux_loss``): the same value in every layout, so parity with one device is
exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..models.moe import MoELayer, MoEStep


def moe_layers(modules: list[nn.Module]) -> list[MoELayer]:
    return [m for module in modules for m in module.modules() if isinstance(m, MoELayer)]


def share_step(layers: list[MoELayer]) -> MoEStep:
    """Give the layers one step-accounting object (returned), so a step sets it once."""
    step = MoEStep()
    for moe in layers:
        moe.step = step
    return step


def collect_only_inside(step: MoEStep, pipeline) -> None:
    """Under a pipeline, count only the schedule's micro-batch forwards (not torch's
    shape-inference forward of the first step)."""
    def switch(on: bool) -> None:
        step.collect_stats = on
    switch(False)
    pipeline.around_forward_chunks(switch)


def start_step(layers: list[MoELayer], step: MoEStep, n_micro: int) -> None:
    """Before a step's forwards: each micro-batch's aux loss counts 1 / n_micro."""
    step.aux_loss_scale = 1.0 / n_micro
    for moe in layers:
        moe.step_aux_loss = moe.step_routed_counts = None


def step_stats(layers: list[MoELayer], pp_group: dist.ProcessGroup | None, device: torch.device) -> dict[str, float]:
    """The last step's balancing statistics over the whole model (every rank gets the
    same; collective over the pipeline stages):

    - ``moe_aux_loss``: the auxiliary (+ z) loss added to the objective, summed over layers;
    - ``moe_max_load``: mean over layers of (most-loaded expert's slots / mean slots), 1.0
      is perfect balance;
    - ``moe_min_load``: the same with the least-loaded expert (0.0: an expert got nothing).
    """
    live = [moe for moe in layers if moe.step_routed_counts is not None]
    aux = max_load = min_load = torch.zeros((), device=device)
    if live:
        shares = torch.stack([moe.step_aux_loss.to(device).reshape(()) for moe in live])
        dispatch = live[0].dispatch  # every layer has the same groups
        shares = dispatch.sum_over_batch(dispatch.sum_over_sequence(shares))  # the shares add up to the loss
        loads = torch.stack([moe.step_routed_counts.float().to(device) for moe in live])  # (layers, E)
        mean = loads.mean(1).clamp_min(1e-9)  # counts are already summed over those ranks
        aux, max_load, min_load = shares.sum(), (loads.max(1).values / mean).sum(), (loads.min(1).values / mean).sum()
    n = torch.tensor(float(len(live)), device=device)
    summary = torch.stack([aux, max_load, min_load, n])
    if pp_group is not None:
        dist.all_reduce(summary, group=pp_group)
    aux, max_load, min_load, n = summary.tolist()
    if n == 0:
        return {}
    return {"moe_aux_loss": aux, "moe_max_load": max_load / n, "moe_min_load": min_load / n}


def update_expert_biases(layers: list[MoELayer]) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): after the optimizer step, nudge each layer's
    expert bias by the step's routed counts (the same on every rank holding the layer)."""
    for moe in layers:
        if moe.args.expert_bias and moe.step_routed_counts is not None:
            moe.router.update_expert_bias(moe.step_routed_counts)
