"""The analytic memory estimator: units, the scaling laws it claims (SP, CP, recompute,
pipeline in-flight micro-batches) and its activation model against the tensors autograd
really saves (CPU, fp32, one block)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dtensor_parallel import ParallelPlan
from dtensor_parallel.mesh import ParallelDims
from dtensor_parallel.models.llama import ModelArgs, TransformerBlock, llama3_args, rope_cache
from dtensor_parallel.planning.memory import (activation_bytes, estimate_memory, in_flight, local_param_numels,
                                              parse_bytes, parse_count)


def test_units() -> None:
    assert parse_bytes("80GiB") == 80 * 2 ** 30
    assert parse_bytes("80GB") == 80 * 10 ** 9
    assert parse_bytes("141 gb") == 141 * 10 ** 9
    assert parse_count("70B") == 70 * 10 ** 9 and parse_count("350M") == 350 * 10 ** 6
    with pytest.raises(ValueError, match="80GiB"):
        parse_bytes("eighty")


def _dims(**kw) -> ParallelDims:
    world = 1
    for k in ("pp", "dp_replicate", "dp_shard", "cp", "tp"):
        world *= kw.get(k, 1)
    return ParallelDims(**{"dp_shard": 1, **kw}, world_size=world)


def _acts(args, dims, plan, seq=8192, layers=range(4)) -> float:
    return sum(activation_bytes(args, dims, plan, list(layers), seq, 1, False).per_layer.values())


def test_sp_cuts_the_sequence_sharded_terms_by_tp() -> None:
    args = llama3_args("8B")
    dims = _dims(tp=4)
    plan = ParallelPlan(mixed_precision="bf16")
    no_sp, sp = _acts(args, dims, plan), _acts(args, dims, replace(plan, sequence_parallel=True))
    # the two RMSNorms (fp32 copy + output, residual bytes r = 4 under autocast) shrink by tp
    norms = 2 * (4 + 4) * args.dim * 8192 * 4  # per token, 8192 tokens, 4 layers
    assert no_sp - sp == pytest.approx(norms * (1 - 1 / 4))
    # full recompute keeps only block inputs, which SP shards: exactly / tp
    full = replace(plan, recompute="full")
    assert _acts(args, dims, replace(full, sequence_parallel=True)) == pytest.approx(_acts(args, dims, full) / 4)


def test_cp_divides_activations_and_kv_by_cp() -> None:
    args = llama3_args("70B")
    plan = ParallelPlan(mixed_precision="bf16", sequence_parallel=True)
    # both under FSDP (bf16 residual), so only cp differs
    one, two = _acts(args, _dims(dp_shard=2, tp=8), plan), _acts(args, _dims(cp=2, tp=8), plan)
    assert two == pytest.approx(one / 2)


def test_recompute_orders_memory() -> None:
    args = llama3_args("8B")
    plan = ParallelPlan(mixed_precision="bf16")
    none, sel, full = (_acts(args, _dims(), replace(plan, recompute=m)) for m in ("none", "selective", "full"))
    assert full < sel < none
    assert full == pytest.approx(4 * args.dim * 8192 * 4)  # fp32 residual (autocast) block inputs, 4 layers


def test_selective_under_sp_keeps_each_row_parallel_output_once() -> None:
    """One op per row-parallel layer (matmul + reduce-scatter, ``fused_rowwise``, the default)
    keeps its (b, s/t, d) output; two ops (``fused_rowwise=False``) keep the full-sequence
    partial sums too: 2 layers x a d bytes a token more (tests/test_recompute_memory.py
    measures both)."""
    args = llama3_args("8B")
    plan = ParallelPlan(mixed_precision="bf16", sequence_parallel=True, recompute="selective")
    one, two = _acts(args, _dims(tp=2), plan), _acts(args, _dims(tp=2), replace(plan, fused_rowwise=False))
    assert two - one == pytest.approx(2 * 2 * args.dim * 8192 * 4)  # wo, w2; bf16; 8192 tokens; 4 layers
    no_sp = _acts(args, _dims(tp=2), replace(plan, sequence_parallel=False))
    sp_terms = (4 * args.dim / 2 + 2 * 2 * args.dim / 2) * 8192 * 4  # block input, the two shards
    assert no_sp - one == pytest.approx((4 * args.dim + 2 * 2 * args.dim) * 8192 * 4 - sp_terms)


@pytest.mark.parametrize("schedule,pp,v,rank,m,expect", [
    ("1f1b", 4, 1, 0, 16, 4), ("1f1b", 4, 1, 3, 16, 1), ("1f1b", 4, 1, 0, 2, 2),
    ("interleaved_1f1b", 4, 2, 0, 16, 2 * 3 + 4 + 1), ("interleaved_1f1b", 4, 2, 3, 16, 5),
    ("gpipe", 4, 1, 0, 8, 8), (None, 1, 1, 0, 8, 1),
])
def test_in_flight_micro_batches(schedule, pp, v, rank, m, expect) -> None:
    assert in_flight(schedule, pp, v, rank, m) == expect


def test_interleaving_costs_korthikanti_factor() -> None:
    """Rank 0 of interleaved 1F1B keeps L (1 + (p - 1) / (p v)) layers of a micro-batch."""
    args = llama3_args("70B", max_seq_len=8192)
    plan = ParallelPlan(mixed_precision="bf16", sequence_parallel=True, recompute="full", micro_batch_size=1,
                        global_batch_size=16, pipeline_schedule="interleaved_1f1b", virtual_stages=2)
    dims = _dims(pp=4, tp=4)
    est = estimate_memory(args, dims, plan, seq_len=8192, micro_batch_size=1, n_micro=16)
    per_layer = 4 * args.dim / 4 * 8192  # block input, SP-sharded; fp32 (no FSDP: autocast's residual)
    assert est.activation_bytes == pytest.approx(80 * (1 + 3 / 8) * per_layer)


def test_rule_of_thumb_is_a_fraction_of_the_training_state() -> None:
    """'70B / TP4 / PP4 = 4.4B params = 8.8 GB of bf16' vs 16 B a parameter of real state."""
    args = llama3_args("70B", max_seq_len=8192)
    plan = ParallelPlan(mixed_precision="bf16", sequence_parallel=True, micro_batch_size=1, global_batch_size=64,
                        pipeline_schedule="interleaved_1f1b", virtual_stages=2)
    no_fsdp = _dims(pp=4, tp=4)
    n = sum(local_param_numels(args, no_fsdp, plan, 0, 16).values())
    assert n == pytest.approx(args.num_params() / 16, rel=0.05)
    est = estimate_memory(args, no_fsdp, plan, seq_len=8192, micro_batch_size=1, n_micro=16)
    assert est.static_bytes == 16 * n


def _saved_bytes(fn, weights: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:  # weights (and their transposed views) are not activations
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("kv_heads", [4, 8])
def test_block_activation_model_matches_autograd(kv_heads: int) -> None:
    """fp32, no parallelism: the estimate of one block's saved tensors is within 10% of
    what autograd keeps (the block input counted: the first norm saves it), within 2%."""
    torch.manual_seed(0)
    args = ModelArgs(dim=256, n_layers=1, n_heads=8, n_kv_heads=kv_heads, vocab_size=512, multiple_of=64,
                     ffn_dim_multiplier=None, rope_scaling_factor=None, max_seq_len=256)
    block = TransformerBlock(0, args)
    rope = rope_cache(args)
    b, s = 2, 256
    x = torch.randn(b, s, args.dim, requires_grad=True)
    measured = _saved_bytes(lambda: block(x, rope), {p.untyped_storage().data_ptr() for p in block.parameters()})
    est = activation_bytes(args, _dims(), ParallelPlan(), [0], s, b, False).per_layer[0]
    assert est == pytest.approx(measured, rel=0.02), (est, measured)


def test_fsdp_under_a_pipeline_keeps_the_stage_gathered_and_its_grads_unsharded() -> None:
    """torch's pipeline stage turns FSDP's reshard-after-backward and gradient sync off
    until the last micro-batch: the loss peak of a later micro-batch holds the stage's
    bf16 weights and fp32 unsharded gradients, not the sharded ones (measured on 4 x H100:
    benchmarks/results/memory_estimate_4gpu.json, pp2_fsdp2_1f1b_m4)."""
    args = llama3_args("8B", n_layers=4, max_seq_len=4096)
    plan = ParallelPlan(mixed_precision="bf16", micro_batch_size=1, global_batch_size=8)
    dims = _dims(pp=2, dp_shard=2)
    last = estimate_memory(args, dims, plan, seq_len=4096, micro_batch_size=1, n_micro=4, pp_rank=1)
    stage = sum(local_param_numels(args, _dims(pp=2), plan, 1, 4).values())  # unsharded stage params
    assert last.params * 2 == stage  # FSDP2 shards them in two
    assert last.detail["gathered"] == 2 * stage
    static = last.param_bytes + last.optimizer_bytes + last.buffer_bytes
    at_loss = static + last.activation_bytes + last.logits_bytes + 2 * stage + 4 * stage
    assert last.detail["phase:loss/backward"] == pytest.approx(at_loss)
    # without the pipeline, the same FSDP gathers only the root at the loss
    flat = estimate_memory(args, _dims(dp_shard=2), plan, seq_len=4096, micro_batch_size=1, n_micro=4)
    assert flat.detail["phase:loss/backward"] < flat.param_bytes + flat.optimizer_bytes + flat.grad_bytes \
        + flat.activation_bytes + flat.logits_bytes + flat.detail["gathered"] + flat.buffer_bytes


def test_compiled_loss_keeps_the_logits_in_the_compute_dtype() -> None:
    """Compiled (plan.compile True or "auto": the GPU run), the cross entropy keeps the head's
    bf16 output and adds its bf16 gradient at the backward (a V / t each a token), as the
    eager chunked loss does (its Triton kernels); DTensor's cross entropy over an uneven
    vocabulary split keeps an fp32 log-softmax and adds 8 V / t; the fused loss keeps neither."""
    from dtensor_parallel.planning.activations import logits_bytes

    args = llama3_args("8B", n_layers=2)
    tokens, v = 8192, args.vocab_size
    eager = logits_bytes(args, ParallelPlan(mixed_precision="bf16", compile=False), 1, 2, tokens)
    for compile_ in (True, "auto"):
        assert logits_bytes(args, ParallelPlan(mixed_precision="bf16", compile=compile_), 1, 2, tokens) == \
            (2 * v * tokens, 2 * v * tokens)
    assert eager == (2 * v * tokens, 2 * v * tokens)
    tp2 = logits_bytes(args, ParallelPlan(mixed_precision="bf16", compile=False), 2, 2, tokens)
    assert tp2 == (2 * v / 2 * tokens, 2 * v / 2 * tokens)  # the vocabulary shard's
    tp5 = logits_bytes(args, ParallelPlan(mixed_precision="bf16", compile=False), 5, 2, tokens)
    assert tp5 == (4 * v / 5 * tokens, 8 * v / 5 * tokens)  # 128256 / 5: uneven shards: F.cross_entropy on DTensor
    assert logits_bytes(args, ParallelPlan(compile=True, fused_loss=True), 1, 2, tokens)[0] == 4 * tokens


def test_fused_adamw_needs_one_parameter_sized_temporary() -> None:
    """The optimizer step's temporary: foreach AdamW one fp32 copy of every parameter, fused
    AdamW one of the largest parameter (measured: +1.96 GiB on one H200 at the 8B shape)."""
    args = llama3_args("8B", n_layers=2)
    dims = ParallelDims(dp_shard=1, world_size=1)
    plan = ParallelPlan(mixed_precision="bf16")
    numels = local_param_numels(args, dims, plan, 0, 1)
    kw = dict(seq_len=1024, micro_batch_size=1, n_micro=1)
    foreach = estimate_memory(args, dims, plan, **kw).detail["phase:optimizer step"]
    fused = estimate_memory(args, dims, plan, optimizer="fused", **kw).detail["phase:optimizer step"]
    assert foreach - fused == 4 * (sum(numels.values()) - max(numels.values()))
    with pytest.raises(ValueError, match="optimizer="):
        estimate_memory(args, dims, plan, optimizer="sgd", **kw)


def test_bf16_moments_halve_the_optimizer_state_and_need_no_temporary() -> None:
    """Our AdamW with bf16 moments: 4 B a parameter of state instead of 8, and the step updates
    in place (one Triton kernel a parameter), so the optimizer phase is the static state."""
    args = llama3_args("8B", n_layers=2)
    dims = ParallelDims(dp_shard=1, world_size=1)
    plan = ParallelPlan(mixed_precision="bf16")
    n = sum(local_param_numels(args, dims, plan, 0, 1).values())
    kw = dict(seq_len=1024, micro_batch_size=1, n_micro=1)
    fused = estimate_memory(args, dims, plan, optimizer="fused", **kw)
    ours = estimate_memory(args, dims, plan, optimizer="bf16_moments", **kw)
    assert (fused.optimizer_bytes, ours.optimizer_bytes) == (8 * n, 4 * n)
    assert ours.detail["phase:optimizer step"] == ours.param_bytes + ours.grad_bytes + ours.optimizer_bytes \
        + ours.buffer_bytes
    assert ours.peak_bytes < fused.peak_bytes


def test_alternate_selective_policy_drops_wk_wo_w3_outputs() -> None:
    """TorchTitan's op-level policy (every second matmul of a block recomputed): the estimate
    drops wk's, wo's and w3's saved outputs, a * (kv hd + d + f) / t bytes a token (under
    SP wo's output is one op's sequence shard)."""
    from dtensor_parallel.planning.activations import dense_layer_bytes_per_token

    args = llama3_args("8B", n_layers=2)
    kv_hd, d, f = args.n_kv_heads * args.head_dim, args.dim, args.ffn_hidden_dim
    for dims, sp in ((ParallelDims(dp_shard=1, world_size=1), False), (ParallelDims(tp=2, world_size=2), True)):
        t = dims.tp
        base = ParallelPlan(mixed_precision="bf16", recompute="selective", sequence_parallel=sp)
        alt = ParallelPlan(mixed_precision="bf16", recompute="selective", sequence_parallel=sp,
                           selective_policy="save_alternate_matmuls")
        drop = dense_layer_bytes_per_token(args, dims, base) - dense_layer_bytes_per_token(args, dims, alt)
        assert drop == 2 * (kv_hd / t + d / t + f / t), (dims, drop)


def test_copy_engine_rings_are_counted_where_the_copy_engine_runs() -> None:
    """pipeline_p2p resolved to the copy engine: every phase holds its receive rings
    (``copy_engine_p2p.ring_bytes``: 2 rings at PP2, default_slots slots of the stage output,
    the fp32 residual stream under autocast); NCCL and no pipeline hold none."""
    from dtensor_parallel.pipeline.copy_engine_p2p import default_slots, ring_bytes

    args = llama3_args("8B", n_layers=8, max_seq_len=4096)
    plan = ParallelPlan(mixed_precision="bf16", virtual_stages=2, micro_batch_size=1, global_batch_size=8)
    dims = _dims(pp=2)
    kw = dict(seq_len=4096, micro_batch_size=1, n_micro=8)
    nccl = estimate_memory(args, dims, plan, **kw)
    ce = estimate_memory(args, dims, plan, pipeline_p2p="copy_engine", **kw)
    rings = ring_bytes(2, default_slots("interleaved_1f1b", 2, 2, 8), 4096 * args.dim * 4)
    assert rings == 2 * 3 * (64 << 20) and ce.detail["p2p_rings"] == rings and nccl.detail["p2p_rings"] == 0
    for phase in ("loss/backward", "last block's backward", "end of backward", "optimizer step"):
        assert ce.detail[f"phase:{phase}"] - nccl.detail[f"phase:{phase}"] == rings, phase
    flat = estimate_memory(args, _dims(), ParallelPlan(mixed_precision="bf16"), pipeline_p2p="copy_engine", **kw)
    assert flat.detail["p2p_rings"] == 0  # no pipeline, no rings
