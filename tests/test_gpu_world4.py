"""The four-GPU integration matrix (issue 10) through NCCL: every layout's loss and every
gradient equal the single-device model's (``pytest -m gpu``; needs 4 CUDA devices).

The same layouts run on gloo ranks in the CPU suite (test_parity_gloo, test_pipeline,
test_context_parallel, test_expert_parallel); here NCCL, CUDA streams and the Triton
kernels on real GPUs are what is tested. Run through ``benchmarks/run_4gpu.sh``.
"""

from __future__ import annotations

import pytest
import torch

from .harness import run_distributed
from .parity import one_step_parity, training_parity

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 CUDA GPUs"),
]

TRITON_ATTENTION = {"kernels": {"attention": "triton"}}
LAYOUTS = {
    # name: (model kind, build_mesh kwargs, plan kwargs); 8 sequences of 32 tokens a step
    "tp4_sp": ("llama", {"tp": 4}, {"sequence_parallel": True}),
    "tp4_sp_triton_rs": ("llama", {"tp": 4}, {"sequence_parallel": True,
                                              "kernels": {"sp_reduce_scatter": "triton"}}),
    "fsdp4": ("llama", {"dp_shard": 4}, {}),
    "hsdp2x2": ("llama", {"dp_replicate": 2, "dp_shard": 2}, {}),
    "pp4_1f1b": ("llama", {"pp": 4}, {"micro_batch_size": 2, "pipeline_schedule": "1f1b"}),
    "pp4_interleaved_v2": ("llama8", {"pp": 4}, {"micro_batch_size": 2, "virtual_stages": 2,
                                                 "pipeline_schedule": "interleaved_1f1b"}),
    "cp4_torch": ("llama", {"cp": 4}, {}),
    "cp4_triton": ("llama", {"cp": 4}, TRITON_ATTENTION),
    "ep4": ("moe", {"dp_shard": 4}, {"expert_parallel": 4}),
    "ep4_triton_dispatch": ("moe", {"dp_shard": 4}, {"expert_parallel": 4,
                                                     "kernels": {"moe_dispatch": "triton"}}),
    "tp2_pp2": ("llama", {"pp": 2, "tp": 2}, {"micro_batch_size": 2, "sequence_parallel": True}),
    "tp2_cp2": ("llama", {"cp": 2, "tp": 2}, {"sequence_parallel": True}),
    "tp2_cp2_triton": ("llama", {"cp": 2, "tp": 2}, {"sequence_parallel": True, **TRITON_ATTENTION}),
    "tp2_ep2": ("moe", {"tp": 2, "dp_shard": 2}, {"expert_parallel": 2, "sequence_parallel": True}),
    "pp2_cp2": ("llama", {"pp": 2, "cp": 2}, {"micro_batch_size": 2}),
    "tp2_fsdp2": ("llama", {"tp": 2, "dp_shard": 2}, {"sequence_parallel": True}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gpu4_one_step_parity(layout: str) -> None:
    kind, mesh_kwargs, plan_kwargs = LAYOUTS[layout]
    losses = run_distributed(4, one_step_parity, kind, mesh_kwargs, plan_kwargs, batch=8, seq=32,
                             backend="nccl")
    assert len(set(losses)) == 1, losses


@pytest.mark.parametrize("layout", ["tp2_fsdp2", "pp4_interleaved_v2"])
def test_gpu4_training_tracks_single_device(layout: str) -> None:
    kind, mesh_kwargs, plan_kwargs = LAYOUTS[layout]
    run_distributed(4, training_parity, kind, mesh_kwargs, plan_kwargs, steps=10, batch=8, seq=32,
                    backend="nccl")
