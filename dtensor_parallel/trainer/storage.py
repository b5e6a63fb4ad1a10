"""Where a run writes: checked before the first step, and a full disk named as one.

- :func:`check_writable_dir`: ``--save`` (and the metrics directory) must be a directory this
  process can create files in. Checked in the launching process before any rank spawns
  (``preflight``), by creating and removing a probe file, which is the only test that also
  holds for root, read-only mounts and ACLs. Without it an unwritable ``--save`` failed at
  the first save, after the steps before it, with one raw ``OSError`` per rank.
- :func:`disk_full_error`: a failed save, translated. torch's zip writer hides the errno of a
  short write (a full disk surfaces as ``RuntimeError: ... unexpected pos 704 vs 598``, on
  the ranks that hit it, wrapped by DCP in a ``CheckpointException``), so a save error is a
  full disk when ``ENOSPC``/``EDQUOT`` appears anywhere in it, or when torch's short-write
  message does and the file system has less than :data:`FULL_BELOW_BYTES` left.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

FULL_BELOW_BYTES = 64 * 2 ** 20  # after a failed write, less free space than this is "full"
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")
_SHORT_WRITE_TEXT = "unexpected pos"  # torch/csrc/.../inline_container.cc: a short write


class DiskFullError(OSError):
    """A save ran out of space: ``disk full at PATH``."""


def check_writable_dir(path: str | Path, what: str) -> Path:
    """Create ``path`` if needed and check that files can be created in it; a ``ValueError``
    naming ``what`` (the flag) and the reason otherwise."""
    p = Path(path)
    probe = p / f".write_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0")
        probe.unlink()
    except OSError as e:
        reason = f"disk full at {p}" if e.errno in _FULL_ERRNOS else (e.strerror or type(e).__name__)
        where = f": {e.filename}" if e.filename and str(e.filename) != str(probe) else ""
        raise ValueError(f"{what} {p} is not a writable directory ({reason}{where}): choose a directory "
                         f"this user can create files in") from None
    return p


def free_bytes(path: str | Path) -> int | None:
    """Bytes available at ``path`` (its nearest existing ancestor), or None if unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _causes(exc: BaseException):
    """``exc``, its causes and contexts, and the per-rank failures of a DCP CheckpointException."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        for f in (getattr(e, "failures", None) or {}).values():  # {rank: exception or (exception, frames)}
            todo.append(f[0] if isinstance(f, tuple) else f)


def _text(e: BaseException) -> str:
    try:
        return str(e)
    except Exception:  # noqa: BLE001 - a malformed exception must not hide the original one
        return repr(e)


def disk_full_error(exc: BaseException, path: str | Path) -> DiskFullError | None:
    """A :class:`DiskFullError` for a save into ``path`` that failed with ``exc``, or None when
    ``exc`` is not a full disk."""
    causes = [e for e in _causes(exc) if isinstance(e, BaseException)]
    text = " ".join(_text(e) for e in causes)
    full = any(getattr(e, "errno", None) in _FULL_ERRNOS for e in causes) or any(t in text for t in _FULL_TEXT)
    free = free_bytes(path)
    if not full and _SHORT_WRITE_TEXT in text and free is not None and free < FULL_BELOW_BYTES:
        full = True
    if not full:
        return None
    left = f"{free / 2 ** 20:.1f} MiB free there now" if free is not None else "free space unknown"
    return DiskFullError(errno.ENOSPC, f"disk full at {path} ({left}): the checkpoint was not saved; free "
                         f"space (or --save elsewhere), then resume with --resume auto from the last "
                         f"published checkpoint")
