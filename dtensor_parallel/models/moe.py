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
CUDA where it exists; a loop over experts elsewhere).

Training with the balancing losses: the layer's output carries them into the backward
(``_AuxLossGrad``: identity forward, gradient 1 for the loss), so any backward through the
model, a pipeline stage's included, trains the router; the language-model loss the caller
computes stays pure. ``step.aux_loss_scale`` weights each forward (1 / micro-batches under
``ParallelModel``). The layer keeps its last share in ``self.aux_loss``, its routed-token
counts in ``self.tokens_per_expert``, and the step's sums in ``step_aux_loss`` /
``step_routed_counts``.

The layer knows nothing of parallelism. It takes two injected objects, each with a
one-device default here:

- ``dispatch`` (:class:`LocalDispatch`): how routed rows are permuted, run through the
  experts, and combined back, and how the routing statistics are summed over the ranks
  holding the micro-batch's other tokens. Expert parallelism (all-to-all to the ranks
  owning the experts), the Triton permute kernels and the statistic reductions of a
  parallel layout implement the same methods (``dtensor_parallel/expert_parallel``);
- ``step`` (:class:`MoEStep`): the training step's accounting (the aux loss weight per
  forward, whether this forward counts), shared by the layers of one model.

:class:`MoELayer` is that forward, whatever the weights' names and layout; :class:`MoE` is
ours (``w1``/``w3``/``w2`` as (E, dim, F) / (E, F, dim)), and ``plans/hf_moe.py`` adapts
transformers' sparse blocks (fused ``gate_up_proj``) to it, so expert parallelism, the TP
style and the statistics see one kind of layer.
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
        self.routed_counts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, batch: int, dispatch: "LocalDispatch | None" = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (T, dim) with T = batch * seq. Returns top-k expert ids (T, k), combine weights
        (T, k) and this rank's share of the auxiliary loss (see :func:`route`); keeps
        ``self.routed_counts``."""
        bias = self.expert_bias if self.args.expert_bias else None
        expert_ids, weights, aux, self.routed_counts = route(x, token_local(self.gate.weight), self.args, batch,
                                                             dispatch, bias)
        return expert_ids, weights, aux

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower the
        over-loaded ones' (sign of the gap to the mean load). Call after each step."""
        load = tokens_per_expert.float()
        self.expert_bias += self.args.bias_update_rate * torch.sign(load.mean() - load)


def route(x: torch.Tensor, weight: torch.Tensor, args: MoEArgs, batch: int, dispatch: "LocalDispatch | None" = None,
          expert_bias: torch.Tensor | None = None):
    """The router's math, in at least fp32. x: (T, dim) with T = batch * seq, ``weight``
    (E, dim). Returns top-k expert ids (T, k), combine weights (T, k), this rank's share of
    the auxiliary loss (a scalar; see :func:`balancing_loss`) and the slots per expert (E,)
    over every rank's tokens. ``dispatch`` sums the statistics over the ranks holding the
    other tokens (default: one device); ``expert_bias`` shifts the choice only."""
    dispatch = dispatch if dispatch is not None else LocalDispatch()
    a = args
    dt = torch.promote_types(x.dtype, torch.float32)
    logits = F.linear(x.to(dt), weight.to(dt))  # (T, E)
    scores = logits.softmax(-1) if a.score_func == "softmax" else logits.sigmoid()
    choice = scores + expert_bias if expert_bias is not None else scores
    expert_ids = choice.topk(a.top_k, dim=-1).indices  # (T, k)
    weights = scores.gather(-1, expert_ids)
    if a.route_norm and a.top_k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    aux, routed_counts = balancing_loss(logits, scores, expert_ids, batch, dispatch, a)
    return expert_ids, weights, aux, routed_counts


