"""Batches for the train loop: a flat token file, or a learnable synthetic stream.

Both sources are *stateless*: ``batch(step)`` is a pure function of (seed, step, dp rank),
so a run resumes from any step index by asking for that step, and every data-parallel rank
computes its own rows without communication. Ranks of one tp (or cp) group share a dp rank
and so get the same rows, as ``ParallelModel.forward_backward`` expects.

Global batch of step ``s``: ``G = global_batch_size`` sequences; dp rank ``r`` of ``dp``
takes rows ``[r G/dp, (r+1) G/dp)``, so the ranks' rows are disjoint.

Token files. ``PATH`` is a flat array of token ids in native byte order (uint16 or uint32,
no header: ``numpy.memmap`` reads it too) and ``PATH.json`` beside it states what it holds::

    {"format": "dtensor-parallel tokens", "version": 1, "dtype": "uint32",
     "n_tokens": 1048576, "max_id": 128000}

:func:`write_token_file` and ``dtensor-parallel tokens PATH --dtype D`` (for a file another
tool wrote; it scans every id) write it. Reading (:func:`resolve_token_dtype`): the stated
dtype wins, ``[data] dtype`` (``--data-dtype``) must agree with it, and ``n_tokens`` must match
the file's size. A file without a statement is read only when one dtype alone makes sense
of it (its size and ids below the vocabulary): a uint32 file of a small vocabulary also
reads as valid uint16 ids interleaved with zeros, so such an *ambiguous* file is an error.
"""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path
from typing import Protocol

import torch

# Token files are read with torch alone (a private memory map through ``torch.from_file``):
# torch's uint16/uint32 tensors support slicing, stacking and ``.to(torch.int64)``, which
# is all the reader needs, so numpy is not a dependency.
TOKEN_DTYPES: dict[str, torch.dtype] = {"uint16": torch.uint16, "uint32": torch.uint32}
VOCAB_SCAN_TOKENS = 1 << 24  # tokens checked against vocab_size up front (every batch is checked too)
SCAN_CHUNK = 1 << 22
TOKEN_FORMAT, TOKEN_FORMAT_VERSION = "dtensor-parallel tokens", 1


# ---- token files: the dtype statement --------------------------------------------------------
def statement_path(path: str | Path) -> Path:
    """``PATH.json``: the statement beside a token file."""
    return Path(f"{path}.json")


