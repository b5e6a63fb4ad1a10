"""``dtensor-parallel suggest``: degrees for a model size and a cluster, following the
decision guide, each choice with its reason, checked by the memory estimator.

The guide (Megatron-Core's; Narayanan et al. 2021, "Efficient Large-Scale Language Model
Training on GPU Clusters", sec. 3 takeaways), in the order applied:

1. **TP inside a node, never across nodes**, sized by the dense (active) parameters:
   < 1B: 1, < 10B: 2, < 20B: 4, else 8; at most the GPUs of a node, at most 4 on ethernet
   clusters (PCIe boxes without NVSwitch, as a rule), and a divisor of the heads.
2. **CP for sequences over 8K**: cp = seq / 8192 (rounded up to a power of 2).
3. **PP across nodes** until one model-parallel group (tp x pp ranks, x ep for experts)
   holds the weights: the smallest power of 2 with ``6 B x params / (tp pp) <= half the GPU``
   (bf16 weights + fp32 gradients, Megatron's distributed-optimizer accounting, leaving
   half for activations). **More PP on ethernet** (x2): point-to-point activations are
   the lightest traffic to send over slow links, and a smaller FSDP group gathers less.
4. **EP for MoE**: the largest divisor of the experts that the ranks of a stage
   (dp_shard x cp x tp, which EP is folded out of) allow.
5. **DP the rest** (FSDP over dp_shard: it shards weights, gradients and AdamW).
6. **SP whenever TP > 1**; **interleaved 1F1B whenever PP > 1** (2 virtual stages where
   the layers split).
7. Then the estimator (:mod:`dtensor_parallel.planning.memory`): no recompute if it fits, else
   selective, else full; if none fits, more PP, then more TP (inside the node).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..expert_parallel import ep_fold_size
from .memory import GIB, MemoryEstimate, estimate_memory, fmt_bytes, parse_bytes, parse_count
from ..mesh import ParallelDims
from ..models.llama import LLAMA3_FLAVOURS, MOE_FLAVOURS, ModelArgs
from ..plan import ParallelPlan

INTERCONNECTS = ("nvlink", "ib", "ethernet")
CP_TOKENS = 8192  # sequence length a CP rank takes before the guide adds CP
HEADROOM = 0.10

# Llama 3 shapes to scale from (Llama 3.2 1B/3B sizes for the small ones)
_SMALL = ModelArgs(dim=1024, n_layers=16, n_heads=16, n_kv_heads=8, vocab_size=32000, ffn_hidden=4096,
                   rope_scaling_factor=None)
_1B = ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192)
_3B = ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_hidden=8192)
DENSE_BASES = (_SMALL, _1B, _3B, LLAMA3_FLAVOURS["8B"], LLAMA3_FLAVOURS["70B"], LLAMA3_FLAVOURS["405B"])


def model_for(params: int, seq: int, experts: int | None = None, active: int | None = None) -> tuple[ModelArgs, str]:
    """A Llama-shaped model of about ``params`` parameters: the nearest published shape
    with its layer count scaled. MoE: Mixtral's shape (<= 64 experts) or DeepSeek-V3's."""
    if experts:
        base = MOE_FLAVOURS["mixtral-8x7b" if experts <= 64 else "deepseek-v3-shaped"]
        top_k = min(base.moe.top_k, experts)
        base = replace(base, moe=replace(base.moe, n_experts=experts, top_k=top_k))
        name = "Mixtral-shaped" if experts <= 64 else "DeepSeek-V3-shaped"
    else:
        base = min(DENSE_BASES, key=lambda a: abs(math.log(a.num_params() / params)))
        name = f"Llama-3-shaped (dim {base.dim})"
        if abs(base.num_params() / params - 1) < 0.05:  # a published size: keep its layers
            args = replace(base, max_seq_len=max(seq, 2))
            return args, f"{name}, {args.n_layers} layers: {args.num_params() / 1e9:.2f}B params"
    one = replace(base, n_layers=base.n_dense_layers + 1).num_params() - replace(
        base, n_layers=base.n_dense_layers).num_params()
    fixed = replace(base, n_layers=base.n_dense_layers).num_params()
    layers = max(base.n_dense_layers + 1, round((params - fixed) / one) + base.n_dense_layers)
    args = replace(base, n_layers=layers, max_seq_len=max(seq, 2))
    return args, f"{name}, {layers} layers: {args.num_params() / 1e9:.2f}B params" + (
        f", {args.num_params(active=True) / 1e9:.2f}B active" if experts else "")


def _pow2_at_least(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1))))


@dataclass
class Suggestion:
    args: ModelArgs
    model_desc: str
    gpus: int
    gpus_per_node: int
    dims: ParallelDims
    ep: int
    plan: ParallelPlan
    seq: int
    n_micro: int
    gpu_memory: int
    reasons: list[str] = field(default_factory=list)
    estimates: list[MemoryEstimate] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(e.peak_bytes for e in self.estimates)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_memory * (1 - HEADROOM)

    def report(self) -> str:
        d, p = self.dims, self.plan
        lines = [f"model: {self.model_desc}", f"cluster: {self.gpus} GPUs, {self.gpus_per_node} a node, "
                 f"{fmt_bytes(self.gpu_memory)} each", "",
                 f"suggested: TP{d.tp} x PP{d.pp} x CP{d.cp} x DP{d.dp} (FSDP over dp_shard {d.dp_shard}"
                 + (f" x cp {d.cp}" if d.cp > 1 else "") + ")" + (f", EP{self.ep}" if self.ep > 1 else "")
                 + f"; SP={p.sequence_parallel}, recompute={p.recompute}"
                 + (f", {p.pipeline_schedule} with {p.virtual_stages or 1} stage(s) a rank" if d.pp > 1 else ""),
                 "", "why:"]
        lines += [f"  - {r}" for r in self.reasons]
        worst = max(self.estimates, key=lambda e: e.peak_bytes)
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines += ["", f"memory ({verdict}): peak {fmt_bytes(worst.peak_bytes)} on pp rank {worst.coords['pp']} "
                      f"({worst.peak_phase}) of {fmt_bytes(self.gpu_memory * (1 - HEADROOM))} usable: weights "
                      f"{fmt_bytes(worst.param_bytes)} + grads {fmt_bytes(worst.grad_bytes)} + AdamW "
                      f"{fmt_bytes(worst.optimizer_bytes)} + activations {fmt_bytes(worst.activation_bytes)} "
                      f"(a step: {self.n_micro} micro-batches of 1 x {self.seq} tokens per dp rank)",
                  "", "as a recipe:", "  [parallel]",
                  f"  pp = {d.pp}\n  dp_replicate = {d.dp_replicate}\n  dp_shard = {d.dp_shard}\n"
                  f"  cp = {d.cp}\n  tp = {d.tp}\n  ep = {self.ep}", "  [plan]",
                  f"  sequence_parallel = {str(p.sequence_parallel).lower()}\n  recompute = \"{p.recompute}\"\n"
                  f"  mixed_precision = \"bf16\""]
        if d.pp > 1:
            lines.append(f"  pipeline_schedule = \"{p.pipeline_schedule}\"")
            if p.virtual_stages:
                lines.append(f"  virtual_stages = {p.virtual_stages}")
            for k in ("first_stage_layers", "last_stage_layers"):
                if getattr(p, k) is not None:
                    lines.append(f"  {k} = {getattr(p, k)}")
        return "\n".join(lines)


def _tp_for(active: float, heads: int, kv_heads: int, gpus_per_node: int, interconnect: str,
            gpus: int) -> tuple[int, str]:
    band = 1 if active < 1e9 else 2 if active < 10e9 else 4 if active < 20e9 else 8
    why = (f"{active / 1e9:.1f}B (active) parameters -> TP{band} (guide: <1B: 1, <10B: 2, <20B: 4, else 8)")
    tp = band
    if tp > gpus_per_node:
        tp = gpus_per_node
        why += f"; capped at the {gpus_per_node} GPUs of a node (TP never crosses nodes)"
    if interconnect == "ethernet" and tp > 4:
        tp = 4
        why += "; at most 4 on an ethernet cluster (PCIe nodes, no NVSwitch as a rule)"
    while tp > 1 and (heads % tp or kv_heads % tp or gpus % tp):
        tp //= 2
        why += f"; lowered to {tp} to divide the heads ({heads}/{kv_heads}) and the GPUs"
    return tp, why


def _schedule(args: ModelArgs, pp: int) -> tuple[dict, str]:
    """interleaved_1f1b with 2 stages a rank where the layers split (evenly, or with the
    remainder on the first/last stage), else 1f1b."""
    from ..pipeline.split import stage_layer_counts

    n = args.n_layers
    for v, name in ((2, "interleaved_1f1b"), (1, "1f1b")):
        stages = pp * v
        if stages > n:
            continue
        if n % stages == 0:
            return ({"pipeline_schedule": name, "virtual_stages": v if v > 1 else None},
                    f"{name}: {stages} stages of {n // stages} layers")
        k = math.ceil(n / stages)
        rest = n - (stages - 2) * k
        if 2 <= rest <= 2 * k and stages > 2:
            first, last = rest - rest // 2, rest // 2
            try:
                stage_layer_counts(n, stages, first_stage_layers=first, last_stage_layers=last)
            except ValueError:
                continue
            return ({"pipeline_schedule": name, "virtual_stages": v if v > 1 else None,
                     "first_stage_layers": first, "last_stage_layers": last},
                    f"{name}: {stages} stages of {k} layers, the first {first} and the last {last} "
                    f"(they also hold the embedding and the head)")
    raise ValueError(f"{n} layers do not split over pp={pp}")


def suggest(*, params: str | int, gpus: int, gpus_per_node: int = 8, interconnect: str = "ib", seq: int = 8192,
            experts: int | None = None, active_params: str | int | None = None, gpu_memory: str | int = "80GiB",
            global_batch_tokens: str | int = "4M") -> Suggestion:
    if interconnect not in INTERCONNECTS:
        raise ValueError(f"interconnect={interconnect!r}: choose one of {INTERCONNECTS}")
    if gpus < 1 or gpus_per_node < 1:
        raise ValueError(f"need gpus >= 1 and gpus_per_node >= 1, got {gpus}, {gpus_per_node}")
    if gpus > gpus_per_node and gpus % gpus_per_node:
        raise ValueError(f"{gpus} GPUs are not whole nodes of {gpus_per_node}")
    total = parse_count(params)
    mem = parse_bytes(gpu_memory)
    args, desc = model_for(total, seq, experts, parse_count(active_params) if active_params else None)
    active = args.num_params(active=True) if experts else args.num_params()
    if experts and active_params:
        active = parse_count(active_params)
    reasons = []

    tp, why = _tp_for(active, args.n_heads, args.n_kv_heads, gpus_per_node, interconnect, gpus)
    reasons.append(f"TP{tp}: {why}")
    cp = 1
    if seq > CP_TOKENS:
        cp = _pow2_at_least(seq / CP_TOKENS)
        while cp > 1 and (gpus % (tp * cp) or seq % (2 * cp)):
            cp //= 2
        reasons.append(f"CP{cp}: sequence {seq} > {CP_TOKENS} tokens: {seq // cp} tokens a rank, ring attention")
    else:
        reasons.append(f"CP1: sequence {seq} <= {CP_TOKENS} tokens")

    expert_params = args.num_params() - replace(args, moe=None, n_dense_layers=0).num_params() \
        + 3 * args.dim * args.ffn_hidden_dim * (args.n_layers - args.n_dense_layers) if experts else 0
    dense_params = args.num_params() - expert_params

    def ep_for(pp: int) -> int:
        if not experts:
            return 1
        fold = gpus // (pp * tp * cp) * cp * tp
        return max(e for e in range(1, experts + 1) if experts % e == 0 and fold % e == 0)

    budget = 0.5 * mem
    pp = 1
    while True:
        ep = ep_for(pp)
        need = (6 * dense_params / tp + 16 * expert_params / ep) / pp
        ok_div = gpus % (tp * cp * pp * 2) == 0 and pp * 2 <= args.n_layers
        if need <= budget or not ok_div:
            break
        pp *= 2
    ep = ep_for(pp)
    need = (6 * dense_params / tp + 16 * expert_params / ep) / pp
    experts_note = (f" + 16 B x {expert_params / ep / 1e9:.2f}B expert params (EP shards are not FSDP-sharded)"
                    if experts else "")
    reasons.append(f"PP{pp}: (6 B (bf16 weights + fp32 grads) x {dense_params / tp / 1e9:.2f}B params{experts_note}) "
                   f"/ pp {pp} = {fmt_bytes(need)} <= half the GPU ({fmt_bytes(budget)})"
                   + (" (smallest such power of 2)" if pp > 1 else ": no pipeline needed"))
    if interconnect == "ethernet" and gpus % (tp * cp * pp * 2) == 0 and pp * 2 <= args.n_layers \
            and gpus > gpus_per_node:
        pp *= 2
        ep = ep_for(pp)
        reasons.append(f"PP{pp}: doubled on ethernet: pipeline P2P is the lightest traffic for slow links, and "
                       f"a smaller FSDP group gathers less across them")
    if experts:
        reasons.append(f"EP{ep}: {experts} experts over the {ep_fold_size(ParallelDims(pp=pp, dp_shard=-1, cp=cp, tp=tp, world_size=gpus))}"
                       f" ranks of a stage (dp_shard x cp x tp, EP folded out of them): {experts // ep} expert(s) a rank")

    def build(pp: int, tp: int, recompute: str):
        dims = ParallelDims(pp=pp, dp_shard=-1, cp=cp, tp=tp, world_size=gpus)
        ep = ep_for_dims(dims)
        sched, sched_why = _schedule(args, pp) if pp > 1 else ({}, "")
        seqs = max(1, int(parse_count(global_batch_tokens)) // seq)
        per = dims.dp * max(pp, 1)
        seqs = max(per, seqs // per * per)
        n_micro = seqs // dims.dp
        plan = ParallelPlan(sequence_parallel=tp > 1, recompute=recompute, mixed_precision="bf16",
                            micro_batch_size=1, global_batch_size=seqs, expert_parallel=ep, **sched)
        ests = [estimate_memory(args, dims, plan, seq_len=seq, micro_batch_size=1, n_micro=n_micro, pp_rank=r)
                for r in range(pp)]
        return dims, ep, plan, n_micro, ests, sched_why

    def ep_for_dims(dims: ParallelDims) -> int:
        if not experts:
            return 1
        fold = ep_fold_size(dims)
        return max(e for e in range(1, experts + 1) if experts % e == 0 and fold % e == 0)

    usable = mem * (1 - HEADROOM)
    tried = []
    result = None
    for pp_try, tp_try in _escalations(pp, tp, gpus, cp, gpus_per_node, interconnect, args):
        for recompute in ("none", "selective", "full"):
            dims, ep, plan, n_micro, ests, sched_why = build(pp_try, tp_try, recompute)
            peak = max(e.peak_bytes for e in ests)
            tried.append(f"TP{tp_try} PP{pp_try} recompute={recompute}: peak {fmt_bytes(peak)}")
            result = (dims, ep, plan, n_micro, ests, sched_why, recompute)
            if peak <= usable:
                break
        else:
            continue
        break
    dims, ep, plan, n_micro, ests, sched_why, recompute = result
    if dims.pp != pp or dims.tp != tp:
        reasons.append(f"raised to TP{dims.tp} x PP{dims.pp}: the guide's layout did not fit even with full recompute")
    reasons.append(f"DP{dims.dp}: the rest of the {gpus} GPUs, as FSDP (weights, grads and AdamW sharded over "
                   f"dp_shard x cp = {dims.dp_shard_cp})")
    reasons.append("SP: on, as whenever TP > 1 (activations between the TP regions / tp)" if dims.tp > 1
                   else "SP: off (no TP)")
    if dims.pp > 1:
        reasons.append(f"schedule {sched_why} (interleaved whenever PP > 1: bubble / virtual stages)")
    reasons.append(f"recompute={recompute}: " + "; ".join(tried[-3:] if len(tried) > 3 else tried))
    return Suggestion(args, desc, gpus, gpus_per_node, dims, ep, plan, seq, n_micro, mem, reasons, ests)


def _escalations(pp: int, tp: int, gpus: int, cp: int, gpus_per_node: int, interconnect: str, args: ModelArgs):
    """The guide's layout, then more PP, then more TP (inside a node)."""
    yield pp, tp
    p = pp
    while gpus % (tp * cp * p * 2) == 0 and p * 2 <= args.n_layers:
        p *= 2
        yield p, tp
    t = tp
    cap = min(gpus_per_node, 4 if interconnect == "ethernet" else 8)
    while t * 2 <= cap and args.n_heads % (t * 2) == 0 and args.n_kv_heads % (t * 2) == 0 \
            and gpus % (t * 2 * cp * pp) == 0:
        t *= 2
        yield pp, t
