"""The MoE dispatchers of parallel layouts: the ``LocalDispatch`` interface of
``models/moe.py`` with communication and kernels.

:class:`ParallelDispatch` is injected into every MoE layer by ``apply_expert_parallel``:

- ``permute`` / ``combine``: torch's sort and index-add, or the Triton permute/unpermute
  kernels (``triton_kernels/moe_dispatch.py``, dropless only: under a capacity the torch
  path runs);
- ``run_experts``: with EP, the rows travel to the ranks holding their experts and back
  (:func:`dispatch_combine`: GShard / Megatron's alltoall dispatcher, NCCL; with the Triton
  kernels on GPUs of one host, ``symm_dispatch.symm_dispatch_combine``: symmetric memory, no
  host sync; in chunks beside the experts' compute with ``chunks`` > 1: ``overlap.py``);
  without, the layer's local grouped GEMM;
- ``sum_over_sequence`` / ``sum_over_batch``: the routing statistics summed over the ranks
  holding the same sequences' other positions (cp, and tp: MoE layers run token parallel
  over tp) and over the ranks holding other sequences (dp).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from ..models.moe import LocalDispatch
from .groups import ExpertGroups


class KernelSlots(NamedTuple):
    """The Triton permute's slots: ``pos`` (T*k,) int32, the sorted row of each flat entry
    ``t*k + j`` (the inverse of torch's slot order), which the Triton combine reads."""

    pos: torch.Tensor


class ParallelDispatch(LocalDispatch):
    def __init__(self, *, kernels: str = "torch", groups: ExpertGroups | None = None,
                 seq_groups: tuple[dist.ProcessGroup, ...] = (), batch_groups: tuple[dist.ProcessGroup, ...] = (),
                 exchange: str = "auto", recv_bound: float | None = None, chunks: int = 1):
        """``exchange`` (with kernels="triton" and ep > 1): "symm" (symmetric memory; an
        error where it cannot run), "nccl", or "auto" (symm where it can run, else NCCL with
        one log line). ``recv_bound``: the rows a rank may receive per MoE layer, as a multiple
        of its own T*k (default ep: never exceeded; see ``symm_dispatch.py``);
        ``ParallelPlan.moe_recv_bound`` sets it for ``parallelize``. ``chunks`` > 1: the
        tokens in that many chunks, each one's exchange beside another's experts
        (``overlap.py``; the symmetric-memory exchange only, dropless only; elsewhere one
        exchange a layer); ``ParallelPlan.moe_dispatch_chunks`` sets it."""
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"moe_dispatch chunks={chunks!r} must be an int >= 1 (ParallelPlan.moe_dispatch_chunks)")
        if kernels not in ("torch", "triton"):
            raise ValueError(f"moe_dispatch kernels={kernels!r}: choose 'torch' or 'triton'")
        if exchange not in ("auto", "symm", "nccl"):
            raise ValueError(f"moe_dispatch exchange={exchange!r}: choose 'auto', 'symm' or 'nccl'")
        if recv_bound is not None and not recv_bound > 0:
            raise ValueError(f"moe_dispatch recv_bound={recv_bound} must be > 0 (a multiple of T*k), or None "
                             f"(ParallelPlan.moe_recv_bound)")
        self.kernels = kernels
        self.groups = groups if groups is not None and groups.ep > 1 else None
        self.seq_groups, self.batch_groups = tuple(seq_groups), tuple(batch_groups)
        self.recv_bound, self.chunks = recv_bound, chunks
        self.exchange = "nccl"
        if kernels == "triton" and self.groups is not None:  # before any collective of the layer
            from .symm_dispatch import choose_exchange

            mesh = self.groups.ep_mesh
            self.exchange = choose_exchange(self.groups.ep, mesh.device_type, exchange)

    def experts_of_tokens(self, flat, expert_ids, weights, n_experts, capacity, experts, shared=None):
        if self.chunks > 1 and self.groups is not None and self.exchange != "nccl" and capacity is None:
            return _chunked_experts(self, flat, expert_ids, weights, n_experts, experts, shared)
        return super().experts_of_tokens(flat, expert_ids, weights, n_experts, capacity, experts, shared)

    def permute(self, flat, expert_ids, n_experts, capacity):
        if self.kernels != "triton" or capacity is not None:  # the kernels are dropless
            return super().permute(flat, expert_ids, n_experts, capacity)
        # the same order as torch's; counts (int64, as bincount) and the inverse map from the
        # same two launches (routing + copy), so neither bincount nor an inversion runs
        rows, counts, pos = _triton_permute(flat, expert_ids, n_experts)
        return rows, KernelSlots(pos), counts

    def combine(self, y, slots, weights, flat):
        if not isinstance(slots, KernelSlots):  # the torch path's slots (capacity, or kernels="torch")
            return super().combine(y, slots, weights, flat)
        return _triton_unpermute(y, weights, slots.pos)  # weighted combine, fp32 accumulation

    def run_experts(self, rows, counts, experts):
        if self.groups is None:
            return experts(rows, counts)
        if self.exchange != "nccl":
            return _symm_dispatch_combine(rows, counts, experts, self.groups.ep_group, self.exchange, self.recv_bound)
        return dispatch_combine(rows, counts, experts, self.groups)

    def sum_over_sequence(self, t):
        return _sum_over(t, self.seq_groups)

    def sum_over_batch(self, t):
        return _sum_over(t, self.batch_groups)


