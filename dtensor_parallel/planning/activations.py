"""Saved activations per layer and per rank: the activation part of the memory estimator
(the per-op table and its derivation are in ``memory.py``'s docstring), and how many
micro-batches a pipeline rank holds in flight."""

from __future__ import annotations

from dataclasses import dataclass

from ..mesh import ParallelDims
from ..models.llama import ModelArgs
from ..plan import ParallelPlan


@dataclass(frozen=True)
class ActivationBytes:
    per_layer: dict[int, float]  # layer index -> saved bytes of one micro-batch
    head: float  # final norm + head input (last stage), one micro-batch
    loss_peak: float  # logit gradients at the loss backward, one micro-batch (the saved
    # log_softmax output, 4 V / t a token, is in ``head``); fused loss: one chunk's
    logits_saved: float  # that log_softmax output (fused: the log-sum-exp): freed after the loss backward
    recompute_transient: float  # one block rematerialized in backward


def _splits_backward(plan: ParallelPlan) -> bool:
    """A zero-bubble schedule: its blocks and loss stay eager (``compiling.compiles_blocks``)."""
    from ..pipeline.schedules import SCHEDULES

    spec = SCHEDULES.get(plan.pipeline_schedule or "")
    return spec is not None and spec.splits_backward


def _act_bytes(plan: ParallelPlan, dims: ParallelDims) -> tuple[int, int]:
    """(a, r): bytes of a matmul activation and of the residual stream."""
    if plan.mixed_precision == "fp32":
        return 4, 4
    return 2, (2 if dims.dp_cp > 1 else 4)  # FSDP casts the embedding to bf16; autocast does not


def _rowwise_outputs(plan: ParallelPlan, a: int, d: int, t: int, sp_div: int) -> float:
    """Selective recompute's saved bytes per token of one row-parallel layer's output (wo, w2):
    without SP the matmul's (partial-sum) output; under SP one op (matmul + reduce-scatter,
    ``plan.fused_rowwise``: ``tensor_parallel/rowwise_nccl.py`` or the Triton op) keeps only
    the sequence shard, two ops keep the full-sequence partial sums as well."""
    if sp_div == 1:
        return a * d
    return a * d / t + (0.0 if plan.fused_rowwise else a * d)


def dense_layer_bytes_per_token(args: ModelArgs, dims: ParallelDims, plan: ParallelPlan,
                                recompute: str | None = None, sp: bool | None = None) -> float:
    a, r = _act_bytes(plan, dims)
    t = dims.tp
    sp_div = t if (plan.sequence_parallel if sp is None else sp) else 1
    d, h, kv, hd, f = args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.ffn_hidden_dim
    mode = plan.recompute if recompute is None else recompute
    if mode == "full":
        return r * d / sp_div
    if mode == "selective":
        saved = (r * d / sp_div + a * (h + 2 * kv) * hd / t + a * h * hd / t + 4 * h / t
                 + 2 * a * f / t + 2 * _rowwise_outputs(plan, a, d, t, sp_div))
        if plan.selective_policy == "save_alternate_matmuls":  # wk, wo and w3 recomputed
            saved -= a * kv * hd / t + _rowwise_outputs(plan, a, d, t, sp_div) + a * f / t
        return saved
    return 2 * (4 + r) * d / sp_div + 2 * a * d + 2 * a * (h + kv) * hd / t + 4 * h / t + 4 * a * f / t


def moe_layer_bytes_per_token(args: ModelArgs, dims: ParallelDims, plan: ParallelPlan,
                              recompute: str | None = None, sp: bool | None = None) -> float:
    """Bytes per token of the sequence (b s / c tokens per rank) of one MoE block (the
    alternate selective policy is estimated as saving every matmul here: an upper bound)."""
    a, r = _act_bytes(plan, dims)
    t = dims.tp
    sp_div = t if (plan.sequence_parallel if sp is None else sp) else 1
    d, h, kv, hd = args.dim, args.n_heads, args.n_kv_heads, args.head_dim
    m = args.moe
    mode = plan.recompute if recompute is None else recompute
    if mode == "full":
        return r * d / sp_div
    fe, fs = m.hidden_dim, m.hidden_dim * m.n_shared_experts
    if mode == "selective":
        attn = (r * d / sp_div + a * (h + 2 * kv) * hd / t + a * h * hd / t + 4 * h / t
                + _rowwise_outputs(plan, a, d, t, sp_div))
        moe_tok = 4 * m.n_experts + m.top_k * (2 * a * fe + a * d) + (2 * a * fs + a * d if fs else 0.0)
        return attn + moe_tok / t
    attn = (4 + r) * d / sp_div + a * d + 2 * a * (h + kv) * hd / t + 4 * h / t
    norm2 = (4 + r) * d / sp_div
    moe_tok = 4 * d + 12 * m.n_experts + m.top_k * (2 * a * d + 4 * a * fe) + (t * a * d + 4 * a * fs if fs else 0.0)
    return attn + norm2 + moe_tok / t


