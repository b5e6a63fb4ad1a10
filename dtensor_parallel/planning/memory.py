"""Analytic per-rank memory of a training step: parameters, gradients, AdamW state,
activations, transient buffers and the peak, for the built-in Llama / MoE models.

The parameter, gradient and optimizer bytes are exact: each parameter's local shard is
derived from the same rules ``parallelize`` applies, and ``dtensor-parallel plan`` checks
them against the real shards of a dry run (``planning/dry_run.py``; tested equal). Activations and
transients are a model of what PyTorch keeps, stated below, so that each term can be
checked against a measurement (``benchmarks/memory_estimate.py``).

Notation: ``b`` micro-batch, ``s`` sequence, ``c`` cp, ``t`` tp, ``d`` dim, ``h`` heads,
``hd`` head dim, ``f`` SwiGLU width, ``V`` vocab; ``a`` bytes of a matmul activation (2
under bf16, 4 under fp32), ``r`` bytes of the residual stream (2 when FSDP's mixed
precision makes the embedding bf16; 4 under fp32 or under autocast, which leaves the
embedding and the residual adds in fp32); ``sp`` = t with sequence parallelism, else 1.

Static state, per local parameter (the rank's shard, see :func:`local_param_numels`):

- parameters: fp32 master weights, 4 B (FSDP2 keeps its shards in the parameter dtype;
  under bf16 it all-gathers a bf16 copy per block, counted as a transient);
- gradients: fp32, 4 B (FSDP2 reduce-scatters in fp32 into fp32 sharded gradients);
- AdamW: ``exp_avg`` and ``exp_avg_sq`` in fp32, 8 B (4 B with ``optimizer="bf16_moments"``,
  ``dtensor_parallel/adamw.py``).
  So 16 B a parameter (12 with bf16 moments), not the 2 B of bf16 weights that rules of thumb count.

Tokens per rank: ``b s / c`` (CP divides the sequence, so every activation, K and V
included, shrinks by c). Saved activations per token of one dense block (no recompute),
each term named by the op that keeps it for backward:

==========================================  ============================================
term                                         bytes per token
==========================================  ============================================
two RMSNorms (fp32 input copy + output)      2 (4 + r) d / sp
input of wq/wk/wv and of w1/w3               2 a d   (all-gathered under SP: full sequence)
SDPA: q, k, v (kv heads not repeated), out   2 a (h + kv) hd / t
SDPA log-sum-exp (fp32)                      4 h / t
(input of wo: a view of the SDPA output)     0
SwiGLU: w1 out, silu out, w3 out, product    4 a f / t
RoPE table rows of the layer (per position)  4 hd   (per position, not per sequence)
==========================================  ============================================

Checked against the tensors autograd saves for one block (``tests/test_memory.py``). This
is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", Eq. 2: ``s b h (34 + 5 a s / h)`` per layer, SP dividing all of it by t) redone
for our ops: SwiGLU instead of GELU, flash attention (no ``s x s`` scores), and DTensor SP,
whose column-parallel linears keep their all-gathered input (Megatron re-gathers it).

MoE blocks (balanced routing assumed: each rank receives ``k`` rows per local token; the
MoE layer runs token parallel over tp, so its tokens per rank are ``b s / (c t)``):
router ``4 d + 12 E``, per routed copy ``2 a d + 4 a f_e`` (grouped-GEMM input and
output, SwiGLU), shared experts ``t a d + 4 a f_s`` (they gather the layer's tokens).

Recompute (``recompute.py``): ``full`` keeps only each block's input (``r d / sp``) and
rematerializes one block at a time in backward (+ one block's activations, transient);
``selective`` keeps the block input and the outputs of the matmuls, attention and SP
reduce-scatters (``a (d + 2 kv hd)/t + a d/t + 4 h/t + 2 a f/t`` and the two row-parallel
outputs: ``2 a d`` without SP, the matmuls' partial sums; ``2 a d / t`` under SP, where each
row-parallel layer is one op, matmul + reduce-scatter, saved once; ``2 a d + 2 a d / t``
with ``fused_rowwise=False``, two ops both saved) and recomputes norms, RoPE and SwiGLU's
element-wise ops. Checked against the selective-checkpoint cache of a TP2+SP block
(``tests/test_recompute_memory.py``). Compiled blocks keep a little less (the partitioner
drops w2's output, ``a d / t``), not modelled.

Pipeline: a stage keeps the activations of its in-flight micro-batches. 1F1B (Narayanan
et al. 2021, PipeDream-Flush): pp rank ``i`` holds ``min(pp - i, m)``, so rank 0 holds
pp micro-batches of its layers, about one micro-batch of the whole model. Interleaved 1F1B
with ``v`` stages a rank: ``2 (pp - i - 1) + (v - 1) pp + 1`` stage-micro-batches (the
warm-up of Megatron-Core's ``forward_backward_pipelining_with_interleaving``, and of torch's
``ScheduleInterleaved1F1B``), each of ``L / (pp v)`` layers: on rank 0 that is
``L (1 + (pp - 1) / (pp v))`` layers of one micro-batch, Korthikanti et al. 2022 sec. 4.2.3
(1F1B's rank 0: ``pp x L / pp = L`` layers, the whole model's worth). GPipe holds
all m; the zero-bubble schedules are counted as 1F1B (ZB-H1 keeps 1F1B's memory; Qi et al.
2023) and ZBV as 1F1B over its 2 stages.

Logits (last stage): ``log_softmax`` keeps its fp32 output (``4 V / t`` a token, part of
the head's saved activations); at the loss backward its fp32 gradient and its input
gradient join it: ``+ 8 V / t`` a token of one micro-batch, the loss peak. (Counting the
output a second time here over-predicted FSDP runs by 4 V / t a token: 2 GiB at 8B, seq 4K.)
Compiled (``plan.compile`` True or "auto", the GPU run), the cross entropy is one inductor
kernel each way (``tensor_parallel/loss.py``): the head's output in the compute dtype is
kept (``a V / t`` a token) and its gradient in that dtype joins it at the loss backward
(measured on an H200 at the 8B shape, 8K tokens: +1.95 GiB at the loss, +2.15 at its
backward; ``a V`` is 1.96 GiB there). With ``plan.fused_loss`` (``fused_cross_entropy.py``) no logits are kept: 4 bytes a token
(the log-sum-exp) saved, and at the loss backward one chunk's fp32 logits (``c V / t``,
``c`` = ``fused_loss_chunk_tokens`` or a 256 MiB budget) and, in bf16, the fp32 sum of the
head's weight gradient (``activations.logits_bytes``).

Transients: FSDP all-gathers the current and the prefetched block (2 blocks of unsharded
bf16 weights) and keeps the root's (final norm) gathered for the whole step and the head's
until its backward (``reshard_after_forward=False``); the input embedding is a unit of its own,
resharded after its forward and gathered again at the end of backward
(``data_parallel.py``); at the loss only the head's and the root's are gathered (every block
was resharded after its forward; the last one is gathered again when the gradient reaches
it, after the head's backward); the head, a unit of its own, reduce-scatters its gradient
right after its backward (its unsharded gradient, the fp32 copy and the output shard, with
every block's activations still there: a phase of its own); in backward a block's
unsharded gradient (bf16) and its fp32 copy for the reduce-scatter, and the root's
unsharded gradients until the end of backward, where the embedding's gathered weight and
unsharded gradient join them. Without FSDP, autocast caches
a bf16 copy of every weight through forward and backward (so does FSDP when its shard group
is one rank, which keeps the gathered weights). AdamW (``foreach``) allocates one fp32
temporary the size of the parameters (``sqrt(exp_avg_sq)``) during ``step()``; fused AdamW
(``optimizer="fused"``) one the size of the largest parameter; ours with bf16 moments none
(one Triton kernel a parameter, in place; CUDA).

Peak: with one micro-batch per step, the largest of the loss peak (static + activations +
logits + the weights gathered at the loss; gradients are None after
``zero_grad(set_to_none=True)``), the last block's backward (the logits freed; 2 gathered
blocks, their unsharded gradients and, under recompute, the rematerialized block) and the
end of backward (static + gradients + root gradients + gathered weights; without FSDP
under TP also the rest of the vocabulary of the embedding's gradient, which DTensor's
backward leaves replicated until ``ParallelModel`` cuts it to its shard); with several
micro-batches (accumulation or PP) the gradients of the earlier ones are there too. The
optimizer step costs static + gradients + the fp32 temporary. Not modelled: the CUDA
context, NCCL buffers and allocator fragmentation (``--headroom``), load imbalance of
routing, the RoPE tables that ``init_weights`` rebuilds per local stage.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..expert_parallel import needs_expert_groups
from ..mesh import ParallelDims
from ..models.llama import ModelArgs
from ..plan import ParallelPlan
from .activations import (ActivationBytes, _act_bytes, activation_bytes, dense_layer_bytes_per_token,  # noqa: F401
                          in_flight, moe_layer_bytes_per_token)

GIB = 2 ** 30
_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
          "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str | int | float) -> int:
    """``"80GiB"`` -> 85899345920, ``"80GB"`` -> 80e9, ``"141G"`` -> 141e9; a number is bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size: write e.g. 80GiB, 80GB or 141GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_count(text: str | int | float) -> int:
    """``"70B"`` -> 70e9, ``"13.5B"``, ``"350M"``, ``"1.2T"``; a number is itself."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMbBtT]?)\s*", text)
    if not m:
        raise ValueError(f"cannot read {text!r} as a parameter count: write e.g. 70B, 350M or 1.2T")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


# ---- parameters: the model's tensors and their local shards ---------------------------
@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    tp: str  # "colwise" (dim 0), "rowwise" (dim 1), "vocab" (dim 0), "replicate"
    expert: bool = False  # routed experts: EP-sharded on dim 0, never FSDP-sharded
    layer: int | None = None  # None: embedding (before the blocks) or norm/head (after)
    first: bool = False  # lives on the first pipeline stage (embedding)


def param_specs(args: ModelArgs) -> list[ParamSpec]:
    """Every parameter of ``Llama(args)`` with its TP style (``Llama.parallel_defaults``)."""
    d, hd, f, v = args.dim, args.head_dim, args.ffn_hidden_dim, args.vocab_size
    out = [ParamSpec("tok_embeddings.weight", (v, d), "vocab", first=True)]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        out += [ParamSpec(p + "attention_norm.weight", (d,), "replicate", layer=i),
                ParamSpec(p + "attention.wq.weight", (args.n_heads * hd, d), "colwise", layer=i),
                ParamSpec(p + "attention.wk.weight", (args.n_kv_heads * hd, d), "colwise", layer=i),
                ParamSpec(p + "attention.wv.weight", (args.n_kv_heads * hd, d), "colwise", layer=i),
                ParamSpec(p + "attention.wo.weight", (d, args.n_heads * hd), "rowwise", layer=i),
                ParamSpec(p + "ffn_norm.weight", (d,), "replicate", layer=i)]
        if args.is_moe_layer(i):
            m = args.moe
            fe = m.hidden_dim
            out += [ParamSpec(p + "feed_forward.router.gate.weight", (m.n_experts, d), "replicate", layer=i),
                    ParamSpec(p + "feed_forward.w1", (m.n_experts, d, fe), "replicate", expert=True, layer=i),
                    ParamSpec(p + "feed_forward.w3", (m.n_experts, d, fe), "replicate", expert=True, layer=i),
                    ParamSpec(p + "feed_forward.w2", (m.n_experts, fe, d), "replicate", expert=True, layer=i)]
            if m.n_shared_experts:
                fs = fe * m.n_shared_experts
                out += [ParamSpec(p + "feed_forward.shared.w1.weight", (fs, d), "colwise", layer=i),
                        ParamSpec(p + "feed_forward.shared.w2.weight", (d, fs), "rowwise", layer=i),
                        ParamSpec(p + "feed_forward.shared.w3.weight", (fs, d), "colwise", layer=i)]
        else:
            out += [ParamSpec(p + "feed_forward.w1.weight", (f, d), "colwise", layer=i),
                    ParamSpec(p + "feed_forward.w2.weight", (d, f), "rowwise", layer=i),
                    ParamSpec(p + "feed_forward.w3.weight", (f, d), "colwise", layer=i)]
    out += [ParamSpec("norm.weight", (d,), "replicate"), ParamSpec("output.weight", (v, d), "vocab")]
    return out


def _chunk0(n: int, parts: int) -> int:
    """Rows of the first (largest) chunk of ``torch.chunk``/``Shard(0)`` over ``parts``."""
    return math.ceil(n / parts)


def local_shape(spec: ParamSpec, dims: ParallelDims, ep: int, has_moe: bool) -> tuple[int, ...]:
    """The local shard on the rank with coordinate 0 on every dim but pp (FSDP's first
    shard is the largest when a size does not divide)."""
    shape = list(spec.shape)
    if spec.expert:
        if ep > 1:
            shape[0] //= ep  # Shard(0) over the ep group; FSDP leaves experts alone
        return tuple(shape)
    if dims.tp > 1:
        if spec.tp in ("colwise", "vocab"):
            shape[0] //= dims.tp
        elif spec.tp == "rowwise":
            shape[1] //= dims.tp
    if dims.dp_cp > 1:  # FSDP2: Shard(0) of the (TP-local) tensor over dp_shard x cp
        shape[0] = _chunk0(shape[0], dims.dp_shard_cp)
    return tuple(shape)


def experts_fsdp_sharded(dims: ParallelDims, ep: int, has_moe: bool) -> bool:
    """Without EP groups (ep = 1 and tp = 1) the experts are ordinary FSDP parameters."""
    return has_moe and not needs_expert_groups(dims, ep, has_moe)


def stage_layout(args: ModelArgs, dims: ParallelDims, plan: ParallelPlan, n_micro: int | None):
    """The pipeline layout ``parallelize`` builds (None without PP)."""
    if dims.pp == 1:
        return None
    from ..pipeline.layout import pipeline_layout
    return pipeline_layout([f"layers.{i}" for i in range(args.n_layers)], dims.pp, plan, n_micro)


def rank_specs(args: ModelArgs, dims: ParallelDims, plan: ParallelPlan, pp_rank: int,
               n_micro: int | None = None) -> list[ParamSpec]:
    """The parameters held by pp rank ``pp_rank`` (all of them without PP)."""
    specs = param_specs(args)
    layout = stage_layout(args, dims, plan, n_micro)
    if layout is None:
        return specs
    stages = layout.stages_of(pp_rank)
    layers = {int(b.split(".")[1]) for s in stages for b in layout.blocks_of(s)}
    first, last = 0 in stages, layout.n_stages - 1 in stages
    return [p for p in specs if (p.layer in layers) if p.layer is not None] + \
        [p for p in specs if p.layer is None and (first if p.first else last)]


def local_param_numels(args: ModelArgs, dims: ParallelDims, plan: ParallelPlan, pp_rank: int = 0,
                       n_micro: int | None = None) -> dict[str, int]:
    """Parameter name -> elements of this rank's shard (rank (pp_rank, 0, 0, 0, 0))."""
    has_moe = args.moe is not None
    ep = plan.expert_parallel
    out = {}
    for spec in rank_specs(args, dims, plan, pp_rank, n_micro):
        if spec.expert and experts_fsdp_sharded(dims, ep, has_moe):
            spec = ParamSpec(spec.name, spec.shape, "replicate", expert=False, layer=spec.layer)
        out[spec.name] = math.prod(local_shape(spec, dims, ep, has_moe))
    return out