# Compiled blocks (compile="auto" on CUDA) run the Triton routing and the symmetric-memory
# exchange eagerly: their launchers keep per-device/stream state (the routing ticket, the
# workspace) that Dynamo cannot trace (on 2 x H200 it failed on the current stream's
# handle). The MoE layer breaks the graph at its dispatch anyway (split sizes on the host).
@torch.compiler.disable
def _triton_permute(flat, expert_ids, n_experts):
    from triton_kernels import moe_dispatch

    rows, _, counts, pos = moe_dispatch.permute(flat, expert_ids, n_experts=n_experts, routing=True)
    return rows, counts, pos


@torch.compiler.disable
def _triton_unpermute(y, weights, pos):
    from triton_kernels import moe_dispatch

    return moe_dispatch.unpermute(y, None, weights, pos=pos)


@torch.compiler.disable
def _symm_dispatch_combine(rows, counts, experts, group, exchange, recv_bound):
    from .symm_dispatch import symm_dispatch_combine

    return symm_dispatch_combine(rows, counts, experts, group, exchange, recv_bound)


@torch.compiler.disable
def _chunked_experts(dispatch: ParallelDispatch, flat, expert_ids, weights, n_experts, experts, shared):
    from .overlap import chunked_experts

    return chunked_experts(dispatch, flat, expert_ids, weights, n_experts, experts, shared, dispatch.chunks,
                           dispatch.groups.ep_group, dispatch.exchange, dispatch.recv_bound)


def _sum_over(t: torch.Tensor, groups) -> torch.Tensor:
    """Sum of a statistics tensor over ranks (no gradient flows through it)."""
    t = t.detach()
    for g in groups:
        t = funcol.all_reduce(t, "sum", g)
    return t


def dispatch_combine(rows: torch.Tensor, counts: torch.Tensor, experts, groups: ExpertGroups) -> torch.Tensor:
    """rows (N, d) sorted by global expert with ``counts`` (E,) rows each; ``experts(x,
    local_counts)`` runs this rank's experts on rows grouped by local expert. Returns the
    expert outputs in the order of ``rows``."""
    ep, group = groups.ep, groups.ep_group
    e_local = counts.numel() // ep
    # (ep * e_local): from each source rank, its row count for each of our experts
    recv = funcol.wait_tensor(funcol.all_to_all_single(counts, None, None, group))
    send_split = counts.view(ep, e_local).sum(1).tolist()
    recv_by_src = recv.view(ep, e_local)
    recv_split = recv_by_src.sum(1).tolist()
    got = funcol.wait_tensor(funcol.all_to_all_single_autograd(rows, recv_split, send_split, group))
    # rows arrive by source rank, then by local expert: a stable sort by local expert
    # regroups them (by expert, then by source), on the device, without host syncs
    local_expert = torch.arange(e_local, device=rows.device).repeat(ep)  # (ep * e_local)
    perm = torch.sort(local_expert.repeat_interleave(recv_by_src.flatten(), output_size=got.shape[0]),
                      stable=True).indices
    y = torch.empty_like(got)
    y = y.index_copy(0, perm, experts(got[perm], recv_by_src.sum(0)))
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(y, send_split, recv_split, group))
