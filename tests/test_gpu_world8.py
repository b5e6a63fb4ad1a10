"""The one-node matrix of tests/test_world8.py on 8 GPUs through NCCL (``pytest -m gpu``;
needs 8 CUDA devices; issue 11)."""

from __future__ import annotations

import pytest
import torch

from .harness import run_distributed
from .parity import one_step_parity
from .test_world8 import WORLD8_LAYOUTS

GPU8_LAYOUTS = {**WORLD8_LAYOUTS, "cp8_triton": ("llama", {"cp": 8}, {"kernels": {"attention": "triton"}})}

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 8, reason="needs 8 CUDA GPUs"),
]


@pytest.mark.parametrize("layout", list(GPU8_LAYOUTS))
def test_gpu8_one_step_parity(layout: str) -> None:
    kind, mesh_kwargs, plan_kwargs = GPU8_LAYOUTS[layout]
    losses = run_distributed(8, one_step_parity, kind, mesh_kwargs, plan_kwargs, batch=8, seq=32, backend="nccl")
    assert len(set(losses)) == 1, losses
