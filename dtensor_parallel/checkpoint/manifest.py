"""Content hashes of every file of a checkpoint, written with it and checked before a load.

``DIR/step_N/manifest.json``::

    {"format": "dtensor_parallel.manifest/1", "algorithm": "sha256", "block_bytes": 16777216,
     "files": {"__0_0.distcp": {"size": 123, "blocks": ["<hex>", ...]},
               ".metadata": {...}, "checkpoint.json": {...}}}

Each file is hashed in blocks of ``block_bytes`` (a list of digests, one per block), each
block's digest the hash of its 1 MiB sub-blocks' digests (a two-level tree: the sub-blocks
of a buffer are hashed on several threads at once): a mismatch names the file, the byte
range and the tensors stored in it (from DCP's index), and both hashing and checking
split over threads (and, checking, ranks).

Who hashes what. Every rank hashes the data files *it* writes, while it writes them:
:class:`HashingWriter` is DCP's ``FileSystemWriter`` whose streams hash each buffer in a
few threads (:func:`hash_threads`: the rank's share of the host's cores) while the same
buffer is written to the file (both release the GIL), so the hash costs ``max(write,
hash / threads)`` rather than their sum; each rank leaves its digests in
``.manifest_rank<r>.json`` before DCP gathers its write results. DCP then runs ``finish``
on rank 0 alone, after every rank has written; there rank 0 writes ``.metadata``, hashes
it and ``checkpoint.json`` (the step, the schedule, the data position: a flipped bit in
it is caught too), merges the ranks' digests (checking that every data file DCP indexed
has them) and writes ``manifest.json`` (temporary name, fsync, rename). A save is
published only with its manifest (:func:`.atomic.rename_into_place`).

Checking (:func:`verify`, before any tensor is read): the manifest itself (JSON; a damaged
one fails to match, so the checkpoint is refused rather than trusted), ``checkpoint.json``
and ``.metadata`` on every rank (small; before ``.metadata`` is unpickled), every file's
size on every rank (missing and truncated files named), then the data blocks split over
the ranks (block ``i`` on rank ``i % world``, a few threads each) and the mismatches
gathered, so that every rank raises the same :class:`.atomic.CorruptCheckpointError`.
A checkpoint without a manifest (saved before manifests existed) loads with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from .atomic import DCP_META_FILE, MANIFEST_FILE, META_FILE, CorruptCheckpointError, _fsync_dir

FORMAT = "dtensor_parallel.manifest/2"
ALGORITHM = "sha256"  # hardware-accelerated (SHA-NI) on current x86 and ARM server CPUs
BLOCK_BYTES = 16 * 2 ** 20
SUB_BYTES = 2 ** 20  # a block's digest: the hash of its 1 MiB sub-blocks' digests (hashed in parallel)
_VERIFY_THREADS = 4
RANK_PART = ".manifest_rank{rank}.json"


def hash_threads() -> int:
    """Threads a rank hashes with: its share of the host's cores (``LOCAL_WORLD_SIZE`` ranks
    a host, as torchrun sets it), at most 8."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(8, (os.cpu_count() or 1) // max(local, 1)))


# ---- hashing ------------------------------------------------------------------------------
def _digest(data, algorithm: str = ALGORITHM) -> bytes:
    return hashlib.new(algorithm, data).digest()