# ---- activations -----------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """One rank's memory (bytes). ``peak`` is the phase model of the module docstring."""

    rank: int
    coords: dict[str, int]
    params: int  # local parameter elements
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    buffer_bytes: int
    activation_bytes: float  # saved, all in-flight micro-batches
    logits_bytes: float  # loss peak on the last stage, one micro-batch
    transient_bytes: float  # gathered weights, unsharded grads, recompute, optimizer temp (max)
    peak_bytes: float
    peak_phase: str
    layers: list[int] = field(default_factory=list)
    stages: list[int] = field(default_factory=list)
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def static_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    def breakdown(self) -> dict[str, float]:
        """What the peak is made of (sums to ``peak_bytes``): weights, grads (where they
        exist at the peak), AdamW, activations (at the loss peak), the rest (logits,
        gathered weights, unsharded grads, recompute, optimizer temporary, buffers)."""
        in_backward = self.peak_phase in ("loss/backward", "last block's backward")
        grads = self.grad_bytes if (not in_backward or self.detail["in_flight"] > 1
                                    or self.detail.get("accumulating")) else 0
        acts = 0.0
        if in_backward:
            acts = self.activation_bytes - (self.peak_phase != "loss/backward") * self.detail.get("logits_saved", 0.0)
        parts = {"weights": self.param_bytes, "grads": grads, "AdamW": self.optimizer_bytes, "activations": acts}
        parts["logits+transient"] = max(self.peak_bytes - sum(parts.values()), 0.0)
        return parts


