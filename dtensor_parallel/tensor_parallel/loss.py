"""Token cross entropy, loss-parallel when the logits are vocab-sharded DTensors.

With vocab-sharded logits (``Shard(-1)`` on tp) the full logits are never gathered:
``torch.distributed.tensor.parallel.loss_parallel`` computes the log-sum-exp with an
all-reduce of the per-shard max and sum, and picks the target logit on the shard that owns
it (Megatron's vocab-parallel cross entropy). The backward must run inside the same context,
so :func:`loss_context` is entered around both forward and backward by the caller.

Three forms, by where the loss runs:

- compiled (``plan.compile``): :func:`compiled_cross_entropy_sum`, ``F.cross_entropy`` on
  an fp32 upcast that inductor fuses away;
- eager (:func:`eager_cross_entropy_sum`), logits a plain tensor (one GPU, FSDP, CP, DDP,
  PP's last stage without TP) or TP's vocabulary shards: :func:`chunked_cross_entropy_sum`,
  which keeps only the logits themselves and one log-sum-exp a token: on CUDA two Triton
  kernels (``triton_kernels/cross_entropy.py``: 2.0 ms at 8K tokens of a 128K vocabulary on
  an H200, against 13.6 for the unchunked form and 2.7 compiled), elsewhere torch ops chunk
  by chunk of tokens (on a shard: the local shard's, with one all-gather of two
  numbers a token over the vocabulary group, as Megatron's vocab-parallel cross entropy and
  ``fused_cross_entropy.py``). Eager ``F.cross_entropy(logits.float())`` keeps an fp32
  copy's log-softmax and, in backward, two fp32 gradients of the whole (tokens, vocab)
  logits: 9.8 GiB at 8K tokens of a 128K vocabulary on one H200, against 2 GiB of bf16
  logits here;
- eager, any other DTensor logits (replicated, unevenly split): ``F.cross_entropy`` through
  DTensor (:func:`cross_entropy_sum`).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import loss_parallel

from ..fused_cross_entropy import chunk_stats_, global_stats, owned_labels, softmax_minus_onehot_

IGNORE_INDEX = -100


def loss_context(logits_are_sharded: bool):
    return loss_parallel() if logits_are_sharded else contextlib.nullcontext()


#: fp32 bytes of one chunk's logits in :func:`chunked_cross_entropy_sum` (512 tokens of a
#: 128K vocabulary): big enough for full-speed element-wise kernels, small beside the logits
CHUNK_BYTES = 256 * 2**20


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross entropies over labels != -100. logits: (b, s, V), labels: (b, s).

    Returns a plain scalar tensor (the local shard of a replicated DTensor under TP).
    """
    flat = logits.flatten(0, 1)  # (b*s, V)
    loss = F.cross_entropy(flat.float(), labels.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)
    return loss.to_local() if isinstance(loss, DTensor) else loss


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """Forward, per chunk of rows: the fp32 logits' log-sum-exp and target logit (where this
    vocabulary shard owns the label); one all-gather of those (2, N) numbers over
    ``vocab_group`` makes them global (``fused_cross_entropy.global_stats``); the loss is the
    sum of ``lse - z[y]`` over kept rows, the same on every rank of the group. Saved: the
    logits as they are (no copy), the labels and ``lse``. Backward, per chunk, local:
    ``g (softmax(z) - onehot(y))`` in the logits' dtype (what ``F.cross_entropy`` on an fp32
    upcast returns through the upcast's backward), zero rows for ignored tokens.

    ``kernels``: the Triton module (``triton_kernels/cross_entropy.py``: one pass over the
    logits forward, one backward) or None (torch ops, a chunk at a time: about 13 passes over
    fp32 chunks in all, 1.8x the unchunked eager loss's time on an H200)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk: int, vocab_group,
                vocab_start: int, kernels) -> torch.Tensor:
        n = logits.shape[0]
        local, owned = owned_labels(labels, vocab_start, logits.shape[1])
        if kernels is not None:
            stats = kernels.cross_entropy_stats(logits, local, owned)
        else:
            stats = torch.empty(2, n, dtype=torch.float32, device=logits.device)  # [lse; target]
            for s in range(0, n, chunk):
                z = logits[s:s + chunk].to(torch.float32, copy=True)  # (chunk_stats_ works in place)
                stats[0, s:s + chunk], stats[1, s:s + chunk] = chunk_stats_(z, local[s:s + chunk], owned[s:s + chunk])
                del z
        lse, target = global_stats(stats, vocab_group)
        valid = labels != IGNORE_INDEX
        ctx.save_for_backward(logits, local, owned, valid, lse)
        ctx.chunk, ctx.kernels = chunk, kernels
        return torch.where(valid, lse - target, torch.zeros_like(lse)).sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, local, owned, valid, lse = ctx.saved_tensors
        g = grad_out.float()
        if ctx.kernels is not None:
            scale = torch.where(valid, g, torch.zeros_like(lse))
            return ctx.kernels.cross_entropy_grad(logits, lse, scale, local, owned), None, None, None, None, None
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            c = slice(s, s + ctx.chunk)
            z = logits[c].to(torch.float32, copy=True)
            grad[c] = softmax_minus_onehot_(z, lse[c], g, valid[c], local[c], owned[c])
        return grad, None, None, None, None, None


def _kernels_for(logits: torch.Tensor, kernel: str):
    """The Triton module where ``kernel`` and the logits allow it ("auto": CUDA only), else None."""
    if kernel == "torch" or (kernel == "auto" and logits.device.type != "cuda"):
        return None
    try:
        from triton_kernels import cross_entropy as kernels
    except ImportError as e:
        if kernel == "triton":
            raise RuntimeError(f"cross entropy kernel='triton': Triton does not import ({e})") from e
        return None
    why = kernels.supports(logits)
    if why is not None and kernel == "triton":
        raise ValueError(f"cross entropy kernel='triton': {why}")
    return kernels if why is None else None


def chunked_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int | None = None, *,
                              vocab_group=None, vocab_start: int = 0, kernel: str = "auto") -> torch.Tensor:
    """:func:`cross_entropy_sum` without fp32 copies of the logits: on CUDA two Triton
    kernels (``kernel="auto"`` or "triton"), elsewhere (or "torch") torch ops on a chunk of
    ``chunk_tokens`` tokens at a time (default: ``CHUNK_BYTES`` of fp32 logits), forward and
    backward. ``logits`` (b, s, V) or this rank's vocabulary shard (b, s, V/t) starting at
    ``vocab_start``, with the shards' ``vocab_group``. Equal to it up to fp32 rounding. (No
    plan switch: both forms compute the same function; the kernels only take less time.)"""
    flat, y = logits.flatten(0, 1), labels.flatten()
    chunk = chunk_tokens or max(1, CHUNK_BYTES // (4 * flat.shape[1]))
    return _ChunkedCrossEntropySum.apply(flat, y, chunk, vocab_group, vocab_start, _kernels_for(flat, kernel))


def _vocab_shard(logits: DTensor) -> tuple[int, int] | None:
    """(mesh dim, rank in it) when the logits are split evenly over the vocabulary on one mesh
    dim and replicated on the others (TP's loss-parallel head); None otherwise, and on the
    fake process group of simulated ranks (``LocalTensorMode``), which computes DTensor's
    collectives but not an op's own."""
    dims = [i for i, p in enumerate(logits.placements) if not isinstance(p, Replicate)]
    if len(dims) != 1:
        return None
    (i,) = dims
    p = logits.placements[i]
    if not isinstance(p, Shard) or p.dim % logits.ndim != logits.ndim - 1:
        return None
    if logits.shape[-1] % logits.device_mesh.size(i):  # uneven shards: leave them to DTensor
        return None
    if dist.get_backend(logits.device_mesh.get_group(i)) == "fake":
        return None
    return i, logits.device_mesh.get_local_rank(i)


def eager_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The eager loss: chunked for plain tensors and for vocabulary-sharded DTensors (on the
    local shard, the vocabulary group's statistics all-gathered), through DTensor otherwise."""
    if not isinstance(logits, DTensor):
        return chunked_cross_entropy_sum(logits, labels)
    shard = _vocab_shard(logits)
    if shard is None:
        return cross_entropy_sum(logits, labels)
    dim, rank = shard
    local = logits.to_local()  # (its backward makes the gradient a DTensor placed like the logits)
    return chunked_cross_entropy_sum(local, labels, vocab_group=logits.device_mesh.get_group(dim),
                                     vocab_start=rank * local.shape[-1])


def compiled_cross_entropy_sum():
    """:func:`cross_entropy_sum` under ``torch.compile`` (``plan.compile`` on): inductor fuses
    the fp32 upcast, the log-softmax and the target pick, forward and backward, so neither an
    fp32 copy of the (tokens, vocab) logits nor its fp32 gradient is ever stored (the unchunked
    eager form kept both: 8 GiB at 8K tokens of a 128K vocabulary; TorchTitan compiles its loss the same
    way). One compiled function a backend (``compiling.compile_backend``) for the process; its
    guards tell shapes and layouts apart."""
    from ..compiling import compile_backend

    return _compiled_cross_entropy_sum(compile_backend())


@functools.cache
def _compiled_cross_entropy_sum(backend: str):
    return torch.compile(cross_entropy_sum, dynamic=False, backend=backend)
