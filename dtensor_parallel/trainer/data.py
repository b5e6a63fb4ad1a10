"""Batches for the train loop: a flat token file, or a learnable synthetic stream.

Both sources are *stateless*: ``batch(step)`` is a pure function of (seed, step, dp rank),
so a run resumes from any step index by asking for that step, and every data-parallel rank
computes its own rows without communication. Ranks of one tp (or cp) group share a dp rank
and so get the same rows, as ``ParallelModel.forward_backward`` expects.

Global batch of step ``s``: ``G = global_batch_size`` sequences; dp rank ``r`` of ``dp``
takes rows ``[r G/dp, (r+1) G/dp)``, so the ranks' rows are disjoint.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path
from typing import Protocol

import torch

# Token files are read with torch alone (a private memory map through ``torch.from_file``):
# torch's uint16/uint32 tensors support slicing, stacking and ``.to(torch.int64)``, which
# is all the reader needs, so numpy is not a dependency.
TOKEN_DTYPES: dict[str, torch.dtype] = {"uint16": torch.uint16, "uint32": torch.uint32}
VOCAB_SCAN_TOKENS = 1 << 24  # tokens checked against vocab_size up front (every batch is checked too)


class BatchSource(Protocol):
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), each (global_batch / dp, seq_len) int64."""
        ...


def _rows(global_batch: int, dp_rank: int, dp_size: int) -> slice:
    if global_batch % dp_size:
        raise ValueError(f"global batch {global_batch} is not divisible by dp={dp_size}: make the "
                         f"global batch size a multiple of the data-parallel degree")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} not in [0, {dp_size})")
    b = global_batch // dp_size
    return slice(dp_rank * b, (dp_rank + 1) * b)


