"""torch.compile per block keeps exact parity, with TP+SP, recompute and FSDP around it, and
really compiles: no graph break sends a block back to eager."""

from __future__ import annotations

import threading

import pytest
import torch

from .harness import run_distributed
from .parity import one_step_parity


def _parity_and_dynamo_stats(kind: str, mesh_kwargs: dict, plan_kwargs: dict) -> tuple[float, int, int]:
    from torch._dynamo.utils import counters

    counters.clear()
    loss = one_step_parity(kind, mesh_kwargs, {"compile": True, **plan_kwargs})
    return loss, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@pytest.mark.parametrize("kind,mesh_kwargs,plan_kwargs", [
    ("llama", {"tp": 2}, {"sequence_parallel": True, "recompute": "selective"}),
    ("toy", {"dp_shard": 2}, {"recompute": "full"}),
])
def test_compiled_blocks_parity(kind: str, mesh_kwargs: dict, plan_kwargs: dict) -> None:
    # each rank asserts loss and gradients against one device; the ranks also agree
    results = run_distributed(2, _parity_and_dynamo_stats, kind, mesh_kwargs, plan_kwargs)
    assert len({loss for loss, _, _ in results}) == 1, results
    for _, graphs, breaks in results:
        # a graph break inside a checkpointed block (it once was ContextVar.get in the RoPE
        # positions) makes dynamo run the whole block eagerly: 0 graphs, parity intact
        assert graphs >= 1 and breaks == 0, f"{graphs} graphs compiled, {breaks} graph breaks"


def test_context_parallel_region_is_seen_from_other_threads() -> None:
    """autograd runs CUDA backward (and the forward that recompute reruns in it) on its own
    device thread: the region's positions and ring must be visible there."""
    import torch.distributed as dist

    from dtensor_parallel.context_parallel import context_parallel_region, local_positions
    from dtensor_parallel.context_parallel.sharding import RegionState

    seen = {}

    def other_thread() -> None:
        seen["positions"] = local_positions(4)
        seen["ring"] = RegionState.ring

    pos = torch.tensor([0, 1, 6, 7])
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with context_parallel_region(dist.group.WORLD, pos):
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
    finally:
        dist.destroy_process_group()
    assert torch.equal(seen["positions"], pos) and seen["ring"] is not None
    assert RegionState.ring is None and torch.equal(local_positions(4), torch.arange(4))  # restored
