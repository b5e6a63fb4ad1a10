"""Build on the meta device, parallelize, then initialize shards in place; and bf16."""

from __future__ import annotations

import copy
import math

import torch

from dtensor_parallel import ParallelPlan, build_mesh, parallelize
from dtensor_parallel.models import Llama

from .harness import run_distributed
from .parity import TINY_LLAMA, make_batch, make_model, plan_for, reference_step


def _meta_init_case() -> tuple[float, float]:
    with torch.device("meta"):
        model = Llama(TINY_LLAMA)
    pm = parallelize(model, build_mesh(tp=2, dp_shard=2), ParallelPlan(sequence_parallel=True))
    pm.init_weights(seed=0)
    sd = pm.full_state_dict()
    assert not any(p.is_meta for p in pm.parameters())
    assert all(torch.isfinite(t).all() for t in sd.values())
    assert torch.equal(sd["layers.0.attention_norm.weight"], torch.ones(TINY_LLAMA.dim))
    assert abs(sd["layers.0.attention.wq.weight"].std().item() - 0.02) < 0.002
    x, y = make_batch(TINY_LLAMA.vocab_size, 4, 16)
    loss = pm.forward_backward(pm.shard_batch(x), pm.shard_batch(y)).item()
    checksum = sum(t.double().sum().item() for t in sd.values())
    return loss, checksum


def test_meta_build_parallelize_then_init() -> None:
    results = run_distributed(4, _meta_init_case)
    losses, checksums = zip(*results)
    assert len(set(checksums)) == 1, "ranks hold different full weights"
    assert abs(losses[0] - math.log(TINY_LLAMA.vocab_size)) < 1.0  # a fresh model: about uniform


def _bf16_case(mesh_kwargs: dict, plan_kwargs: dict) -> float:
    ref = make_model("llama")
    x, y = make_batch(TINY_LLAMA.vocab_size, 4, 16)
    ref_loss = reference_step(ref, x, y).item()
    pm = parallelize(copy.deepcopy(ref), build_mesh(**mesh_kwargs),
                     plan_for("llama", mixed_precision="bf16", **plan_kwargs))
    loss = pm.forward_backward(pm.shard_batch(x), pm.shard_batch(y)).item()
    assert abs(loss - ref_loss) < 2e-2 * ref_loss, (loss, ref_loss)
    assert all(p.dtype == torch.float32 for p in pm.parameters()), "master weights stay fp32"
    assert all(p.grad.dtype == torch.float32 for p in pm.parameters())
    return loss


def test_bf16_mixed_precision_fsdp_and_tp() -> None:
    run_distributed(4, _bf16_case, {"tp": 2, "dp_shard": 2}, {"sequence_parallel": True})
    run_distributed(2, _bf16_case, {"tp": 2}, {})  # no FSDP: autocast
