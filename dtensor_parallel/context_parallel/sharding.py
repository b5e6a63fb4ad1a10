"""Head-tail (zigzag) sharding of the sequence over the cp ranks.

The sequence is cut into ``2 cp`` chunks; rank r holds chunks r and 2cp-1-r. Under causal
attention chunk i attends to i+1 chunks' worth of keys, so every rank gets
(r + 1) + (2cp - r) = 2cp + 1 chunk-pairs of work: balanced, where a plain split would give
the last rank 2cp - 1 times the first's (Striped/zigzag attention; Brandon et al. 2023,
Zhu "ring-flash-attention").

The positions a rank holds are what RoPE must see: :func:`local_positions` returns them
inside a :func:`~dtensor_parallel.context_parallel.context_parallel_region` and
``arange(s)`` outside, so a model reads positions the same way in every layout.
"""

from __future__ import annotations

import torch


class RegionState:
    """The active context-parallel region (set by ``context_parallel_region``): the ring's
    ``(group, backend)`` and this rank's token positions. Plain class attributes, not
    ContextVars: autograd runs CUDA backward, and so the blocks that recompute rematerializes,
    on its own device thread, which does not see a ContextVar set by the training thread; and
    torch.compile cannot trace ``ContextVar.get`` (the graph break dropped every block inside
    a recompute region back to eager)."""

    ring: tuple | None = None
    positions: torch.Tensor | None = None


def zigzag_indices(seq_len: int, cp: int, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Sequence positions held by ``rank``: chunk ``rank`` then chunk ``2cp-1-rank``."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x cp = {2 * cp}, which "
                         f"zigzag context parallelism cuts it into: pad or cut the sequence to a "
                         f"multiple of {2 * cp}")
    c = seq_len // (2 * cp)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([first, second])


def local_positions(seq_len_local: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The global positions of this rank's tokens (``arange`` without context parallel)."""
    pos = RegionState.positions
    if pos is None:
        return torch.arange(seq_len_local, device=device)
    if pos.numel() != seq_len_local:
        raise ValueError(f"context parallel region holds {pos.numel()} positions, the model sees a "
                         f"sequence of {seq_len_local}")
    return pos.to(device)


def set_region(ring: tuple | None, positions: torch.Tensor | None) -> tuple:
    """Enter a region; returns what :func:`reset_region` restores (regions nest)."""
    previous = (RegionState.ring, RegionState.positions)
    RegionState.ring, RegionState.positions = ring, positions
    return previous


def reset_region(previous: tuple) -> None:
    RegionState.ring, RegionState.positions = previous
