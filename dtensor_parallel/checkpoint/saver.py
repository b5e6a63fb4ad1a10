"""Saving: :class:`Checkpointer` (every N steps, atomically, optionally asynchronously).

A save writes ``.tmp_step_N`` through :class:`.manifest.HashingWriter` (DCP's file writer
that also leaves ``manifest.json``, the content hashes of every file) and publishes it by
one rename (:mod:`.atomic`).

Synchronous: the rename happens before :meth:`Checkpointer.save` returns (barrier, rank 0
renames, rank 0's outcome broadcast).

Asynchronous (``async_save=True``): the state is copied to CPU memory and written by
DCP's background thread over a separate gloo group (so its collectives never interleave
with training's). The checkpoint is published *as soon as its write completes*, by rank
0 from the completion callback of its save future: DCP completes rank 0's future only
after every rank's files are written (their write results were gathered) and rank 0
itself wrote ``.metadata`` and ``manifest.json``, so the rename needs no collective and
the other ranks, busy training, are never asked to join one. A crash between saves thus
loses at most one interval. The callback runs once per save; its outcome is collected at
the next :meth:`Checkpointer.wait` (the next save, or ``close``), where all ranks
agree on it (rank 0 broadcasts an error, if any, and every rank raises it).
"""

from __future__ import annotations

import json
import threading
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from . import atomic
from .dcp import _flat_state, _meta, checkpoint_group
from .manifest import HashingWriter


class _PendingSave:
    """An asynchronous save in flight; rank 0 publishes it from the future's callback."""

    def __init__(self, fut: Future, root: Path, step: int, publisher: bool):
        self.fut, self.root, self.step, self.publisher = fut, root, step, publisher
        self.published = threading.Event()
        self.error: str | None = None
        fut.add_done_callback(self._done)  # runs at once if already done

    def _done(self, fut: Future) -> None:
        try:
            if self.publisher and fut.exception() is None:
                atomic.rename_into_place(self.root, self.step)
        except Exception as e:  # noqa: BLE001 - reported by wait() on every rank
            self.error = f"publishing {atomic.tmp_path(self.root, self.step)} failed: {type(e).__name__}: {e}"
        finally:
            self.published.set()


class Checkpointer:
    """Saves every ``interval`` steps into ``root`` (atomically), optionally asynchronously.

    Every rank constructs it and calls its methods at the same steps (they are collective)::

        ckpt = Checkpointer("ckpt", interval=100, async_save=True)
        for step in range(start, steps):
            ...  # one optimizer step
            ckpt.maybe_save(step + 1, pm, opt, sched, data={"step": step + 1})
        ckpt.close()  # waits for a pending asynchronous save (published when written)
    """

    def __init__(self, root: str | Path, *, interval: int | None = None, async_save: bool = False):
        if interval is not None and interval < 1:
            raise ValueError(f"save interval {interval} must be >= 1")
        self.root, self.interval, self.async_save = Path(root), interval, async_save
        self.group = checkpoint_group()
        self._pending: _PendingSave | None = None
        self.last_saved: int | None = None

    def due(self, step: int) -> bool:
        return self.interval is not None and step % self.interval == 0

    def maybe_save(self, step: int, model, opt=None, sched=None, **kw) -> Path | None:
        return self.save(step, model, opt, sched, **kw) if self.due(step) else None

    def save(self, step: int, model, opt: torch.optim.Optimizer | None = None, sched=None, *,
             data: dict | None = None, extra: dict | None = None) -> Path:
        """Write ``step_N`` (collective). Synchronous: returns once it is published.
        Asynchronous: returns once the state is copied to CPU; published once written."""
        self.wait()
        meta = _meta(model, step, opt, sched, data, extra)
        tmp = atomic.prepare(self.root, step, self.group,  # (rank 0's failure raised on every rank)
                             write=lambda d: (d / atomic.META_FILE).write_text(json.dumps(meta, indent=1)))
        flat = _flat_state(model, opt, rng=True)
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        writer = HashingWriter(tmp)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(TypedStorage|torch.distributed is disabled).*")
            if self.async_save:
                fut = dcp.async_save(flat, storage_writer=writer, process_group=self.group)
                fut = getattr(fut, "upload_completion", fut)  # AsyncSaveResponse in newer torch
                self._pending = _PendingSave(fut, self.root, step, publisher=rank0)
                return atomic.final_path(self.root, step)
            dcp.save(flat, storage_writer=writer, process_group=self.group)
        self.last_saved = step
        return atomic.publish(self.root, step, self.group)

    def wait(self) -> Path | None:
        """Wait for a pending asynchronous save and its publication (collective; a no-op
        without one). Every rank raises the same error if the save or its rename failed."""
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        pending.fut.result()  # DCP raises the same CheckpointException on every rank if one failed
        pending.published.wait()
        atomic.agree_on_error(pending.error, self.group)
        self.last_saved = pending.step
        return atomic.final_path(self.root, pending.step)

    close = wait


def save_checkpoint(root: str | Path, step: int, model, opt=None, sched=None, *, data: dict | None = None,
                    extra: dict | None = None) -> Path:
    """One synchronous, atomic save into ``root/step_N`` (collective); returns its path."""
    return Checkpointer(root).save(step, model, opt, sched, data=data, extra=extra)


__all__ = ["Checkpointer", "save_checkpoint"]
