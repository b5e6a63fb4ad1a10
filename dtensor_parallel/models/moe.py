"""Mixture-of-Experts feed-forward: router, load balancing, capacity or dropless experts.

Router (per token, in fp32): logits = x W_r^T; scores = softmax(logits) (Mixtral, Switch)
or sigmoid(logits) (DeepSeek-V3); the top-k experts by score (plus, with aux-loss-free
balancing, a per-expert bias used for the *choice only*, DeepSeek-V3 sec. 2.1.2); the
combine weights are the chosen scores, renormalized to sum to 1 when ``route_norm``.

Load balancing, as Megatron-Core's ``--moe-router-load-balancing-type``:

- ``aux_loss`` (Switch Transformer, Fedus et al. 2021): ``coeff * E * sum_e f_e P_e`` with
  f_e the fraction of the T*k routed slots that went to expert e and P_e the mean score of
  expert e over the tokens;
- ``seq_aux_loss`` (DeepSeek-V2/V3): the same per sequence, averaged over sequences;
- ``none``. Independently, the router z-loss (ST-MoE, Zoph et al. 2022):
  ``z_coeff * mean_t logsumexp(logits_t)^2``.

Capacity: with ``capacity_factor`` c each expert takes at most ceil(c T k / E) slots, in
token order (first come, first served); later slots are dropped (their weight is lost, as
in Switch). ``None`` is dropless, the default (Megatron's ``--moe-token-dispatcher-type
alltoall`` with no capacity).

Experts run as one grouped GEMM over expert-contiguous rows (``torch._grouped_mm`` on
CUDA where it exists; a loop over experts elsewhere). The layer keeps its last auxiliary
loss in ``self.aux_loss`` and its routed-token counts in ``self.tokens_per_expert``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MoEArgs:
    n_experts: int = 8
    top_k: int = 2
    hidden_dim: int = 14336  # per routed expert
    n_shared_experts: int = 0  # each of hidden_dim, always on
    score_func: str = "softmax"  # or "sigmoid"
    route_norm: bool = True
    load_balance: str = "aux_loss"  # "aux_loss" | "seq_aux_loss" | "none"
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    expert_bias: bool = False  # aux-loss-free balancing
    bias_update_rate: float = 1e-3
    capacity_factor: float | None = None  # None: dropless

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..n_experts={self.n_experts}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func={self.score_func!r}: choose 'softmax' or 'sigmoid'")
        if self.load_balance not in ("aux_loss", "seq_aux_loss", "none"):
            raise ValueError(f"load_balance={self.load_balance!r}: choose aux_loss, seq_aux_loss or none")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0 (or None: dropless)")


class Router(nn.Module):
    def __init__(self, dim: int, args: MoEArgs):
        super().__init__()
        self.args = args
        self.gate = nn.Linear(dim, args.n_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(args.n_experts), persistent=True)

    def forward(self, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (T, dim) with T = batch * seq. Returns top-k expert ids (T, k), combine weights
        (T, k) and the auxiliary loss (a scalar)."""
        a = self.args
        dt = torch.promote_types(x.dtype, torch.float32)  # at least fp32
        logits = F.linear(x.to(dt), self.gate.weight.to(dt))  # (T, E)
        scores = logits.softmax(-1) if a.score_func == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias if a.expert_bias else scores
        expert_ids = choice.topk(a.top_k, dim=-1).indices  # (T, k)
        weights = scores.gather(-1, expert_ids)
        if a.route_norm and a.top_k > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        return expert_ids, weights, self._aux_loss(logits, scores, expert_ids, batch)

    def _aux_loss(self, logits, scores, expert_ids, batch: int) -> torch.Tensor:
        a = self.args
        loss = logits.new_zeros(())
        if a.load_balance != "none" and a.aux_loss_coeff:
            onehot = F.one_hot(expert_ids, a.n_experts).sum(1).to(scores.dtype)  # (T, E) slots per expert
            probs = scores / scores.sum(-1, keepdim=True) if a.score_func == "sigmoid" else scores
            if a.load_balance == "aux_loss":
                f = onehot.mean(0) / a.top_k  # (E,) fraction of slots
                p = probs.mean(0)
                loss = loss + a.aux_loss_coeff * a.n_experts * (f * p).sum()
            else:  # per sequence, then averaged
                f = onehot.view(batch, -1, a.n_experts).mean(1) / a.top_k  # (b, E)
                p = probs.view(batch, -1, a.n_experts).mean(1)
                loss = loss + a.aux_loss_coeff * a.n_experts * (f * p).sum(-1).mean()
        if a.z_loss_coeff:
            loss = loss + a.z_loss_coeff * torch.logsumexp(logits, -1).pow(2).mean()
        return loss

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower the
        over-loaded ones' (sign of the gap to the mean load). Call after each step."""
        load = tokens_per_expert.float()
        self.expert_bias += self.args.bias_update_rate * torch.sign(load.mean() - load)


