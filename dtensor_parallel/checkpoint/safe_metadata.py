"""Reading DCP's ``.metadata`` without running code from the checkpoint.

``torch.distributed.checkpoint`` stores its index (every tensor's global shape, dtype, the
chunks each rank saved and where their bytes are) as a *pickle*, and its
``FileSystemReader.read_metadata`` reads it with ``pickle.load``: a crafted ``.metadata``
(a ``__reduce__`` that returns ``os.system``) runs its payload on every rank that loads it.
Here it is read by an unpickler whose ``find_class`` admits exactly the globals DCP's
metadata is made of, and refuses any other with an error naming it.

What a ``.metadata`` refers to (read from torch 2.13's and 2.11's source, identical in both:
``torch/distributed/checkpoint/metadata.py``, ``filesystem.py``, ``torch/serialization.py``;
and seen in the files our saves write):

- ``torch.distributed.checkpoint.metadata``: ``Metadata``, ``TensorStorageMetadata``,
  ``BytesStorageMetadata``, ``ChunkStorageMetadata``, ``TensorProperties`` (pickled through
  its ``__getstate__`` with the enum ``_MEM_FORMAT_ENCODING``), ``MetadataIndex`` (the keys
  of ``storage_data``), ``StorageMeta``;
- ``torch.distributed.checkpoint.filesystem._StorageInfo`` (``storage_data``'s values:
  file, offset, length); ``_StoragePrefix`` (a save plan's, admitted for completeness);
- ``torch.Size`` (shapes, offsets), the ``torch`` dtypes (``torch.float32`` ... pickled as
  globals), ``torch.serialization._get_layout`` (``torch.layout`` is pickled as a call of
  it with the layout's name: a dictionary look-up);
- ``pathlib.PosixPath`` / ``PurePosixPath`` / ``PureWindowsPath`` (``StorageMeta.checkpoint_id``
  is the save's directory as a ``Path``);
- ``collections.OrderedDict`` (a plain container). Lists, tuples, dicts, sets, strings,
  numbers, bytes, None and booleans are pickle opcodes, not globals: always admitted.

Every admitted callable builds plain data from its arguments (dataclasses, an enum, a
tuple subclass, a path, a name look-up), so whatever arguments a crafted file passes them,
unpickling runs no code of its choosing. DCP's own load goes through
:class:`SafeFileSystemReader`, so no path of ours unpickles a checkpoint unrestricted.
"""

from __future__ import annotations

import collections
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.serialization
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .atomic import DCP_META_FILE, CorruptCheckpointError

_METADATA_CLASSES = ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                     "TensorProperties", "_MEM_FORMAT_ENCODING", "MetadataIndex", "StorageMeta")


def _allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("torch.distributed.checkpoint.metadata", n): getattr(dcp_metadata, n) for n in _METADATA_CLASSES}
    allowed.update({("torch.distributed.checkpoint.filesystem", n): getattr(dcp_filesystem, n)
                    for n in ("_StorageInfo", "_StoragePrefix")})
    allowed.update({("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed.update({("pathlib", n): getattr(pathlib, n) for n in ("PosixPath", "PurePosixPath", "PureWindowsPath")})
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    return allowed


ALLOWED_GLOBALS = _allowed()


class UnsafeCheckpointError(CorruptCheckpointError):
    """A checkpoint file asks to import something outside the admitted list."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file, *, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(
                f"checkpoint metadata {self.source} refers to {module}.{name}, which is not one of the classes "
                f"torch.distributed.checkpoint's metadata is made of: refusing to unpickle it (a crafted "
                f".metadata can run code when unpickled); load a checkpoint from a source you trust")
        return found


def load_metadata(stream, source: str) -> Metadata:
    """Unpickle a DCP ``Metadata`` from ``stream`` with :class:`RestrictedUnpickler`."""
    md = RestrictedUnpickler(stream, source=source).load()
    if not isinstance(md, Metadata):
        raise CorruptCheckpointError(f"checkpoint metadata {source} holds a {type(md).__name__}, "
                                     f"not torch.distributed.checkpoint's Metadata")
    return md


def read_dcp_metadata(path: str | Path) -> Metadata:
    """``path/.metadata`` read safely; an unreadable or refused file is a
    :class:`CorruptCheckpointError` naming it."""
    f = Path(path) / DCP_META_FILE
    try:
        with open(f, "rb") as stream:
            return load_metadata(stream, str(f))
    except CorruptCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - unpickling a truncated file raises many kinds
        raise CorruptCheckpointError(f"checkpoint metadata {f} is unreadable ({type(e).__name__}: {e}): the "
                                     f"file is truncated or corrupt; load an earlier checkpoint") from None


class SafeFileSystemReader(FileSystemReader):
    """DCP's ``FileSystemReader`` with ``read_metadata`` through :class:`RestrictedUnpickler`
    (the data files are read by DCP with ``torch.load(weights_only=True)``, already restricted)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            md = load_metadata(stream, str(path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "SafeFileSystemReader", "UnsafeCheckpointError",
           "load_metadata", "read_dcp_metadata"]
