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
   barrier (nobody reports success, or starts another save, before the name is visible).

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


def prepare(root: str | Path, step: int, group=None) -> Path:
    """Step 1: a fresh, empty temporary directory for ``step`` (collective)."""
    tmp = tmp_path(root, step)
    if _rank() == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that a crash interrupted
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(group)
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


def publish(root: str | Path, step: int, group=None) -> Path:
    """Step 3: make ``.tmp_step_N`` visible as ``step_N`` once every rank has written
    (collective). Returns the published path."""
    root = Path(root)
    tmp, final = tmp_path(root, step), final_path(root, step)
    _barrier(group)
    if _rank() == 0:
        if not (tmp / DCP_META_FILE).is_file() or not (tmp / META_FILE).is_file():
            raise RuntimeError(f"refusing to publish {tmp}: {DCP_META_FILE} or {META_FILE} is missing "
                               f"(the save did not finish on every rank)")
        _fsync_dir(tmp)
        old = root / f"{OLD_PREFIX}{final.name}"
        if final.exists():  # the same step saved again: swap, never a half-replaced directory
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
        if old.exists():
            shutil.rmtree(old)
    _barrier(group)
    return final


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
