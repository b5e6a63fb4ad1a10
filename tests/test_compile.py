"""torch.compile per block keeps exact parity, with TP+SP, recompute and FSDP around it."""

from __future__ import annotations

import pytest

from .harness import run_distributed
from .parity import one_step_parity


@pytest.mark.parametrize("kind,mesh_kwargs,plan_kwargs", [
    ("llama", {"tp": 2}, {"sequence_parallel": True, "recompute": "selective"}),
    ("toy", {"dp_shard": 2}, {"recompute": "full"}),
])
def test_compiled_blocks_parity(kind: str, mesh_kwargs: dict, plan_kwargs: dict) -> None:
    # each rank asserts loss and gradients against one device; the ranks also agree
    losses = run_distributed(2, one_step_parity, kind, mesh_kwargs, {"compile": True, **plan_kwargs})
    assert len(set(losses)) == 1, losses
