"""Fused linear + cross entropy: the summed token loss of ``hidden @ weight.T`` without the
(tokens, vocab) logits.

The output head's logits are the largest activation of a language model: 8K tokens of a
128K vocabulary are 4 GiB in fp32, and the loss backward adds their gradient. This op
computes the loss chunk by chunk of tokens and keeps only O(tokens) numbers between forward
and backward (Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models";
Liger-Kernel's FusedLinearCrossEntropy, Hsu et al. 2024):

- forward, per chunk of ``c`` tokens: ``z = h_c W^T`` (c, V) in the inputs' dtype, then
  fp32 (the same rounding as the unfused head followed by ``F.cross_entropy(z.float())``);
  its log-sum-exp and the target logit. Saved: hidden, weight, labels and the per-token
  log-sum-exp (N floats).
- backward, per chunk: ``z`` recomputed; ``dz = g (softmax(z) - onehot(y))`` (zero rows for
  ignored tokens), ``grad_h_c = dz W``, ``grad_W += dz^T h_c`` accumulated in fp32 and cast
  to the weight's dtype at the end. One extra head matmul (4 instead of 3) buys the memory.

Vocab-parallel (Megatron's cross entropy, Shoeybi et al. 2019): with ``vocab_group`` the
weight is this rank's rows ``[vocab_start, vocab_start + V/t)`` of the vocabulary. Each
rank computes its shard's log-sum-exp and the target logit where it owns the label (0
elsewhere) for all its tokens; after the loop **one all-gather** of those (2, N) numbers
gives every rank the global ones (log-sum-exp of the shards' log-sum-exps, sum of the
target logits), so the loss is the same on every rank. The backward is local: ``grad_W`` is
this shard's gradient and ``grad_h`` this shard's *partial sum* over the vocabulary, which
the caller sums over the group (``loss_head.py`` hands it to DTensor as ``Partial``, so the
head's input layout reduces it as the unfused head's backward would: an all-reduce, or a
reduce-scatter under sequence parallelism).

No (N, V) tensor is ever allocated: the largest are one chunk's fp32 logits (c, V/t) and,
for bf16 inputs, their bf16 matmul output. :func:`chunk_tokens_for` sizes chunks from a
byte budget. Plain PyTorch (eager); the matmuls dominate.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100
#: fp32 bytes of one chunk's logits when no chunk size is given: 256 MiB is 512 tokens of
#: a 128K vocabulary, matmuls of (512 x dim x 128K), large enough to run at full speed
CHUNK_BYTES = 256 * 2**20


def chunk_tokens_for(vocab_local: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so one chunk's fp32 logits (c, vocab_local) fit ``budget_bytes``."""
    return max(1, budget_bytes // (4 * vocab_local))


def chunk_stats_(z: torch.Tensor, local_labels: torch.Tensor, owned: torch.Tensor):
    """(log-sum-exp, target logit or 0 where not owned) of fp32 logits z (c, V), in place."""
    target = z.gather(1, local_labels.unsqueeze(1)).squeeze(1) * owned  # (c,)
    m = z.amax(1)  # (c,)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of -inf: no nan
    lse = z.sub_(m.unsqueeze(1)).exp_().sum(1).log_().add_(m)  # (c,)
    return lse, target


def owned_labels(labels: torch.Tensor, vocab_start: int, v_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(label index in this vocabulary shard, 0 where not owned; whether owned and kept)."""
    local = labels - vocab_start
    owned = (labels != IGNORE_INDEX) & (local >= 0) & (local < v_local)
    return torch.where(owned, local, torch.zeros_like(local)), owned


def global_stats(stats: torch.Tensor, vocab_group) -> tuple[torch.Tensor, torch.Tensor]:
    """The shards' (2, N) [log-sum-exp; target logit or 0] -> the global (lse, target): one
    all-gather over ``vocab_group`` (None or one rank: the stats are already global)."""
    if vocab_group is None or dist.get_world_size(vocab_group) == 1:
        return stats[0], stats[1]
    world = dist.get_world_size(vocab_group)
    every = torch.empty(world * 2, stats.shape[1], device=stats.device, dtype=stats.dtype)
    dist.all_gather_into_tensor(every, stats, group=vocab_group)
    every = every.view(world, 2, -1)  # (t, [lse; target], N)
    return torch.logsumexp(every[:, 0], 0), every[:, 1].sum(0)


def softmax_minus_onehot_(z: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, valid: torch.Tensor,
                          local: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """In place on one chunk's fp32 logits z (c, V/t): ``g (softmax(z) - onehot(label))`` with
    the global log-sum-exp, the one-hot only where this shard owns the label, zero rows for
    ignored tokens. The gradient of the summed loss with respect to z."""
    z.sub_(lse.unsqueeze(1)).exp_()
    z.mul_((g * valid).unsqueeze(1))
    return z.scatter_add_(1, local.unsqueeze(1), (-g * owned).unsqueeze(1).to(z.dtype))


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for fp32 and lower precisions, fp64 for fp64 (the tests' exact reference)."""
    return torch.promote_types(t.dtype, torch.float32)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                vocab_group, vocab_start: int) -> torch.Tensor:
        n, v_local = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden)
        local, owned = owned_labels(labels, vocab_start, v_local)
        stats = torch.empty(2, n, device=hidden.device, dtype=acc)  # [lse; target]
        for s in range(0, n, chunk):
            z = (hidden[s:s + chunk] @ weight.t()).to(acc)  # (c, V/t)
            stats[0, s:s + chunk], stats[1, s:s + chunk] = chunk_stats_(z, local[s:s + chunk], owned[s:s + chunk])
            del z
        lse, target = global_stats(stats, vocab_group)
        valid = labels != IGNORE_INDEX
        loss = torch.where(valid, lse - target, torch.zeros_like(lse)).sum()
        ctx.save_for_backward(hidden, weight, local, owned, valid, lse)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, local, owned, valid, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = _acc_dtype(hidden)
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need_w else None
        g = grad_loss.to(acc)
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s:s + ctx.chunk]  # (c, D)
            dz = (h @ weight.t()).to(acc)  # (c, V/t), recomputed
            c = slice(s, s + ctx.chunk)
            dz = softmax_minus_onehot_(dz, lse[c], g, valid[c], local[c], owned[c]).to(hidden.dtype)
            if need_h:
                torch.matmul(dz, weight, out=grad_h[s:s + ctx.chunk])  # (c, D): this shard's partial sum
            if need_w:
                if dz.dtype == acc:
                    grad_w.addmm_(dz.t(), h)
                else:
                    grad_w.add_(dz.t() @ h)  # (V/t, D) matmul in the inputs' dtype, summed in fp32
            del dz
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             chunk_tokens: int | None = None, vocab_group=None,
                             vocab_start: int = 0) -> torch.Tensor:
    """Sum over tokens with ``labels != -100`` of ``cross_entropy(hidden @ weight.T, labels)``,
    never materializing the (N, V) logits. hidden (N, D), weight (V, D) or this rank's vocab
    shard (V/t, D) with ``vocab_group`` and ``vocab_start`` (then ``hidden``'s gradient is
    this shard's partial sum: reduce it over the group). labels (N,) global vocabulary ids.
    ``chunk_tokens``: tokens per chunk (None: :func:`chunk_tokens_for`). Under autocast the
    matmuls run in the autocast dtype, as the unfused head would. Returns an fp32 scalar."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, D) and weight (V, D) expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} != ({hidden.shape[0]},): one label per token")
    chunk = chunk_tokens or chunk_tokens_for(weight.shape[0])
    if chunk < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk, vocab_group, vocab_start)


def linear_cross_entropy_sum_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The unfused reference: the full logits, then ``F.cross_entropy`` in fp32."""
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)