def balancing_loss(logits, scores, expert_ids, batch: int, dispatch: "LocalDispatch", a: MoEArgs):
    """This rank's share of the balancing losses of the whole micro-batch, and the slots
    per expert (E,) over every rank's tokens.

    The statistics (slots per expert, token and sequence counts) are summed over the
    ranks holding the micro-batch's other tokens (``dispatch.sum_over_sequence``: the
    same sequences' other positions, cp and tp; ``sum_over_batch``: other sequences, dp), and
    the score sums enter with the rank's own tokens only. So the shares of all ranks
    add up to the loss of the whole micro-batch, and since data-parallel gradients are
    summed, the gradient is exactly that of one device seeing the whole micro-batch.
    Without groups the share is the loss itself."""
    E, k, T = a.n_experts, a.top_k, logits.shape[0]
    stats = torch.cat([torch.bincount(expert_ids.reshape(-1), minlength=E).to(logits.dtype),
                       logits.new_tensor([T])])
    stats = dispatch.sum_over_batch(dispatch.sum_over_sequence(stats.detach()))
    routed_counts, tokens = stats[:E], stats[E]
    loss = logits.new_zeros(())
    if a.load_balance != "none" and a.aux_loss_coeff:
        probs = scores / scores.sum(-1, keepdim=True) if a.score_func == "sigmoid" else scores
        if a.load_balance == "aux_loss":
            f = routed_counts / (tokens * k)  # (E,) fraction of the slots
            p_share = probs.sum(0) / tokens  # (E,) this rank's part of the mean score
            loss = loss + a.aux_loss_coeff * E * (f * p_share).sum()
        else:  # per sequence, then averaged over the micro-batch's sequences
            onehot = F.one_hot(expert_ids, E).sum(1).to(scores.dtype).view(batch, -1, E)
            per_seq = torch.cat([onehot.sum(1), onehot.new_full((batch, 1), onehot.shape[1])], 1)
            per_seq = dispatch.sum_over_sequence(per_seq.detach())  # (b, E + 1): slots and length
            n_seq = dispatch.sum_over_batch(logits.new_tensor([batch]))[0]
            f = per_seq[:, :E] / (per_seq[:, E:] * k)  # (b, E)
            p_share = probs.view(batch, -1, E).sum(1) / per_seq[:, E:]
            loss = loss + a.aux_loss_coeff * E * (f * p_share).sum() / n_seq
    if a.z_loss_coeff:
        loss = loss + a.z_loss_coeff * torch.logsumexp(logits, -1).pow(2).sum() / tokens
    return loss, routed_counts


class _AuxLossGrad(torch.autograd.Function):
    """Identity on ``x`` whose backward also gives ``aux`` the gradient 1: the auxiliary
    loss trains the router through the model's own backward (under pipeline parallelism,
    each stage's) without being added to the returned language-model loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_meta = (aux.dtype, aux.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device = ctx.aux_meta
        return grad, torch.ones((), dtype=dtype, device=device)


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


def _compute_dtype(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The experts' weights in the activations' dtype. Under FSDP's bf16 mixed precision the
    experts that expert parallelism shards are not FSDP's (``ignored_params``: FSDP would
    shard them again over dp), so nothing casts their fp32 weights as FSDP casts the rest;
    this is that cast (its backward hands the fp32 parameters an fp32 gradient)."""
    return tuple(w if w.dtype == x.dtype else w.to(x.dtype) for w in weights)


def grouped_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                   counts: torch.Tensor) -> torch.Tensor:
    """Per-expert SwiGLU over expert-contiguous rows. x: (N, dim); w1, w3: (E, dim, F);
    w2: (E, F, dim); counts: rows per expert (sum N). Weights in another dtype than ``x``
    are cast to it (``_compute_dtype``)."""
    w1, w3, w2 = _compute_dtype(x, w1, w3, w2)
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


def grouped_glu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor,
                act=F.silu) -> torch.Tensor:
    """Per-expert gated MLP in transformers' fused layout (Mixtral, Qwen-MoE): x (N, dim);
    gate_up (E, 2F, dim), the gate's rows then the up projection's; down (E, dim, F);
    ``act`` the gate's activation. The weights are read transposed, the layout
    ``torch._grouped_mm`` takes as it is. Weights in another dtype than ``x`` are cast to it."""
    gate_up, down = _compute_dtype(x, gate_up, down)
    f = down.shape[-1]
    if x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(act(h[:, :f]) * h[:, f:], down.transpose(-2, -1), offs=offs)
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        h = F.linear(x[start:start + n], gate_up[e])
        outs.append(F.linear(act(h[:, :f]) * h[:, f:], down[e]))
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, down.shape[1])