class TokenFileDataset:
    """Windows of ``seq_len + 1`` tokens from a flat file of token ids, memory-mapped.

    Window ``i`` is ``tokens[i L : i L + L + 1]`` (``L = seq_len``; consecutive windows
    share one token, so every token is a label once): input ``w[:-1]``, label ``w[1:]``.
    There are ``W = (n_tokens - 1) // L`` windows. Epoch ``e`` visits them in the order
    of a permutation seeded by ``(seed, e)``, ``G`` at a time; ``W // G`` steps make an
    epoch (the last ``W mod G`` windows of each permutation are skipped), so the windows
    of one step, and of one epoch, are all different.
    """

    def __init__(self, path: str | Path, *, dtype: str, seq_len: int, vocab_size: int,
                 global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"token file {str(self.path)!r} does not exist: point [data] path (--data-path) at "
                f"a flat {'/'.join(TOKEN_DTYPES)} file of token ids (e.g. written with "
                f"dtensor_parallel.trainer.data.write_token_file(path, ids)), or use synthetic data with "
                f"[data] mock = true (--mock-data)")
        if dtype not in TOKEN_DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {list(TOKEN_DTYPES)}")
        itemsize = TOKEN_DTYPES[dtype].itemsize
        size = self.path.stat().st_size
        if size % itemsize:
            raise ValueError(
                f"{self.path} has {size} bytes, not a multiple of {itemsize} ({dtype}): the file "
                f"was written with another dtype; set [data] dtype to the one it was written with")
        self.seq_len, self.vocab_size, self.global_batch, self.seed = seq_len, vocab_size, global_batch_size, seed
        self.rows = _rows(global_batch_size, dp_rank, dp_size)
        n_tokens = size // itemsize
        self.n_windows = max(n_tokens - 1, 0) // seq_len
        if self.n_windows < global_batch_size:
            raise ValueError(
                f"{self.path} is too small: {n_tokens} tokens make {self.n_windows} windows of "
                f"seq_len+1={seq_len + 1} tokens, but one step needs global_batch_size="
                f"{global_batch_size} distinct windows ({global_batch_size * seq_len + 1} tokens): "
                f"give a larger token file, or lower --seq-length / --global-batch-size")
        # shared=False maps the file privately (pages load on first touch; the file is never written)
        self.tokens = torch.from_file(str(self.path), shared=False, size=n_tokens, dtype=TOKEN_DTYPES[dtype])
        self.steps_per_epoch = self.n_windows // global_batch_size
        self._perm: tuple[int, torch.Tensor] | None = None
        for start in range(0, min(n_tokens, VOCAB_SCAN_TOKENS), 1 << 22):
            self._check_vocab(self.tokens[start:start + (1 << 22)], offset=start)

    def _check_vocab(self, ids: torch.Tensor, offset: int = 0) -> None:
        ids = ids.to(torch.int64)  # unsigned 16/32-bit tensors have no reductions in torch
        top = int(ids.max()) if ids.numel() else 0
        if top >= self.vocab_size:
            pos = offset + int((ids.flatten() >= self.vocab_size).nonzero()[0])
            raise ValueError(
                f"{self.path}: token id {top} (first bad id at token {pos}) >= vocab_size "
                f"{self.vocab_size}: set [model] vocab_size (--vocab-size) to the tokenizer's "
                f"vocabulary, or check [data] dtype (a uint32 file read as uint16, or the reverse, "
                f"gives garbage ids)")

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n_windows, generator=g))
        return self._perm[1]

    def window_indices(self, step: int) -> torch.Tensor:
        """The ``G`` window indices of global step ``step`` (all ranks' rows)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[k * self.global_batch:(k + 1) * self.global_batch]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.seq_len
        idx = self.window_indices(step)[self.rows].tolist()
        w = torch.stack([self.tokens[i * L:i * L + L + 1] for i in idx]).to(torch.int64)  # (b, L+1)
        self._check_vocab(w)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class MarkovTokenStream:
    """Synthetic sequences from a fixed random first-order Markov chain (learnable data).

    Each token ``v`` has ``branching`` successors ``succ[v, j]``, drawn once from the seed,
    taken with probabilities ``p_j`` proportional to ``2^-j`` (shared by all tokens). The
    first token is uniform. The entropy rate is ``H = -sum_j p_j ln p_j`` (about 1.14 nats
    for 4 successors), so a model that learns the bigram table reaches a loss near
    ``H + ln(V) / seq_len``, far below the ``ln(V)`` of uniform guessing (7.6 for V=2048).

    ``batch(step)`` draws all ``G`` rows' random numbers from a generator seeded by
    ``(seed, step)`` and walks only this rank's rows, so rows are disjoint across dp ranks
    and identical for any dp layout.
    """

    def __init__(self, *, vocab_size: int, seq_len: int, global_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, branching: int = 4):
        if branching < 1 or vocab_size < 2:
            raise ValueError(f"need branching >= 1 and vocab_size >= 2, got {branching}, {vocab_size}")
        self.vocab_size, self.seq_len, self.global_batch, self.seed = vocab_size, seq_len, global_batch_size, seed
        self.rows = _rows(global_batch_size, dp_rank, dp_size)
        g = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(vocab_size, (vocab_size, branching), generator=g)  # (V, k)
        p = torch.tensor([2.0 ** -j for j in range(branching)], dtype=torch.float64)
        self.probs = p / p.sum()
        self.cum_probs = self.probs.cumsum(0).float()
        self.cum_probs[-1] = 1.0 + 1e-6  # u < 1 always lands in a bucket

    @property
    def entropy_rate(self) -> float:
        """Nats per token of the chain: the floor a perfect model's loss approaches."""
        return float(-(self.probs * self.probs.log()).sum())

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 1)
        G, L = self.global_batch, self.seq_len
        start = torch.randint(self.vocab_size, (G,), generator=g)[self.rows]  # (b,)
        u = torch.rand(G, L, generator=g)[self.rows]  # (b, L)
        choice = torch.searchsorted(self.cum_probs, u, right=True)  # (b, L) successor slot
        tokens = torch.empty(start.shape[0], L + 1, dtype=torch.int64)
        tokens[:, 0] = start
        for t in range(L):
            tokens[:, t + 1] = self.successors[tokens[:, t], choice[:, t]]
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def build_batch_source(*, path: str | None, dtype: str, mock: bool, seq_len: int, vocab_size: int,
                       global_batch_size: int, dp_rank: int, dp_size: int, seed: int) -> BatchSource:
    """The token file at ``path``, or the Markov stream when ``mock`` or no path."""
    common = dict(seq_len=seq_len, vocab_size=vocab_size, global_batch_size=global_batch_size,
                  dp_rank=dp_rank, dp_size=dp_size, seed=seed)
    if mock or path is None:
        return MarkovTokenStream(**common)
    return TokenFileDataset(path, dtype=dtype, **common)


def uniform_loss(vocab_size: int) -> float:
    """ln(V): the loss of a model that has learned nothing."""
    return math.log(vocab_size)


def write_token_file(path: str | Path, ids: torch.Tensor, dtype: str = "uint16") -> Path:
    """Write token ids as the flat file ``TokenFileDataset`` reads (native byte order)."""
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {list(TOKEN_DTYPES)}")
    ids = torch.as_tensor(ids).flatten().to(torch.int64)
    top = (1 << (8 * TOKEN_DTYPES[dtype].itemsize)) - 1
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > top):
        raise ValueError(f"token ids must lie in [0, {top}] for dtype={dtype!r}: use uint32 for larger vocabularies")
    data = ids.to(TOKEN_DTYPES[dtype]).contiguous()
    path = Path(path)
    path.write_bytes(ctypes.string_at(data.data_ptr(), data.nbytes))
    return path
