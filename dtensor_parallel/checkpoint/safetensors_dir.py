"""A folder of safetensors files as transformers writes it (``save_pretrained``): one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``, and
``config.json``. Every file's header is read and checked against the file's length before
any tensor is (a missing shard, a truncated file, an index naming a tensor its file lacks:
each a ``ValueError`` naming the file); a rank then reads only the box of each tensor it
owns (``safe_open(...).get_slice``), so no rank ever holds a whole checkpoint. Files are
opened one at a time (:func:`by_file`): the pages a box read maps stay resident while its
file is open, so a rank holding every file open kept a second, bf16 copy of its shard
(measured: ``benchmarks/hf_load_memory.py``).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _read_json(f: Path, what: str) -> dict:
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {f} is unreadable ({type(e).__name__}: {e})") from None


def _safetensors_header(f: Path) -> dict[str, dict]:
    """The header of one safetensors file, checked against the file's length."""
    if not f.is_file():
        raise ValueError(f"safetensors file {f} is missing")
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"safetensors file {f} is truncated: {size} bytes, not even a header")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise ValueError(f"safetensors file {f} is truncated: {size} bytes, header says {8 + n}")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise ValueError(f"safetensors file {f} has a corrupt header ({e})") from None
    header.pop("__metadata__", None)
    if header:
        name, entry = max(header.items(), key=lambda kv: kv[1]["data_offsets"][1])  # the file's last tensor
        end = 8 + n + entry["data_offsets"][1]
        if end > size:
            raise ValueError(f"safetensors file {f} is truncated: {size} bytes, but tensor {name!r} is "
                             f"stored up to byte {end}")
    return header


class HFCheckpoint:
    """The tensors of a Hugging Face checkpoint directory: name -> (file, shape, dtype),
    every file's header read and checked (nothing else is read)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"Hugging Face checkpoint directory {self.path} does not exist")
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map' table of tensor -> file")
        elif (self.path / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.path} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        self.entries: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        for fname in files:
            f = self.path / fname
            if not f.is_file():
                needs = sorted(k for k, v in weight_map.items() if v == fname) if weight_map else []
                raise ValueError(f"safetensors shard {f} is missing (the index lists it for {len(needs)} "
                                 f"tensors, e.g. {needs[:2]})")
            for name, entry in _safetensors_header(f).items():
                self.entries[name] = (f, tuple(entry["shape"]), entry["dtype"])
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in self.entries or self.entries[name][0].name != fname:
                    raise ValueError(f"tensor {name!r} is listed in {index} under {fname} but that file "
                                     f"does not hold it")
        cfg = self.path / CONFIG_FILE
        self.config = _read_json(cfg, "config") if cfg.is_file() else None

    def file_of(self, key: str, shape: tuple[int, ...], what: str) -> Path:
        """The file holding tensor ``key``, checked to have ``shape`` and a dtype we read;
        ``what`` names the model's tensor in the error."""
        f, saved, dtype = self.entries[key]
        if saved != tuple(shape):
            raise ValueError(f"tensor {key!r} has shape {list(saved)} in {f} but {what} has {list(shape)}: "
                             f"the checkpoint is of another model shape")
        if dtype not in DTYPES:
            raise ValueError(f"tensor {key!r} in {f} has dtype {dtype}, which is not read")
        return f


def local_box(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of this rank's shard in the global tensor."""
    if isinstance(t, DTensor):
        chunks = t.__create_chunk_list__()
        if len(chunks) != 1:
            raise NotImplementedError(f"a DTensor with {len(chunks)} local chunks")
        box = tuple(chunks[0].offsets), tuple(chunks[0].sizes)
        if box[1] != tuple(t.to_local().shape):
            raise NotImplementedError(f"placements {t.placements}: local shape {tuple(t.to_local().shape)} "
                                      f"is not the box {box[1]}")
        return box
    return (0,) * t.dim(), tuple(t.shape)




def by_file(items: Iterable[Any], file_of) -> Iterator[tuple[Any, Any]]:
    """``(safe_open handle, item)`` for every item, grouped by ``file_of(item)``, each file
    open only while its items are read."""
    ordered = sorted(items, key=lambda item: str(file_of(item)))
    for f, group in itertools.groupby(ordered, key=file_of):
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for item in group:
                yield handle, item
