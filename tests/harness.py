"""Run a function on N gloo ranks, reusing the worker processes across test cases.

Starting a process group costs seconds (spawn + ``import torch`` per rank), so one pool of
``world_size`` workers lives for the whole pytest session and runs case after case. The
function runs on every rank; it must be defined at module level (it is pickled by name).

Idle gloo groups are not free: each keeps a TCP event-loop thread that wakes about a hundred
times a second, and the groups the session's meshes create pile up in a pool that lives for
the whole session (138 per worker measured at the end of a run). Across a few pools that
took most of CI's two cores from the running tests (the suite went from ~14 to ~18
minutes). So at most two pools live at once (the least recently used is closed), and a
pool whose ranks hold more than :data:`MAX_GROUPS` groups is restarted before its next
case. (Destroying the groups after each case instead is not possible: DTensor caches
redistribution plans by mesh, and an equal mesh of a later case would reach a destroyed
group through them.)
Any rank's exception fails the call with that rank's traceback; a rank that does not
answer within the timeout (a hang) fails it too, and the pool is torn down and rebuilt.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from typing import Any, Callable

_POOLS: dict[tuple[int, str], "_Pool"] = {}
CASE_TIMEOUT_S = float(os.environ.get("DTP_TEST_TIMEOUT", "300"))
MAX_POOLS = 2
MAX_GROUPS = 48


def _worker(rank: int, world_size: int, backend: str, store_path: str, tasks, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device_id = torch.device("cuda", rank)
    # a file store, not TCP: no port to pick, so parallel test runs cannot collide
    dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank,
                            world_size=world_size, device_id=device_id,
                            timeout=datetime.timedelta(seconds=CASE_TIMEOUT_S))
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            value, ok = fn(*args, **kwargs), True
        except BaseException:  # noqa: BLE001 - report every failure to the parent
            value, ok = traceback.format_exc(), False
        results.put((rank, ok, value, len(getattr(dist.distributed_c10d._world, "pg_map", ()))))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size: int, backend: str):
        ctx = mp.get_context("spawn")  # fork is unsafe after CUDA or OpenMP started
        self.world_size = world_size
        self.key = (world_size, backend)
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.groups = 0  # process groups the ranks hold (the most of any rank, after the last case)
        fd, store_path = tempfile.mkstemp(prefix="dtp_store_")
        os.close(fd)
        os.unlink(store_path)  # the store creates it; a stale file would confuse it
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, backend, store_path, self.tasks[r], self.results),
                                  daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable, args: tuple, kwargs: dict) -> list[Any]:
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out: dict[int, Any] = {}
        failures: list[str] = []
        while len(out) + len(failures) < self.world_size:
            timeout = 10.0 if failures else CASE_TIMEOUT_S
            try:
                rank, ok, value, groups = self.results.get(timeout=timeout)
                self.groups = max(self.groups, groups)
            except queue.Empty:
                self.close(force=True)
                missing = sorted(set(range(self.world_size)) - set(out))
                if failures:
                    raise AssertionError("rank failed (others then hung):\n" + failures[0]) from None
                raise TimeoutError(f"ranks {missing} did not finish {fn.__name__} in {timeout}s (hang)")
            if ok:
                out[rank] = value
            else:
                failures.append(f"[rank {rank}]\n{value}")
        if failures:
            raise AssertionError("\n".join(failures[:2]))
        return [out[r] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        _POOLS.pop(self.key, None)
        for p, q in zip(self.procs, self.tasks):
            if not force and p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=0 if force else 10)
            if p.is_alive():
                p.kill()


def run_distributed(world_size: int, fn: Callable, *args, backend: str = "gloo", fresh: bool = False,
                    **kwargs) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on every rank of a process group (gloo on CPU; nccl
    with one GPU per rank); return each rank's result. ``fresh``: in new processes (a case
    whose outcome depends on what earlier cases left in the process: see its caller)."""
    key = (world_size, backend)
    pool = _POOLS.pop(key, None)  # (re-inserted last: the dict's order is the use order)
    if pool is not None and (fresh or not all(p.is_alive() for p in pool.procs) or pool.groups > MAX_GROUPS):
        pool.close(force=not all(p.is_alive() for p in pool.procs))
        pool = None
    if pool is None:
        while len(_POOLS) >= MAX_POOLS:  # the least recently used pool goes
            _POOLS[next(iter(_POOLS))].close()
        pool = _Pool(world_size, backend)
    _POOLS[key] = pool
    return pool.run(fn, args, kwargs)


@atexit.register
def _close_all() -> None:
    for pool in list(_POOLS.values()):
        pool.close()
