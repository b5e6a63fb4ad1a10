"""``--resume auto``: which checkpoint to continue from, said out loud.

:func:`choose_resume_checkpoint` (collective) looks under the roots in order (the trainer
passes ``--save``, then ``--load``), takes the newest published checkpoint whose files
verify against their manifest (:mod:`.manifest`), and logs (rank 0) the one it takes,
each one it skips and why (an unfinished save, an incomplete directory, a corrupt file,
named with its tensors), and "nothing to do" when the checkpoint already reaches the
target step. A checkpoint saved before manifests existed is taken, with a note that it is
not verified. When checkpoints exist but none verifies, it raises rather than silently
training from scratch over them.

Every rank must consider the same candidates in the same order (the verification of each
is a collective): rank 0 lists the directories and broadcasts the list.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch.distributed as dist

from . import atomic, manifest
from .atomic import CorruptCheckpointError
from .dcp import checkpoint_group, read_meta


def _step_of(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def _survey(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """``(published checkpoints newest first, [(directory, why skipped)])`` under ``root``."""
    published = [str(p) for _, p in reversed(atomic.complete_checkpoints(root))]
    skipped = []
    if root.is_dir():
        for p in sorted(root.iterdir(), key=lambda q: q.name, reverse=True):
            name = p.name
            if name.startswith(atomic.TMP_PREFIX) and atomic.STEP_RE.match(name[len(atomic.TMP_PREFIX):]):
                written = all((p / f).is_file() for f in (atomic.DCP_META_FILE, atomic.META_FILE, atomic.MANIFEST_FILE))
                why = ("written but never published (the run stopped between the write and the rename)"
                       if written else
                       "an unfinished save (the run stopped while it was being written)")
                skipped.append((str(p), why))
            elif atomic.STEP_RE.match(name) and p.is_dir() and not atomic.is_complete(p):
                missing = [f for f in (atomic.DCP_META_FILE, atomic.META_FILE) if not (p / f).is_file()]
                skipped.append((str(p), f"incomplete: no {' and no '.join(missing)}"))
    return published, skipped


def _rank0_log(log: Callable[[str], None] | None) -> Callable[[str], None]:
    if dist.is_initialized() and dist.get_rank() != 0:
        return lambda msg: None
    return log or (lambda msg: print(msg, flush=True))


def choose_resume_checkpoint(roots: Iterable[str | Path | None], *, target_step: int | None = None,
                             log: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint ``--resume auto`` continues from (collective), or None where the roots
    hold no published checkpoint. The one returned has been verified in full (so
    :func:`.dcp.load_checkpoint` does not hash it again)."""
    say = _rank0_log(log)
    roots = list(dict.fromkeys(Path(r) for r in roots if r))
    survey = [_survey(r) for r in roots] if not dist.is_initialized() or dist.get_rank() == 0 else None
    group = checkpoint_group()
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [survey]
        dist.broadcast_object_list(box, src=0, group=group)
        survey = box[0]
    assert survey is not None
    for root, (_, skipped) in zip(roots, survey):
        for where, why in skipped:
            say(f"--resume auto: skipping {where}: {why}")
    candidates = [c for published, _ in survey for c in published]
    rejected: list[str] = []
    for c in candidates:
        path = Path(c)
        try:
            with warnings.catch_warnings():  # a missing manifest is said below, once
                warnings.simplefilter("ignore")
                verified = manifest.verify(path, group, remember=True)
            meta = read_meta(path)
        except CorruptCheckpointError as e:
            rejected.append(f"{path}: {e}")
            say(f"--resume auto: skipping {path}: {e}; falling back to an older checkpoint")
            continue
        note = "" if verified else f" (not verified: it has no {atomic.MANIFEST_FILE}, saved by an older version)"
        say(f"--resume auto: taking {path} (step {meta['step']}){note}")
        if target_step is not None and int(meta["step"]) >= target_step:
            say(f"--resume auto: {path} is at step {meta['step']}, the run's target is step {target_step}: "
                f"nothing to do")
        return path
    if rejected:
        raise CorruptCheckpointError(f"--resume auto: no checkpoint under {', '.join(map(str, roots))} verifies "
                                     f"({len(rejected)} tried; the newest: {rejected[0]}): fix or move them "
                                     f"away to start afresh, or --load one explicitly")
    say(f"--resume auto: no published checkpoint under {', '.join(map(str, roots)) or '(no --save/--load)'}: "
        f"starting at step 0")
    return None


__all__ = ["choose_resume_checkpoint"]