class _BlockHasher:
    """Digests of consecutive ``block_bytes`` blocks of a byte stream fed in order. A block's
    digest is the hash of the concatenated digests of its ``SUB_BYTES`` sub-blocks (a
    two-level tree), so the sub-blocks of one buffer can be hashed on several threads at
    once (:meth:`update` with a pool) while the writer writes it."""

    def __init__(self, block_bytes: int = BLOCK_BYTES, algorithm: str = ALGORITHM):
        if block_bytes % SUB_BYTES:
            raise ValueError(f"block_bytes={block_bytes} is not a multiple of {SUB_BYTES}")
        self.block_bytes, self.algorithm, self.size = block_bytes, algorithm, 0
        self.subs: list = []  # every sub-block's digest (bytes) or its future, in order
        self._h = hashlib.new(algorithm)  # the partial sub-block at the end
        self._in_sub = 0

    def update(self, mv: memoryview, pool: ThreadPoolExecutor | None = None) -> list:
        """Feed ``mv``; with ``pool``, its whole sub-blocks are hashed there (returns their
        futures: wait for them before ``mv``'s memory is reused)."""
        futures = []
        self.size += len(mv)
        head = min(len(mv), (SUB_BYTES - self._in_sub) % SUB_BYTES) if self._in_sub else 0
        if head:  # complete the open sub-block
            self._h.update(mv[:head])
            self._in_sub += head
            mv = mv[head:]
            if self._in_sub == SUB_BYTES:
                self.subs.append(self._h.digest())
                self._h, self._in_sub = hashlib.new(self.algorithm), 0
        n_full = len(mv) // SUB_BYTES
        for i in range(n_full):
            sub = mv[i * SUB_BYTES:(i + 1) * SUB_BYTES]
            if pool is None:
                self.subs.append(_digest(sub, self.algorithm))
            else:
                futures.append(pool.submit(_digest, sub, self.algorithm))
                self.subs.append(futures[-1])
        tail = mv[n_full * SUB_BYTES:]
        if len(tail):
            self._h.update(tail)
            self._in_sub += len(tail)
        return futures

    def entry(self) -> dict[str, Any]:
        subs = [d if isinstance(d, bytes) else d.result() for d in self.subs]
        if self._in_sub or not subs:
            subs.append(self._h.digest())
        per_block = self.block_bytes // SUB_BYTES
        blocks = [hashlib.new(self.algorithm, b"".join(subs[i:i + per_block])).hexdigest()
                  for i in range(0, len(subs), per_block)]
        return {"size": self.size, "blocks": blocks}


def _bytes(b) -> memoryview:
    mv = memoryview(b)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def _hash_block(path: Path, index: int, block_bytes: int, algorithm: str = ALGORITHM) -> str:
    """The digest of block ``index`` of a file on disk (the tree of :class:`_BlockHasher`)."""
    with open(path, "rb") as f:
        f.seek(index * block_bytes)
        data = f.read(block_bytes)
    hasher = _BlockHasher(block_bytes, algorithm)
    hasher.update(memoryview(data))
    return hasher.entry()["blocks"][0]


def hash_file(path: str | Path, block_bytes: int = BLOCK_BYTES) -> dict[str, Any]:
    """``{"size", "blocks"}`` of a file on disk."""
    hasher = _BlockHasher(block_bytes)
    with open(path, "rb") as f:
        while chunk := f.read(4 * 2 ** 20):
            hasher.update(memoryview(chunk))
    return hasher.entry()


class _HashingStream:
    """A write-only file stream that hashes what goes through it: ``write`` hands the
    buffer's whole sub-blocks to ``pool``'s threads, writes the buffer meanwhile (both
    release the GIL) and returns once both are done (so the caller may reuse the buffer).
    Any ``seek`` makes the digests void: the file is then hashed from disk once closed."""

    def __init__(self, raw, pool: ThreadPoolExecutor):
        self.raw, self.pool, self.hasher, self.sought = raw, pool, _BlockHasher(), False

    def write(self, b) -> int:
        if self.sought:
            return self.raw.write(b)
        futures = self.hasher.update(_bytes(b), self.pool)
        n = self.raw.write(b)
        for f in futures:
            f.result()
        return n

    def seek(self, *args):
        self.sought = True
        return self.raw.seek(*args)

    def __getattr__(self, name: str):  # tell, flush, fileno, close, ...
        return getattr(self.raw, name)


class _HashingFileSystem(FileSystem):
    """DCP's ``FileSystem`` whose write streams hash; ``digests`` maps file names to entries."""

    def __init__(self):
        super().__init__()
        self.digests: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path, mode: str) -> Iterator[Any]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with ThreadPoolExecutor(hash_threads(), thread_name_prefix="checkpoint-hash") as pool:
            with super().create_stream(path, mode) as stream:
                hs = _HashingStream(stream, pool)
                yield hs
            entry = hash_file(path) if hs.sought else hs.hasher.entry()
        with self._lock:
            self.digests[Path(path).name] = entry


class HashingWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` (one file per rank, fsynced) that also writes
    ``manifest.json``: see the module docstring for who hashes what, and when."""

    def __init__(self, path: str | os.PathLike, **kwargs: Any):
        super().__init__(path, **kwargs)
        self.fs = _HashingFileSystem()

    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)
        results = fut.wait() if hasattr(fut, "wait") else fut.result()
        mine = {r.storage_data.relative_path for r in results}
        part = {name: self.fs.digests[name] for name in sorted(mine)}
        rank = self.rank if self.rank is not None else 0
        _write_json(Path(self.path) / RANK_PART.format(rank=rank), part)
        return fut

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)  # writes .metadata
        root = Path(self.path)
        files: dict[str, dict[str, Any]] = {}
        parts = sorted(root.glob(RANK_PART.format(rank="*")))
        for part in parts:
            files.update(json.loads(part.read_text()))
        indexed = {r.storage_data.relative_path for rank_results in results for r in rank_results}
        unhashed = sorted(indexed - set(files))
        if unhashed:
            raise RuntimeError(f"no content hashes for {unhashed[:4]} in {root}: a rank wrote no manifest part")
        for name in (DCP_META_FILE, META_FILE):
            if (root / name).is_file():
                files[name] = hash_file(root / name)
        _write_json(root / MANIFEST_FILE, {"format": FORMAT, "algorithm": ALGORITHM, "block_bytes": BLOCK_BYTES,
                                           "files": dict(sorted(files.items()))}, durable=True)
        for part in parts:
            part.unlink()


def _write_json(path: Path, obj: Any, durable: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=None if not durable else 0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


# ---- checking -----------------------------------------------------------------------------
def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """``manifest.json`` of checkpoint ``path``, or None where it has none."""
    f = Path(path) / MANIFEST_FILE
    if not f.is_file():
        return None
    try:
        manifest = json.loads(f.read_text())
        ok = (manifest.get("format") == FORMAT and manifest.get("algorithm") in hashlib.algorithms_available
              and isinstance(manifest.get("block_bytes"), int) and manifest["block_bytes"] > 0
              and isinstance(manifest.get("files"), dict))
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise CorruptCheckpointError(f"checkpoint manifest {f} is unreadable or damaged: the checkpoint cannot "
                                     f"be verified; load an earlier checkpoint")
    return manifest


def _tensors_in(path: Path, name: str, start: int, end: int) -> list[str]:
    """Names of the tensors DCP stored in ``name``'s bytes ``[start, end)`` (best effort)."""
    from .safe_metadata import read_dcp_metadata

    try:
        md = read_dcp_metadata(path)
    except CorruptCheckpointError:
        return []
    found = []
    for index, info in (md.storage_data or {}).items():
        if info.relative_path == name and info.offset < end and info.offset + info.length > start:
            found.append(index.fqn if index.offset is None or not any(index.offset)
                         else f"{index.fqn} (chunk at {list(index.offset)})")
    return sorted(found)


def _mismatch(path: Path, name: str, block: int, block_bytes: int, size: int, algorithm: str) -> str:
    start, end = block * block_bytes, min((block + 1) * block_bytes, size)
    tensors = _tensors_in(path, name, start, end) if name not in (DCP_META_FILE, META_FILE) else []
    what = (f" (tensor{'s' if len(tensors) > 1 else ''} {', '.join(repr(t) for t in tensors[:6])}"
            f"{' ...' if len(tensors) > 6 else ''})") if tensors else ""
    return (f"checkpoint file {path / name} is corrupt: bytes {start}..{end}{what} differ from their "
            f"{algorithm} in {MANIFEST_FILE}; load an earlier checkpoint")


def _check_sizes(path: Path, files: dict[str, dict[str, Any]]) -> None:
    for name, entry in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise CorruptCheckpointError(f"checkpoint file {f} is missing (listed in {MANIFEST_FILE}): the "
                                         f"checkpoint is incomplete; load an earlier one")
        size = f.stat().st_size
        if size != entry["size"]:
            kind = "truncated" if size < entry["size"] else "longer than saved"
            raise CorruptCheckpointError(f"checkpoint file {f} is {kind}: {size} bytes, {MANIFEST_FILE} says "
                                         f"{entry['size']}; load an earlier checkpoint")


def _check_blocks(path: Path, manifest: dict, work: list[tuple[str, int]]) -> list[str]:
    files, bb = manifest["files"], manifest["block_bytes"]

    def one(item: tuple[str, int]) -> str | None:
        name, i = item
        try:
            if _hash_block(path / name, i, bb, manifest["algorithm"]) == files[name]["blocks"][i]:
                return None
        except OSError as e:  # reported like a mismatch: a rank that raised here would skip the gather
            return f"checkpoint file {path / name} is unreadable ({type(e).__name__}: {e}); load an earlier checkpoint"
        return _mismatch(path, name, i, bb, files[name]["size"], manifest["algorithm"])

    with ThreadPoolExecutor(_VERIFY_THREADS, thread_name_prefix="checkpoint-verify") as pool:
        return [m for m in pool.map(one, work) if m is not None]


def verify_index_files(path: str | Path) -> dict[str, Any] | None:
    """Local checks every rank makes alike (no collective): the manifest is readable, every
    file it lists exists with its size, ``checkpoint.json`` and ``.metadata`` match their
    hashes. Returns the manifest (None: the checkpoint has none; a warning says so)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        warnings.warn(f"checkpoint {path} has no {MANIFEST_FILE} (saved before content hashes were written): "
                      f"its files are not verified", stacklevel=3)
        return None
    files = manifest["files"]
    for name in (META_FILE, DCP_META_FILE):
        if name not in files:
            raise CorruptCheckpointError(f"checkpoint manifest {path / MANIFEST_FILE} does not cover {name}: "
                                         f"the checkpoint cannot be verified; load an earlier checkpoint")
    _check_sizes(path, files)
    bad = _check_blocks(path, manifest, [(n, i) for n in (META_FILE, DCP_META_FILE)
                                         for i in range(len(files[n]["blocks"]))])
    if bad:
        raise CorruptCheckpointError(bad[0])
    return manifest


_VERIFIED: set[str] = set()  # the checkpoint last verified with remember=True, until loaded


def take_verified(path: str | Path) -> bool:
    """Whether ``path`` is the checkpoint the last :func:`verify` with ``remember=True``
    verified (once: the mark is consumed). The same on every rank, since they verified it
    together, so a load skips (or runs) the collective check on all ranks alike."""
    key = str(Path(path).resolve())
    found = key in _VERIFIED
    _VERIFIED.clear()
    return found


def verify(path: str | Path, group=None, *, manifest: dict[str, Any] | None = None,
           collective: bool = True, remember: bool = False) -> bool:
    """Check every file of checkpoint ``path`` against its manifest (collective over
    ``group`` when ``collective`` and a process group exists: the data blocks are split over
    the ranks). Raises :class:`CorruptCheckpointError` naming the first bad file, the same
    on every rank; returns False where the checkpoint has no manifest, True when verified."""
    path = Path(path)
    _VERIFIED.clear()
    if manifest is None:
        manifest = verify_index_files(path)
        if manifest is None:
            return False
    distributed = collective and dist.is_initialized() and dist.get_world_size(group) > 1
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if distributed else (0, 1)
    files = manifest["files"]
    work = [(n, i) for n in sorted(files) if n not in (META_FILE, DCP_META_FILE)
            for i in range(len(files[n]["blocks"]))]
    bad = _check_blocks(path, manifest, work[rank::world])
    if distributed:
        gathered: list[list[str] | None] = [None] * world
        dist.all_gather_object(gathered, bad, group=group)
        bad = [m for ms in gathered for m in (ms or [])]
    if bad:
        more = f" (and {len(bad) - 1} more bad block{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
        raise CorruptCheckpointError(bad[0] + more)
    if remember:  # the load that follows (--resume auto) need not hash it again
        _VERIFIED.add(str(path.resolve()))
    return True


__all__ = ["HashingWriter", "verify", "take_verified", "verify_index_files", "read_manifest", "hash_file", "FORMAT",
           "ALGORITHM", "BLOCK_BYTES"]
