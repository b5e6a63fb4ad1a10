"""Packed documents: the document ids of each training window, for attention masked at
document boundaries (``[data] reset_attention_mask``, Megatron's ``--reset-attention-mask``).

A token file is documents laid end to end; a window of ``seq_len`` tokens cuts through
them. With document masking a token attends only to earlier tokens of its own document
(Llama 3's pre-training; ``document_attention.py``). Where documents start comes from:

- an end-of-document token, ``[data] eod_token_id`` (``--eod-token-id``): the token after
  each EOD starts a new document (the EOD ends its own document, so the model learns to
  emit it); this works for the synthetic stream too;
- or an explicit boundary file, ``[data] document_starts`` (``--document-starts PATH``): a
  flat array of int64 token offsets into the token file, in native byte order, strictly
  increasing, each the first token of a document (offset 0 need not be listed), for data
  without a separator token.

Ids are relative to the window (its first token is in document 0) and never decrease
along it, which is all the attention needs. Labels are unchanged: the last token of a
document is still trained to predict the next token of the stream, as Megatron does
without ``--eod-mask-loss``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch


def ids_after_separator(input_ids: torch.Tensor, eod_token_id: int) -> torch.Tensor:
    """(b, L) int32 document ids: a new document starts after each ``eod_token_id``."""
    starts = torch.zeros(input_ids.shape, dtype=torch.int32)
    starts[:, 1:] = (input_ids[:, :-1] == eod_token_id).to(torch.int32)
    return starts.cumsum(1, dtype=torch.int32)


class DocumentStarts:
    """The explicit boundary file: document start offsets into the token file."""

    def __init__(self, path: str | Path, n_tokens: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"document starts file {str(self.path)!r} does not exist: point [data] "
                                    f"document_starts (--document-starts) at a flat int64 file of document start "
                                    f"offsets (write_document_starts), or use [data] eod_token_id instead")
        size = self.path.stat().st_size
        if size % 8:
            raise ValueError(f"{self.path} has {size} bytes, not a multiple of 8: document starts are int64 offsets")
        self.starts = torch.from_file(str(self.path), shared=False, size=size // 8, dtype=torch.int64)
        if self.starts.numel() > 1 and bool((self.starts[1:] <= self.starts[:-1]).any()):
            at = int((self.starts[1:] <= self.starts[:-1]).nonzero()[0]) + 1
            raise ValueError(f"{self.path}: document starts must strictly increase; entry {at} "
                             f"({int(self.starts[at])}) is not after entry {at - 1} ({int(self.starts[at - 1])})")
        if self.starts.numel() and (int(self.starts[0]) < 0
                                    or (n_tokens is not None and int(self.starts[-1]) >= n_tokens)):
            raise ValueError(f"{self.path}: document starts must lie in [0, {n_tokens}) (the token file's "
                             f"length); found {int(self.starts[0])} .. {int(self.starts[-1])}")

    def ids(self, offsets: torch.Tensor, seq_len: int) -> torch.Tensor:
        """(b, seq_len) int32 ids of the windows whose first tokens are at ``offsets`` (b,)."""
        positions = offsets[:, None] + torch.arange(seq_len)  # (b, L) file offsets of the inputs
        doc = torch.searchsorted(self.starts, positions, right=True)  # documents started at or before
        return (doc - doc[:, :1]).to(torch.int32)


def write_document_starts(path: str | Path, starts) -> Path:
    """Write the boundary file ``DocumentStarts`` reads."""
    data = torch.as_tensor(starts, dtype=torch.int64).flatten().contiguous()
    path = Path(path)
    path.write_bytes(ctypes.string_at(data.data_ptr(), data.nbytes))
    return path


class DocumentMasking:
    """The document ids of a data source's batches (``None`` from :meth:`ids`: no masking)."""

    def __init__(self, *, eod_token_id: int | None, starts: DocumentStarts | None):
        self.eod_token_id, self.starts = eod_token_id, starts

    def ids(self, input_ids: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
        if self.starts is not None:
            if offsets is None:
                raise ValueError("[data] document_starts needs a token file (the synthetic stream has no offsets): "
                                 "use [data] eod_token_id, or give [data] path")
            return self.starts.ids(offsets, input_ids.shape[1])
        return ids_after_separator(input_ids, self.eod_token_id)


def build_document_masking(data_cfg, source) -> DocumentMasking | None:
    """From ``[data]`` (None without ``reset_attention_mask``); ``source``: the batch source
    (a token file's length bounds the start offsets)."""
    if not data_cfg.reset_attention_mask:
        return None
    starts = None
    if data_cfg.document_starts is not None:
        tokens = getattr(source, "tokens", None)
        starts = DocumentStarts(data_cfg.document_starts, None if tokens is None else tokens.numel())
    return DocumentMasking(eod_token_id=data_cfg.eod_token_id, starts=starts)