def read_statement(path: str | Path) -> dict | None:
    """The statement of the token file at ``path`` (None: there is none); checked."""
    side = statement_path(path)
    if not side.is_file():
        return None
    fix = f"rewrite it with: dtensor-parallel tokens {path} --dtype uint16|uint32"
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{side} is not a readable token-file statement ({e}): {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != TOKEN_FORMAT or meta.get("dtype") not in TOKEN_DTYPES:
        raise ValueError(f"{side} is not a token-file statement (it needs format={TOKEN_FORMAT!r} and dtype "
                         f"one of {list(TOKEN_DTYPES)}): {fix}")
    return meta


def _scan(tokens: torch.Tensor, limit: int, start: int = 0):
    """(offset, int64 chunk) over ``tokens[start:limit]``."""
    for off in range(start, min(limit, tokens.numel()), SCAN_CHUNK):
        yield off, tokens[off:min(off + SCAN_CHUNK, limit)].to(torch.int64)  # (unsigned: no reductions)


def first_id_at_least(tokens: torch.Tensor, bound: int, limit: int | None = None) -> tuple[int, int] | None:
    """(position, id) of the first token id >= ``bound`` in ``tokens[:limit]``, or None."""
    for off, ids in _scan(tokens, tokens.numel() if limit is None else limit):
        bad = (ids >= bound).nonzero()
        if bad.numel():
            pos = int(bad[0])
            return off + pos, int(ids[pos])
    return None


def map_tokens(path: str | Path, dtype: str) -> torch.Tensor:
    """The file's ids as a private memory map (pages load on first touch; never written)."""
    size, itemsize = Path(path).stat().st_size, TOKEN_DTYPES[dtype].itemsize
    return torch.from_file(str(path), shared=False, size=size // itemsize, dtype=TOKEN_DTYPES[dtype])


def why_not(path: Path, dtype: str, vocab_size: int) -> str | None:
    """Why the file cannot be ``dtype`` token ids of a ``vocab_size`` vocabulary (its size, or
    an id among its first ``VOCAB_SCAN_TOKENS``), or None when it can."""
    size, itemsize = path.stat().st_size, TOKEN_DTYPES[dtype].itemsize
    if size % itemsize:
        return f"its {size} bytes are not a multiple of {itemsize}"
    hit = first_id_at_least(map_tokens(path, dtype), vocab_size, VOCAB_SCAN_TOKENS)
    return None if hit is None else f"read as {dtype}, token {hit[0]} is id {hit[1]} >= vocab_size {vocab_size}"


def resolve_token_dtype(path: str | Path, dtype: str | None, vocab_size: int) -> str:
    """The dtype of the token file at ``path``: its statement's (``[data] dtype``, when set, must
    agree), else the one dtype that makes sense of an unstated file; an ambiguous file, a
    mismatch or a file changed since its statement is a ``ValueError`` that names the fix."""
    path = Path(path)
    side, meta = statement_path(path), read_statement(path)
    fix = f"dtensor-parallel tokens {path} --dtype uint16|uint32 (it checks the ids and writes {side.name})"
    if meta is not None:
        stated, size = meta["dtype"], path.stat().st_size
        if dtype is not None and dtype != stated:
            raise ValueError(f"[data] dtype={dtype!r} (--data-dtype) but {side} states {stated!r}: drop [data] dtype "
                             f"(the file states it) or set it to {stated!r}")
        n = meta.get("n_tokens")
        if isinstance(n, int) and n * TOKEN_DTYPES[stated].itemsize != size:
            raise ValueError(f"{path} has {size} bytes but {side} states {n} {stated} tokens "
                             f"({n * TOKEN_DTYPES[stated].itemsize} bytes): the file changed after its statement "
                             f"was written (cut short, or appended to): rewrite the statement with {fix}")
        return stated
    reasons = {d: why_not(path, d, vocab_size) for d in TOKEN_DTYPES}
    fits = [d for d, r in reasons.items() if r is None]
    if len(fits) > 1:
        raise ValueError(f"{path} does not state its dtype (no {side.name} beside it) and reads as valid token ids "
                         f"both as {' and as '.join(fits)} (a uint32 file read as uint16 gives its ids interleaved "
                         f"with zeros): state it with {fix}")
    if dtype is not None and reasons[dtype] is not None:
        other = f"; it does read as {fits[0]} ids" if fits else ""
        raise ValueError(f"[data] dtype={dtype!r} but {path} is not a {dtype} file of vocab {vocab_size}: "
                         f"{reasons[dtype]}{other}: give the dtype it was written with, and state it with {fix}")
    if not fits:
        raise ValueError(f"{path} is no token file of vocab_size {vocab_size} in any dtype: "
                         + "; ".join(f"{r}" for r in reasons.values())
                         + ": set [model] vocab_size (--vocab-size) to the tokenizer's vocabulary")
    return fits[0]


def write_statement(path: str | Path, dtype: str, vocab_size: int | None = None) -> dict:
    """Scan every id of the token file at ``path`` read as ``dtype`` (below ``vocab_size``
    when given, the first id that is not named with its position) and write ``PATH.json``."""
    path = Path(path)
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {list(TOKEN_DTYPES)}")
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist")
    size, itemsize = path.stat().st_size, TOKEN_DTYPES[dtype].itemsize
    if size % itemsize:
        raise ValueError(f"{path} has {size} bytes, not a multiple of {itemsize}: it is not a {dtype} file")
    tokens = map_tokens(path, dtype)
    if vocab_size is not None:
        hit = first_id_at_least(tokens, vocab_size)
        if hit is not None:
            raise ValueError(f"{path}: token {hit[0]} is id {hit[1]} >= vocab_size {vocab_size}: not a {dtype} file "
                             f"of this vocabulary")
    top = max((int(ids.max()) for _, ids in _scan(tokens, tokens.numel())), default=-1)
    meta = {"format": TOKEN_FORMAT, "version": TOKEN_FORMAT_VERSION, "dtype": dtype,
            "n_tokens": tokens.numel(), "max_id": top}
    statement_path(path).write_text(json.dumps(meta) + "\n")
    return meta


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

    def __init__(self, path: str | Path, *, dtype: str | None, seq_len: int, vocab_size: int,
                 global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"token file {str(self.path)!r} does not exist: point [data] path (--data-path) at "
                f"a flat {'/'.join(TOKEN_DTYPES)} file of token ids (e.g. written with "
                f"dtensor_parallel.trainer.data.write_token_file(path, ids)), or use synthetic data with "
                f"[data] mock = true (--mock-data)")
        if dtype is not None and dtype not in TOKEN_DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {list(TOKEN_DTYPES)}")
        self.dtype = dtype = resolve_token_dtype(self.path, dtype, vocab_size)
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
        self.tokens = map_tokens(self.path, dtype)
        self.steps_per_epoch = self.n_windows // global_batch_size
        self._perm: tuple[int, torch.Tensor] | None = None
        meta = read_statement(self.path)
        # the statement's max_id covers the whole file; without it, the first VOCAB_SCAN_TOKENS
        # (and each batch as it is read)
        whole = meta is not None and isinstance(meta.get("max_id"), int) and meta["max_id"] >= vocab_size
        hit = first_id_at_least(self.tokens, vocab_size, None if whole else VOCAB_SCAN_TOKENS)
        if hit is not None:
            self._bad_id(*hit)

    def _bad_id(self, position: int, token_id: int) -> None:
        raise ValueError(
            f"{self.path}: token {position} of the file is id {token_id} >= vocab_size "
            f"{self.vocab_size}: set [model] vocab_size (--vocab-size) to the tokenizer's "
            f"vocabulary, or check the file's dtype (a uint32 file read as uint16, or the reverse, "
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

    def window_offsets(self, step: int) -> torch.Tensor:
        """(b,) file offsets of the first tokens of this rank's windows of ``step``."""
        return self.window_indices(step)[self.rows] * self.seq_len

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.seq_len
        idx = self.window_indices(step)[self.rows].tolist()
        w = torch.stack([self.tokens[i * L:i * L + L + 1] for i in idx]).to(torch.int64)  # (b, L+1)
        bad = (w >= self.vocab_size).nonzero()  # (n, 2): row, column
        if bad.numel():
            r, c = bad[0].tolist()
            self._bad_id(idx[r] * L + c, int(w[r, c]))  # its position in the file
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


def build_batch_source(*, path: str | None, dtype: str | None, mock: bool, seq_len: int, vocab_size: int,
                       global_batch_size: int, dp_rank: int, dp_size: int, seed: int) -> BatchSource:
    """The token file at ``path``, or the Markov stream when ``mock`` or no path."""
    common = dict(seq_len=seq_len, vocab_size=vocab_size, global_batch_size=global_batch_size,
                  dp_rank=dp_rank, dp_size=dp_size, seed=seed)
    if mock or path is None:
        return MarkovTokenStream(**common)
    return TokenFileDataset(path, dtype=dtype, **common)


def window_offsets(source: BatchSource, step: int) -> torch.Tensor | None:
    """File offsets of this rank's windows of ``step`` (None: a source without a file)."""
    offsets = getattr(source, "window_offsets", None)
    return None if offsets is None else offsets(step)


def uniform_loss(vocab_size: int) -> float:
    """ln(V): the loss of a model that has learned nothing."""
    return math.log(vocab_size)


def write_token_file(path: str | Path, ids: torch.Tensor, dtype: str = "uint16") -> Path:
    """Write token ids as the flat file ``TokenFileDataset`` reads (native byte order), and
    its statement ``PATH.json`` (the module docstring)."""
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {list(TOKEN_DTYPES)}")
    ids = torch.as_tensor(ids).flatten().to(torch.int64)
    top = (1 << (8 * TOKEN_DTYPES[dtype].itemsize)) - 1
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > top):
        raise ValueError(f"token ids must lie in [0, {top}] for dtype={dtype!r}: use uint32 for larger vocabularies")
    data = ids.to(TOKEN_DTYPES[dtype]).contiguous()
    path = Path(path)
    path.write_bytes(ctypes.string_at(data.data_ptr(), data.nbytes))
    meta = {"format": TOKEN_FORMAT, "version": TOKEN_FORMAT_VERSION, "dtype": dtype, "n_tokens": ids.numel(),
            "max_id": int(ids.max()) if ids.numel() else -1}
    statement_path(path).write_text(json.dumps(meta) + "\n")
    return path
