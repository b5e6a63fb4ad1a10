"""Layout-independent parameter initialization.

Random init of a sharded DTensor on a CPU mesh draws every shard from the same RNG state
(torch 2.13: all four shards of a TP2 x FSDP2 weight came out identical), and the CUDA
path depends on DTensor's RNG tracker. Instead, every parameter is drawn here as a full
tensor from its own generator, seeded by ``(seed, parameter name)``, and each rank keeps
its slice (``distribute_tensor(..., src_data_rank=None)`` slices locally, no collective).
So one seed gives bit-identical weights in *every* layout (one device, TP, FSDP, any mix),
which makes loss curves comparable across layouts and is what resharding tests need.

Cost: each rank briefly holds one full parameter (the largest: Llama 3 405B's embedding,
2.1 G elements, 8.4 GB in fp32, on the GPU for well under a second).
"""

from __future__ import annotations

import zlib
from typing import Callable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def init_param_(param: torch.Tensor, name: str, seed: int,
                fill: Callable[[torch.Tensor, torch.Generator], None]) -> None:
    """Fill ``param`` (plain or DTensor) with ``fill(full_tensor, generator)``'s values."""
    device = param.device
    gen = torch.Generator(device=device).manual_seed(param_seed(seed, name))
    full = torch.empty(param.shape, dtype=param.dtype, device=device)
    fill(full, gen)
    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


def normal_(param: torch.Tensor, name: str, seed: int, std: float) -> None:
    init_param_(param, name, seed, lambda t, g: t.normal_(0.0, std, generator=g))
