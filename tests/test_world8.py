"""One full node's layouts (issue 11) on 8 gloo ranks: TP8+SP, PP4 x TP2 interleaved, EP8
and the 4-D TP2 x PP2 x CP2 (the CP8 ring runs on 8 GPUs only: CI's 15 minutes on 2 cores); loss and every gradient equal the single-device
model's. ``tests/test_gpu_world8.py`` runs the same table on 8 GPUs through NCCL, plus the
CP8 ring with the Triton block kernel (8 interpreter ranks are too slow for the CPU suite;
tests/test_context_parallel.py runs the Triton ring at CP4)."""

from __future__ import annotations

import pytest

from .harness import run_distributed
from .parity import one_step_parity

WORLD8_LAYOUTS = {
    # name: (model kind, build_mesh kwargs, plan kwargs); 8 sequences of 32 tokens a step
    "tp8_sp": ("llama_kv8", {"tp": 8}, {"sequence_parallel": True}),
    "pp4_tp2_interleaved": ("llama8", {"pp": 4, "tp": 2},
                            {"micro_batch_size": 2, "virtual_stages": 2, "pipeline_schedule": "interleaved_1f1b",
                             "sequence_parallel": True}),
    "ep8": ("moe8", {"dp_shard": 8}, {"expert_parallel": 8}),
    "tp2_pp2_cp2": ("llama", {"pp": 2, "cp": 2, "tp": 2}, {"micro_batch_size": 2, "sequence_parallel": True}),
}


@pytest.mark.parametrize("layout", list(WORLD8_LAYOUTS))
def test_world8_one_step_parity(layout: str) -> None:
    kind, mesh_kwargs, plan_kwargs = WORLD8_LAYOUTS[layout]
    losses = run_distributed(8, one_step_parity, kind, mesh_kwargs, plan_kwargs, batch=8, seq=32)
    assert len(set(losses)) == 1, losses