def activation_bytes(args: ModelArgs, dims: ParallelDims, plan: ParallelPlan, layers: list[int],
                     seq_len: int, micro_batch: int, last: bool, recompute: str | None = None,
                     sp: bool | None = None) -> ActivationBytes:
    """Saved activations of one micro-batch on the given layers (see the module docstring)."""
    a, r = _act_bytes(plan, dims)
    t = dims.tp
    sp_div = t if (plan.sequence_parallel if sp is None else sp) else 1
    tokens = micro_batch * seq_len / dims.cp
    positions = seq_len / dims.cp
    rope = 4 * args.head_dim * positions
    mode = plan.recompute if recompute is None else recompute
    per_layer = {}
    for i in layers:
        per_tok = (moe_layer_bytes_per_token if args.is_moe_layer(i) else dense_layer_bytes_per_token)(
            args, dims, plan, mode, sp)
        per_layer[i] = per_tok * tokens + (rope if mode == "none" else 0.0)
    logits_saved, loss = logits_bytes(args, plan, t, a, tokens) if last else (0.0, 0.0)
    head = ((4 + r) * args.dim / sp_div + a * args.dim) * tokens + logits_saved if last else 0.0
    transient = 0.0
    if mode != "none" and layers:
        full = max((moe_layer_bytes_per_token if args.is_moe_layer(i) else dense_layer_bytes_per_token)(
            args, dims, plan, "none", sp) for i in layers)
        transient = full * tokens + rope
    return ActivationBytes(per_layer, head, loss, logits_saved, transient)


def logits_bytes(args: ModelArgs, plan: ParallelPlan, t: int, a: int, tokens: float) -> tuple[float, float]:
    """(saved until the loss backward, peak at the loss backward) of the logits of one
    micro-batch on the last stage. Compiled (``plan.compile``): the head's own output (``a V
    / t`` a token) saved and its gradient at the backward; eager (the chunked cross entropy of
    ``tensor_parallel/loss.py``, whose Triton kernels run on CUDA), the same; eager over an
    uneven vocabulary split (``F.cross_entropy`` through DTensor): log_softmax's fp32 output
    (4 V / t) saved, its gradient and input gradient (8 V / t) at the backward. Fused
    (``plan.fused_loss``; the built-in Llama's head always qualifies): the per-token
    log-sum-exp (4 bytes) saved, and at the backward one chunk's fp32 logits (plus their
    matmul output in the compute dtype below fp32) and, in bf16, the fp32 accumulator of the
    head's weight gradient (``fused_cross_entropy.py``)."""
    v = args.vocab_size / t
    compiled = plan.compile in (True, "auto") and not _splits_backward(plan)  # the GPU run ("auto": on CUDA)
    if not plan.fused_loss and (compiled or args.vocab_size % t == 0):
        # compiled or chunked cross entropy (tensor_parallel/loss.py): the logits in the
        # compute dtype kept, their gradient in that dtype at the backward; no fp32 copy of either
        return a * v * tokens, a * v * tokens
    if not plan.fused_loss:
        return 4 * v * tokens, 8 * v * tokens
    from ..fused_cross_entropy import chunk_tokens_for

    chunk = min(tokens, plan.fused_loss_chunk_tokens or chunk_tokens_for(int(v)))
    low = a < 4  # bf16: a cast of each chunk, and grad_W summed in fp32
    return 4 * tokens, chunk * v * (4 + (a if low else 0)) + (4 * v * args.dim if low else 0.0)


def in_flight(schedule: str | None, pp: int, virtual: int, pp_rank: int, n_micro: int) -> float:
    """Stage-micro-batches of activations rank ``pp_rank`` holds at its peak (module docstring)."""
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(n_micro * virtual)
    if schedule == "interleaved_1f1b" or (schedule == "zero_bubble" and virtual > 1):
        return float(min(2 * (pp - pp_rank - 1) + (virtual - 1) * pp + 1, n_micro * virtual))
    if schedule == "zbv":  # two stages a rank, V shape: about 1F1B over 2 pp ranks' worth
        return float(min(2 * (pp - pp_rank), 2 * n_micro))
    return float(min(pp - pp_rank, n_micro))


# ---- the estimate ---------------------------------------------------------------------
