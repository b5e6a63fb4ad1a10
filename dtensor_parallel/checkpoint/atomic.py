"""Atomic checkpoint directories: write under a temporary name, publish by one rename.

Layout of a checkpoint root (``--save DIR``)::

    DIR/step_00000100/          a complete checkpoint (published)
    DIR/step_00000200/
    DIR/.tmp_step_00000300/     a save in progress, or one a crash interrupted

Protocol of one save (every rank calls it; the root must be on a file system all ranks see):

1. rank 0 removes a stale ``.tmp_step_N`` left by an earlier crash and creates it afresh;
   barrier (nobody writes before the directory exists);
2. every rank writes its part into ``.tmp_step_N`` (DCP: one file per rank, then the
   coordinator writes ``.metadata`` once it has every rank's write results);
3. barrier (every rank's part is on disk), then rank 0 renames ``.tmp_step_N`` to
   ``step_N`` -- a single ``rename(2)``, atomic on POSIX file systems -- and fsyncs ``DIR``;
   rank 0 broadcasts the outcome (nobody reports success, or starts another save, before
   the name is visible, and a failed rename raises on every rank instead of leaving the
   others waiting at a barrier).

An asynchronous save needs no barrier for step 3: DCP gathers every rank's write results
on rank 0 (its coordinator) only after each rank's files are written and fsynced, and
then rank 0 writes ``.metadata`` and the manifest. So when rank 0's save future completes,
the whole checkpoint is on disk and rank 0 alone renames it (:func:`rename_into_place`,
from the future's completion callback: :mod:`.saver`), with no collective that the other
ranks would have to join.

A crash anywhere before step 3's rename leaves only a ``.tmp_`` directory, which
:func:`complete_checkpoints` never lists, so ``--resume auto`` takes the newest *published*
checkpoint and the previous good one stays untouched. The next save of the same step
replaces the stale temporary directory. Re-saving a step that is already published (a
run resumed from an earlier step) swaps the new one in with two renames; older steps are
never touched.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_"
OLD_PREFIX = ".old_"
STEP_RE = re.compile(r"^step_(\d{8,})$")
META_FILE = "checkpoint.json"  # ours: step, layout, trainer state (written by rank 0)
DCP_META_FILE = ".metadata"  # torch.distributed.checkpoint's index of every rank's shards
MANIFEST_FILE = "manifest.json"  # content hashes of every file (:mod:`.manifest`)


class CorruptCheckpointError(ValueError):
    """A checkpoint's files are missing, truncated, unreadable, refused, or differ from their
    hashes: ``--resume auto`` falls back to an older checkpoint on this error (and only on it)."""


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def tmp_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"{TMP_PREFIX}{step_name(step)}"


def final_path(root: str | Path, step: int) -> Path:
    return Path(root) / step_name(step)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier(group) -> None:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.barrier(group=group)


def prepare(root: str | Path, step: int, group=None, write=None) -> Path:
    """Step 1: a fresh, empty temporary directory for ``step`` (collective), and rank 0's
    ``write(tmp)`` into it (``checkpoint.json``). Rank 0's outcome is broadcast instead of a
    barrier: a failure there (a full disk, permissions) is raised on every rank rather than
    leaving the others waiting in the save's first collective until the timeout."""
    tmp = tmp_path(root, step)
    error = None
    if _rank() == 0:
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a save that a crash interrupted
                shutil.rmtree(tmp)
            tmp.mkdir()
            if write is not None:
                write(tmp)
        except OSError as e:
            error = f"preparing the checkpoint {tmp} failed: {type(e).__name__}: {e}"
    agree_on_error(error, group)  # (every rank waits for it: the barrier of step 1)
    return tmp


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def rename_into_place(root: str | Path, step: int) -> Path:
    """Rank 0's part of step 3 (no collective): ``.tmp_step_N`` -> ``step_N``, after checking
    that the save finished (both indexes and the manifest are there). Re-saving a published
    step swaps the new one in with two renames, never a half-replaced directory."""
    root = Path(root)
    tmp, final = tmp_path(root, step), final_path(root, step)
    missing = [f for f in (DCP_META_FILE, META_FILE, MANIFEST_FILE) if not (tmp / f).is_file()]
    if missing:
        raise RuntimeError(f"refusing to publish {tmp}: {', '.join(missing)} missing "
                           f"(the save did not finish on every rank)")
    _fsync_dir(tmp)
    old = root / f"{OLD_PREFIX}{final.name}"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    if old.exists():
        shutil.rmtree(old)
    return final


def agree_on_error(error: str | None, group=None) -> None:
    """Rank 0's error (or None) raised on every rank: a collective every rank joins, so an
    error on rank 0 never leaves the others blocked at the next barrier."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        box = [error]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                   group=group)
        error = box[0]
    if error is not None:
        raise RuntimeError(error)


def publish(root: str | Path, step: int, group=None) -> Path:
    """Step 3: make ``.tmp_step_N`` visible as ``step_N`` once every rank has written
    (collective). Returns the published path."""
    _barrier(group)
    error = None
    if _rank() == 0:
        try:
            rename_into_place(root, step)
        except Exception as e:  # noqa: BLE001 - every rank raises it, below
            error = f"{type(e).__name__}: {e}"
    agree_on_error(error, group)
    return final_path(root, step)


def is_complete(path: str | Path) -> bool:
    """A published checkpoint: named ``step_N`` with both index files present."""
    p = Path(path)
    return (STEP_RE.match(p.name) is not None and (p / DCP_META_FILE).is_file()
            and (p / META_FILE).is_file())


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every published checkpoint under ``root``, oldest first;
    temporary (interrupted) directories are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest published checkpoint under ``root`` (``--resume auto``), or None."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a root holding ``step_N`` directories (its newest).
    Raises ``FileNotFoundError`` naming what was looked for."""
    p = Path(path)
    if is_complete(p):
        return p
    if p.name.startswith(TMP_PREFIX):
        raise FileNotFoundError(f"{p} is an unfinished save (a crash interrupted it): load a published "
                                f"{STEP_PREFIX}N directory, or its parent for the newest one")
    if (p / DCP_META_FILE).is_file() and not (p / META_FILE).is_file():
        raise FileNotFoundError(f"{p} has no {META_FILE}: not a dtensor_parallel checkpoint")
    latest = latest_checkpoint(p)
    if latest is None:
        pending = sorted(q.name for q in p.iterdir() if q.name.startswith(TMP_PREFIX)) if p.is_dir() else []
        extra = f" (ignored unfinished saves: {', '.join(pending)})" if pending else ""
        raise FileNotFoundError(f"no complete checkpoint in {p}: expected {p}/{STEP_PREFIX}NNNNNNNN/ "
                                f"with {DCP_META_FILE} and {META_FILE}{extra}")
    return latest