def expert_slots(expert_ids: torch.Tensor, n_experts: int, capacity: int | None):
    """Sort the (token, slot) pairs by expert (stable: token order within an expert) and
    apply the capacity. Returns the kept flat slot indices in expert order (t * k + j),
    tokens per expert after dropping (E,), and the keep mask over the T*k slots."""
    flat = expert_ids.reshape(-1)  # (T*k,)
    order = torch.sort(flat, stable=True).indices  # slots in expert order
    counts = torch.bincount(flat, minlength=n_experts)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        dropped = order[rank_in_expert >= capacity]
        keep[dropped] = False
        counts = counts.clamp(max=capacity)
    return order[keep[order]], counts, keep


def grouped_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                   counts: torch.Tensor) -> torch.Tensor:
    """Per-expert SwiGLU over expert-contiguous rows. x: (N, dim); w1, w3: (E, dim, F);
    w2: (E, F, dim); counts: rows per expert (sum N)."""
    if x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)
        return torch._grouped_mm(h, w2, offs=offs)
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):  # CPU / fallback: one matmul pair per expert
        xe = x[start:start + n]
        outs.append((F.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e])
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[-1])


class MoE(nn.Module):
    """Routed experts (+ optional shared experts) replacing a dense SwiGLU feed-forward."""

    def __init__(self, dim: int, args: MoEArgs):
        super().__init__()
        self.args = args
        self.router = Router(dim, args)
        e, f = args.n_experts, args.hidden_dim
        self.w1 = nn.Parameter(torch.empty(e, dim, f))
        self.w3 = nn.Parameter(torch.empty(e, dim, f))
        self.w2 = nn.Parameter(torch.empty(e, f, dim))
        self.shared = None
        if args.n_shared_experts:
            from .llama import FeedForward
            self.shared = FeedForward(dim, f * args.n_shared_experts)
        self.aux_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None
        self.ep_groups = None  # set by expert parallelism: experts sharded, tokens exchanged
        self.dispatch_backend = "torch"  # "triton": the kernels of triton_kernels/moe_dispatch.py
        nn.init.normal_(self.w1, std=0.02)
        nn.init.normal_(self.w3, std=0.02)
        nn.init.normal_(self.w2, std=0.02)

    def capacity(self, n_tokens: int) -> int | None:
        c = self.args.capacity_factor
        return None if c is None else math.ceil(c * n_tokens * self.args.top_k / self.args.n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        flat = x.reshape(-1, d)  # (T, d)
        expert_ids, weights, self.aux_loss = self.router(flat, b)
        k = self.args.top_k
        capacity = self.capacity(flat.shape[0])
        kernels = self.dispatch_backend == "triton" and capacity is None  # the kernels are dropless
        if kernels:
            from triton_kernels.moe_dispatch import permute, unpermute
            rows, slots = permute(flat, expert_ids, n_experts=self.args.n_experts)  # same order as below
            counts = torch.bincount(expert_ids.reshape(-1), minlength=self.args.n_experts)
        else:
            slots, counts, _ = expert_slots(expert_ids, self.args.n_experts, capacity)
            rows = flat[slots // k]  # (N, d) permuted: one copy per kept (token, expert)
        self.tokens_per_expert = counts.detach()
        if self.ep_groups is None:
            y = grouped_swiglu(rows, self.w1, self.w3, self.w2, counts)  # (N, d)
        else:  # expert parallel: the rows travel to the ranks holding their experts and back
            from ..expert_parallel import dispatch_combine
            w1, w3, w2 = (w.to_local() for w in (self.w1, self.w3, self.w2))
            y = dispatch_combine(rows, counts, lambda x, c: grouped_swiglu(x, w1, w3, w2, c), self.ep_groups)
        if kernels:
            out = unpermute(y, slots, weights).to(flat.dtype)  # weighted combine, fp32 accumulation
        else:
            w = weights.reshape(-1)[slots].unsqueeze(-1).to(y.dtype)  # (N, 1); dropped slots are absent
            out = torch.zeros_like(flat).index_add_(0, slots // k, y * w)  # unpermute + combine
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(b, s, d)
