"""The same parity cases on GPUs through NCCL (``pytest -m gpu``; needs 2 CUDA devices).

Run through the device tool: ``python -m pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from .harness import run_distributed
from .parity import one_step_parity, training_parity
from .test_pipeline_p2p import P2P_LAYOUTS, p2p_matches_nccl
from .test_meta_init import _bf16_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

# Under the plan's default (compile="auto") every layout below runs compiled on CUDA; the
# "_eager" ones keep the eager path covered.
LAYOUTS = {
    "tp2": ({"tp": 2}, {}),
    "tp2_sp": ({"tp": 2}, {"sequence_parallel": True}),
    "fsdp2": ({"dp_shard": 2}, {}),
    "ddp2": ({"dp_replicate": 2, "dp_shard": 1}, {}),
    "tp2_sp_selective": ({"tp": 2}, {"sequence_parallel": True, "recompute": "selective"}),
    "pp2_1f1b": ({"pp": 2}, {"micro_batch_size": 2}),
    "pp2_interleaved_v2": ({"pp": 2}, {"micro_batch_size": 2, "virtual_stages": 2}),
    "pp2_zbv": ({"pp": 2}, {"micro_batch_size": 2, "pipeline_schedule": "zbv"}),
    "pp2_1f1b_copy_engine": ({"pp": 2}, {"micro_batch_size": 2, "pipeline_p2p": "copy_engine"}),
    # (interleaved and ZBV take the copy engine by default, pipeline_p2p="auto": NCCL pinned here)
    "pp2_interleaved_v2_nccl": ({"pp": 2}, {"micro_batch_size": 2, "virtual_stages": 2, "pipeline_p2p": "nccl"}),
    "cp2_torch": ({"cp": 2}, {}),
    "cp2_triton": ({"cp": 2}, {"kernels": {"attention": "triton"}}),
    "cp2_sdpa": ({"cp": 2}, {"kernels": {"attention": "sdpa"}}),
    "cp2_triton_selective": ({"cp": 2}, {"kernels": {"attention": "triton"}, "recompute": "selective"}),
    "tp2_sp_selective_eager": ({"tp": 2}, {"sequence_parallel": True, "recompute": "selective", "compile": False}),
    "fsdp2_eager": ({"dp_shard": 2}, {"compile": False}),
    "pp2_interleaved_v2_eager": ({"pp": 2}, {"micro_batch_size": 2, "virtual_stages": 2, "compile": False}),
    "cp2_triton_selective_eager": ({"cp": 2}, {"kernels": {"attention": "triton"}, "recompute": "selective",
                                               "compile": False}),
}


@pytest.mark.parametrize("attention", ["triton", "sdpa"])
def test_gpu_packed_documents_cp2(attention: str) -> None:
    """Packed documents sharded per document, the ring masking by document and position."""
    losses = run_distributed(2, one_step_parity, "llama", {"cp": 2}, {"kernels": {"attention": attention}},
                             batch=8, seq=64, documents=True, backend="nccl")
    assert len(set(losses)) == 1, losses
# MoE layouts (kind "moe"): experts over ep, with both dispatch backends
MOE_LAYOUTS = {
    "ep2": ({"dp_shard": 2}, {"expert_parallel": 2}),
    "ep2_triton_dispatch": ({"dp_shard": 2}, {"expert_parallel": 2, "kernels": {"moe_dispatch": "triton"}}),
    "ep2_from_cp2": ({"cp": 2}, {"expert_parallel": 2}),
    "tp2_sp": ({"tp": 2}, {"sequence_parallel": True}),  # MoE token parallel over tp
    "ep2_from_tp2_sp": ({"tp": 2}, {"sequence_parallel": True, "expert_parallel": 2}),
}


@pytest.mark.parametrize("kind", ["llama", "toy"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gpu_one_step_parity(layout: str, kind: str) -> None:
    mesh_kwargs, plan_kwargs = LAYOUTS[layout]
    # each rank asserts loss and gradients against one device; the ranks also agree
    losses = run_distributed(2, one_step_parity, kind, mesh_kwargs, plan_kwargs, batch=8, backend="nccl")
    assert len(set(losses)) == 1, losses


@pytest.mark.parametrize("kind", ["moe", "moe_aux"])  # moe_aux: the balancing losses train the router
@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
def test_gpu_moe_one_step_parity(layout: str, kind: str) -> None:
    mesh_kwargs, plan_kwargs = MOE_LAYOUTS[layout]
    losses = run_distributed(2, one_step_parity, kind, mesh_kwargs, plan_kwargs, batch=8, backend="nccl")
    assert len(set(losses)) == 1, losses


def test_gpu_training_parity_tp_sp() -> None:
    losses = run_distributed(2, training_parity, "llama", {"tp": 2}, {"sequence_parallel": True}, backend="nccl")
    assert losses[0] == losses[1]


def test_gpu_bf16_fsdp() -> None:
    losses = run_distributed(2, _bf16_case, {"dp_shard": 2}, {}, backend="nccl")
    assert losses[0] == losses[1]


@pytest.mark.parametrize("slots", [None, 1])
@pytest.mark.parametrize("layout", list(P2P_LAYOUTS))
def test_gpu_copy_engine_p2p_bit_exact(layout: str, slots: int | None) -> None:
    """pipeline_p2p='copy_engine' on the GPUs (symmetric memory, copy-engine pushes, the wait
    kernel): two steps' losses and every gradient bit-identical to the NCCL path's (eager blocks:
    the same kernels on both); ``slots=1``: every send after the first waits for its ack."""
    kind, mesh_kwargs, plan_kwargs = P2P_LAYOUTS[layout]
    stats = run_distributed(2, p2p_matches_nccl, kind, mesh_kwargs, {**plan_kwargs, "compile": False}, slots=slots,
                            backend="nccl")
    assert all(s["sent"] > 0 for s in stats), stats