class LocalDispatch:
    """How an MoE layer moves its tokens and sums its routing statistics on one device.

    ``experts_of_tokens``: the three below in a row (a layout may overlap them);
    ``permute``: the (token, expert) copies sorted by expert (capacity applied);
    ``run_experts``: the layer's grouped experts over expert-contiguous rows; ``combine``: the
    weighted sum of each token's expert outputs (unpermute); ``sum_over_sequence`` /
    ``sum_over_batch``: a statistics tensor summed over the ranks holding the other
    positions of the same sequences / the other sequences (here: itself).
    """

    def experts_of_tokens(self, flat: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, n_experts: int,
                          capacity: int | None, experts, shared=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's routed experts' weighted output (T, d) in ``flat``'s dtype plus
        ``shared()`` (the shared experts' output, or None), and the rows per expert (E,):
        permute, run_experts, combine. Parallel layouts may reorder it to overlap the
        exchange with compute (``expert_parallel/overlap.py``)."""
        rows, slots, counts = self.permute(flat, expert_ids, n_experts, capacity)
        y = self.run_experts(rows, counts, experts)  # (N, d)
        out = self.combine(y, slots, weights, flat).to(flat.dtype)
        extra = shared() if shared is not None else None
        return (out if extra is None else out + extra), counts

    def permute(self, flat: torch.Tensor, expert_ids: torch.Tensor, n_experts: int, capacity: int | None):
        """flat (T, d), expert_ids (T, k) -> rows (N, d), slots (N,) = t * k + j, counts (E,)."""
        slots, counts, _ = expert_slots(expert_ids, n_experts, capacity)
        return flat[slots // expert_ids.shape[1]], slots, counts

    def run_experts(self, rows: torch.Tensor, counts: torch.Tensor, experts) -> torch.Tensor:
        """``experts(x, counts)``: the layer's grouped experts (this rank's weights) on rows
        grouped by expert."""
        return experts(rows, counts)

    def combine(self, y: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """y (N, d) expert outputs in slot order -> (T, d): each token's weighted sum."""
        k = weights.shape[1]
        w = weights.reshape(-1)[slots].unsqueeze(-1).to(y.dtype)  # (N, 1); dropped slots are absent
        return torch.zeros_like(flat).index_add_(0, slots // k, y * w)

    def sum_over_sequence(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum_over_batch(self, t: torch.Tensor) -> torch.Tensor:
        return t


@dataclass
class MoEStep:
    """The training step's accounting, shared by a model's MoE layers: the weight of each
    forward's auxiliary loss (1 / micro-batches) and whether a forward counts towards the
    step's statistics (a pipeline's shape-inference forward does not)."""

    aux_loss_scale: float = 1.0
    collect_stats: bool = True


def token_local(w: torch.Tensor) -> torch.Tensor:
    """A weight an MoE layer multiplies with its own tokens only: under TP (the ``moe``
    style) a tp-``Replicate`` DTensor, read as the local tensor with a ``Partial`` gradient
    (each tp rank saw other tokens; summed over tp later). Any other tensor as it is."""
    from torch.distributed.tensor import DTensor, Partial

    if isinstance(w, DTensor) and w.device_mesh.ndim == 1:  # tp only (or FSDP-unsharded)
        return w.to_local(grad_placements=[Partial()])
    return w


def local_tensor(w: torch.Tensor) -> torch.Tensor:
    """An expert weight as this rank holds it (its ep shard under EP)."""
    from torch.distributed.tensor import DTensor

    return w.to_local() if isinstance(w, DTensor) else w


class MoELayer(nn.Module):
    """What every MoE layer does, whatever its weights' names and layout: route, permute,
    run the grouped experts, combine, add the shared experts, carry the balancing losses
    into the backward and keep the step's statistics. Subclasses say where their weights
    are: :class:`MoE` (ours) and the transformers adapter (``plans/hf_moe.py``).

    ``expert_weights``: names of the routed experts' parameters (dim 0 the expert index:
    what expert parallelism shards); ``token_parallel_weights``: the weights the layer
    multiplies with its own tokens only (the router's): the ``moe`` TP style replicates them
    over tp and the layer reads them with :func:`token_local`."""

    expert_weights: tuple[str, ...] = ()
    token_parallel_weights: tuple[str, ...] = ()

    def __init__(self, args: MoEArgs):
        super().__init__()
        self.args = args
        self.aux_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None
        self.routed_counts: torch.Tensor | None = None
        # summed over the forwards of a training step (reset at the start of each step)
        self.step_aux_loss: torch.Tensor | None = None
        self.step_routed_counts: torch.Tensor | None = None
        self.dispatch: LocalDispatch = LocalDispatch()  # injected: see the module docstring
        self.step = MoEStep()

    def route(self, flat: torch.Tensor, batch: int):
        """(expert ids (T, k), combine weights (T, k), aux loss share, slots per expert (E,))."""
        raise NotImplementedError

    def grouped_experts(self):
        """``f(rows, counts)``: this rank's grouped experts (plain local weights)."""
        raise NotImplementedError

    def shared_output(self, flat: torch.Tensor) -> torch.Tensor | None:
        return None

    def capacity(self, n_tokens: int) -> int | None:
        c = self.args.capacity_factor
        return None if c is None else math.ceil(c * n_tokens * self.args.top_k / self.args.n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        flat = x.reshape(-1, d)  # (T, d)
        expert_ids, weights, self.aux_loss, self.routed_counts = self.route(flat, b)
        capacity = self.capacity(flat.shape[0])
        out, counts = self.dispatch.experts_of_tokens(flat, expert_ids, weights, self.args.n_experts, capacity,
                                                      self.grouped_experts(), lambda: self.shared_output(flat))
        self.tokens_per_expert = counts.detach()
        out = out.view(b, s, d)
        aux = self.aux_loss * self.step.aux_loss_scale
        if aux.requires_grad and torch.is_grad_enabled():
            out = _AuxLossGrad.apply(out, aux)
        # a recompute inside the backward must not count again (torch's early-stopping
        # checkpoint never reaches this line; without early stop it would)
        if self.step.collect_stats and torch._C._current_graph_task_id() == -1:
            self._add_step_stats(aux.detach(), self.routed_counts)
        return out

    def _add_step_stats(self, aux: torch.Tensor, counts: torch.Tensor) -> None:
        if self.step_aux_loss is None:
            self.step_aux_loss, self.step_routed_counts = aux.clone(), counts.clone()
        else:
            self.step_aux_loss += aux
            self.step_routed_counts += counts


class MoE(MoELayer):
    """Routed experts (+ optional shared experts) replacing a dense SwiGLU feed-forward."""

    expert_weights = ("w1", "w2", "w3")
    token_parallel_weights = ("router.gate.weight",)

    def __init__(self, dim: int, args: MoEArgs):
        super().__init__(args)
        self.router = Router(dim, args)
        e, f = args.n_experts, args.hidden_dim
        self.w1 = nn.Parameter(torch.empty(e, dim, f))
        self.w3 = nn.Parameter(torch.empty(e, dim, f))
        self.w2 = nn.Parameter(torch.empty(e, f, dim))
        self.shared = None
        if args.n_shared_experts:
            from .llama import FeedForward
            self.shared = FeedForward(dim, f * args.n_shared_experts)
        nn.init.normal_(self.w1, std=0.02)
        nn.init.normal_(self.w3, std=0.02)
        nn.init.normal_(self.w2, std=0.02)

    def route(self, flat: torch.Tensor, batch: int):
        ids, weights, aux = self.router(flat, batch, self.dispatch)
        return ids, weights, aux, self.router.routed_counts

    def grouped_experts(self):
        w1, w3, w2 = (local_tensor(w) for w in (self.w1, self.w3, self.w2))
        return lambda x, counts: grouped_swiglu(x, w1, w3, w2, counts)

    def shared_output(self, flat: torch.Tensor) -> torch.Tensor | None:
        return self.shared(flat) if self.shared is not None else None
