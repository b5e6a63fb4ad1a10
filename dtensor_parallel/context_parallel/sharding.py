"""Head-tail (zigzag) sharding of the sequence over the cp ranks.

The sequence is cut into ``2 cp`` chunks; rank r holds chunks r and 2cp-1-r. Under causal
attention chunk i attends to i+1 chunks' worth of keys, so every rank gets
(r + 1) + (2cp - r) = 2cp + 1 chunk-pairs of work: balanced, where a plain split would give
the last rank 2cp - 1 times the first's (Striped/zigzag attention; Brandon et al. 2023,
Zhu "ring-flash-attention").

The positions a rank holds are what RoPE must see: ``ParallelModel`` passes them to the
model as its ``position_ids`` forward argument.
"""

from __future__ import annotations

import torch


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