def rank_of(dims: ParallelDims, pp_rank: int) -> int:
    """Global rank of mesh coordinates (pp_rank, 0, 0, 0, 0)."""
    return pp_rank * (dims.world_size // dims.pp)


#: AdamW implementations the estimate knows (``estimate_memory(optimizer=...)``)
OPTIMIZERS = ("foreach", "fused", "bf16_moments")


def optimizer_of(training) -> str:
    """The trainer's AdamW for a ``TrainingConfig``: torch's (foreach) or ours with bf16 moments."""
    return "bf16_moments" if getattr(training, "optimizer_state_dtype", "fp32") == "bf16" else "foreach"


def estimate_memory(args: ModelArgs, dims: ParallelDims, plan: ParallelPlan, *, seq_len: int,
                    micro_batch_size: int, n_micro: int, pp_rank: int = 0,
                    numels: dict[str, int] | None = None, optimizer: str = "foreach",
                    pipeline_p2p: str = "nccl") -> MemoryEstimate:
    """Memory of rank (pp_rank, 0, 0, 0, 0) for one training step of ``n_micro``
    micro-batches of ``micro_batch_size`` sequences of ``seq_len`` tokens.

    ``numels`` (parameter -> local elements) replaces the analytic shards, e.g. by the dry
    run's real ones; by default :func:`local_param_numels`. ``optimizer``: the AdamW
    implementation, "foreach" (torch's default, the trainer's), "fused" (``fused=True``,
    TorchTitan's default and the throughput benchmark's) or "bf16_moments" (ours,
    ``dtensor_parallel/adamw.py``): its state's bytes and its step's temporary.
    ``pipeline_p2p``: the pipeline's transport as it will run ("copy_engine" where
    ``p2p_routing.choose_pipeline_p2p`` takes it): the copy engine's receive rings stay
    allocated from the first message on (``copy_engine_p2p.ring_bytes``).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: choose one of {OPTIMIZERS} (AdamW's implementation)")
    from ..validation import check_degrees

    check_degrees(dims, plan, has_moe=args.moe is not None)  # the API's own checks, no model needed
    layout = stage_layout(args, dims, plan, n_micro)
    numels = numels if numels is not None else local_param_numels(args, dims, plan, pp_rank, n_micro)
    n = sum(numels.values())
    pbytes, gbytes, obytes = 4 * n, 4 * n, (4 if optimizer == "bf16_moments" else 8) * n
    if layout is None:
        stages, layers, virtual, schedule = [0], list(range(args.n_layers)), 1, None
        first = last = True
    else:
        stages = layout.stages_of(pp_rank)
        layers = sorted(int(b.split(".")[1]) for s in stages for b in layout.blocks_of(s))
        virtual, schedule = layout.virtual, layout.schedule
        first, last = 0 in stages, layout.n_stages - 1 in stages
    has_moe = args.moe is not None
    moe_layers = [i for i in layers if args.is_moe_layer(i)]
    buffers = 4 * args.max_seq_len * args.head_dim + 4 * args.moe.n_experts * len(moe_layers) if has_moe \
        else 4 * args.max_seq_len * args.head_dim

    p2p_rings = 0
    if pipeline_p2p == "copy_engine" and layout is not None:
        from ..pipeline.copy_engine_p2p import default_slots, ring_bytes

        residual = _act_bytes(plan, dims)[1]  # a stage's output is the residual stream
        shard = dims.cp * (dims.tp if plan.sequence_parallel else 1)  # a stage boundary's sequence shard
        message = micro_batch_size * (seq_len // shard) * args.dim * residual
        p2p_rings = ring_bytes(dims.pp, default_slots(schedule, dims.pp, virtual, n_micro), message)

    act = activation_bytes(args, dims, plan, layers, seq_len, micro_batch_size, last)
    per_stage_mb = sum(act.per_layer.values()) / len(stages)  # one stage-micro-batch, mean stage
    flight = in_flight(schedule, dims.pp, virtual, pp_rank, n_micro)
    activations = per_stage_mb * flight + act.head * (1 if dims.pp > 1 else 1)

    # gathered weights and unsharded gradients (module docstring, "Transients")
    pb = 2 if plan.mixed_precision == "bf16" else 4
    tp_local = _tp_local_numels(args, dims, plan, layers, first, last)
    embedding = tp_local.get("tok_embeddings.weight", 0)  # FSDP: a unit of its own
    head = tp_local.get("output.weight", 0)  # FSDP: a unit of its own too
    root = sum(v for k, v in tp_local.items() if not k.startswith("layers.")) - embedding - head
    block = max((sum(v for k, v in tp_local.items() if k.startswith(f"layers.{i}.")) for i in layers),
                default=0)
    fsdp = dims.dp_cp > 1
    keeps_all = (not fsdp and pb == 2) or (fsdp and dims.dp_shard_cp == 1)
    end_extra = head_rs = head_freed = 0.0
    if keeps_all:  # autocast's cast cache, or FSDP with a one-rank shard group
        gathered = gathered_at_loss = pb * sum(tp_local.values())
        bwd_grads = (pb + 4) * block
    elif fsdp:
        gathered, gathered_at_loss = pb * (2 * block + root + head), pb * (root + head)
        bwd_grads = (pb + 4) * block + pb * root
        end_extra = 2 * pb * embedding  # gathered again at the end of backward, and its unsharded gradient
        # the head's reduce-scatter, right after its backward: its unsharded gradient, the fp32
        # input of the collective and its output shard
        head_rs = (pb + 4 + 4 / dims.dp_shard_cp) * head
        head_freed = pb * head  # its gathered weight: resharded by that post-backward, before the reduce-scatter
    else:  # fp32 without FSDP: the weights themselves
        gathered = gathered_at_loss = 0.0
        bwd_grads = 4 * block
    recompute_t = act.recompute_transient
    accumulating = n_micro > 1 or dims.pp > 1
    static = pbytes + obytes + buffers + p2p_rings  # (the rings: allocated at the first message, then kept)
    earlier_grads = gbytes if accumulating else 0
    if fsdp and dims.pp > 1:
        # torch's pipeline stage turns FSDP's reshard-after-backward and gradient sync off
        # until the last micro-batch: from the first backward on, the stage's weights stay
        # gathered and its gradients accumulate unsharded, in the fp32 reduce dtype; one
        # reduce-scatter at the end makes the sharded gradients
        stage_numel = sum(tp_local.values())
        gathered = gathered_at_loss = pb * stage_numel
        earlier_grads = 4 * stage_numel
        bwd_grads = pb * block + gbytes
        head_rs = head_freed = 0.0  # (no reshard or reduce after each backward: the head stays gathered too)
    at_loss = static + activations + act.loss_peak + gathered_at_loss + earlier_grads
    gathered_bwd = gathered - head_freed  # (after the head's backward)
    at_block_bwd = static + activations - act.logits_saved + gathered_bwd + bwd_grads + recompute_t + earlier_grads
    at_head_rs = static + activations - act.logits_saved + gathered_bwd + head_rs + earlier_grads
    # the vocab-parallel embedding's gradient leaves DTensor's backward replicated (the whole
    # vocabulary) until ParallelModel cuts it to its shard; FSDP reshards it itself
    embed_grad = 4 * args.vocab_size * args.dim * (1 - 1 / dims.tp) if first and dims.tp > 1 and not fsdp else 0
    at_bwd_end = static + earlier_grads + gathered + bwd_grads if fsdp and dims.pp > 1 else \
        static + gbytes + gathered_bwd + bwd_grads + embed_grad + end_extra
    # foreach AdamW: sqrt(exp_avg_sq) of every parameter at once; fused: one fp32 temporary the
    # size of the largest local parameter (H200, 8B shape: +1.96 GiB on one GPU, the embedding)
    opt_temp = {"foreach": 4 * n, "fused": 4 * max(numels.values(), default=0), "bf16_moments": 0}[optimizer]
    at_opt = pbytes + gbytes + obytes + buffers + p2p_rings + opt_temp
    phases = {"loss/backward": at_loss, "last block's backward": at_block_bwd, "end of backward": at_bwd_end,
              "optimizer step": at_opt}
    if head_rs:
        phases["head's reduce-scatter"] = at_head_rs
    phase = max(phases, key=phases.get)
    coords = {"pp": pp_rank, "dp_replicate": 0, "dp_shard": 0, "cp": 0, "tp": 0}
    return MemoryEstimate(
        rank=rank_of(dims, pp_rank), coords=coords, params=n, param_bytes=pbytes, grad_bytes=gbytes,
        optimizer_bytes=obytes, buffer_bytes=buffers, activation_bytes=activations,
        logits_bytes=act.loss_peak, transient_bytes=max(gathered + bwd_grads, gathered + recompute_t, opt_temp),
        peak_bytes=phases[phase], peak_phase=phase, layers=layers, stages=stages,
        detail={"in_flight": flight, "accumulating": float(accumulating), "per_stage_microbatch": per_stage_mb,
                "p2p_rings": p2p_rings,
                "gathered": gathered, "logits_saved": act.logits_saved, "bwd_grads": bwd_grads, "recompute": recompute_t,
                **{f"phase:{k}": v for k, v in phases.items()}})


def _tp_local_numels(args: ModelArgs, dims: ParallelDims, plan: ParallelPlan, layers: list[int],
                     first: bool, last: bool) -> dict[str, int]:
    """The rank's parameters gathered over FSDP but still TP/EP-sharded (what a forward uses)."""
    keep = set(layers)
    no_fsdp = ParallelDims(pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=dims.tp, world_size=dims.tp)
    out = {}
    for spec in param_specs(args):
        if spec.layer is not None and spec.layer not in keep:
            continue
        if spec.layer is None and not (first if spec.first else last):
            continue
        if spec.expert:  # not gathered by FSDP (EP) - their bytes are static, not transient
            if not experts_fsdp_sharded(dims, plan.expert_parallel, True):
                continue
        out[spec.name] = math.prod(local_shape(spec, no_fsdp, 1, args.moe is not None))
    return out


def activation_alternatives(args: ModelArgs, dims: ParallelDims, plan: ParallelPlan, *, seq_len: int,
                            micro_batch_size: int, layers: list[int]) -> dict[str, float]:
    """Saved activations of one micro-batch on these layers, as planned and with SP / the
    recompute modes switched (for the report: what each knob buys)."""
    out = {}
    sps = [True, False] if dims.tp > 1 else [False]
    for sp in sps:
        for mode in ("none", "selective", "full"):
            act = activation_bytes(args, dims, plan, layers, seq_len, micro_batch_size, False, mode, sp)
            out[f"{'SP' if sp else 'no SP'}, recompute={mode}"] = sum(act.per_layer.values())
    return out
