"""Head-tail (zigzag) sharding of the sequence over the cp ranks.

The sequence is cut into ``2 cp`` chunks; rank r holds chunks r and 2cp-1-r. Under causal
attention chunk i attends to i+1 chunks' worth of keys, so every rank gets
(r + 1) + (2cp - r) = 2cp + 1 chunk-pairs of work: balanced, where a plain split would give
the last rank 2cp - 1 times the first's (Striped/zigzag attention; Brandon et al. 2023,
Zhu "ring-flash-attention").

The positions a rank holds are what RoPE must see: ``ParallelModel`` passes them to the
model as its ``position_ids`` forward argument.

Packed documents break that balance: a token's causal work is its position inside its own
document, unrelated to where the document lies in the sequence, so the 2cp chunks carry
whatever documents fall in them (measured max/mean rank work over 20 random packings of
documents of mean 2K: 1.05 at 64K tokens over cp 2, 1.16 over cp 4, 1.16 at 128K over cp 8).
:func:`document_zigzag_indices` applies the zigzag to each document instead: every
document is cut into 2cp pieces and rank r holds pieces r and 2cp-1-r of each, so each
document's work is balanced on its own. The few tokens left over when a length is not a
multiple of 2cp (at each document's end) are zigzagged as one list, which gives every rank
the same number of tokens. A rank's tokens stay in sequence order, but those of other
ranks interleave with them, so the ring masks by (document, global position) instead of
halving its steps (``ring.py``).
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


def document_zigzag_indices(document_ids: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Sequence positions held by ``rank``, per batch row (b, s/cp), sorted: the zigzag of
    each document's pieces (module docstring). ``document_ids`` (b, s) non-decreasing."""
    b, s = document_ids.shape
    if s % (2 * cp):
        zigzag_indices(s, cp, rank)  # (the same error)
    n = 2 * cp
    idx = torch.arange(s, device=document_ids.device).expand(b, s)
    start = torch.ones_like(document_ids, dtype=torch.bool)
    start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(1).values  # (b, s) its document's start
    # each token's document length: the distance from its document's start to the next one
    nxt = torch.where(start, idx, torch.full_like(idx, s)).flip(1).cummin(1).values.flip(1)  # next start >= i
    after = torch.cat([nxt[:, 1:], torch.full_like(nxt[:, :1], s)], 1)  # the next start > i
    length = after - first
    offset = idx - first
    piece_len = length // n  # (b, s)
    in_piece = offset < piece_len * n
    piece = torch.where(in_piece, offset // piece_len.clamp_min(1), torch.zeros_like(offset))
    owner = torch.where(piece < cp, piece, n - 1 - piece)
    # the leftovers (each document's last length mod 2cp tokens), zigzagged as one list per row
    rest = ~in_piece
    rest_rank = rest.long().cumsum(1) - 1  # (b, s) index among the row's leftovers
    n_rest = rest.sum(1, keepdim=True)  # (b, 1): a multiple of 2cp, since s and the pieces are
    chunk = torch.where(rest, rest_rank * n // n_rest.clamp_min(1), torch.zeros_like(rest_rank))
    owner = torch.where(rest, torch.where(chunk < cp, chunk, n - 1 - chunk), owner)
    # every row gives each rank s/cp tokens: a stable sort puts this rank's first, in sequence
    # order (boolean indexing would do the same with a host-device sync, once a step on a GPU)
    mine_first = torch.sort((owner != rank).to(torch.uint8), dim=1, stable=True).indices
    return mine_first[:, :s // cp]
