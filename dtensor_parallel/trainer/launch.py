"""The ranks' process group: a timeout in minutes, a heartbeat that names the ranks a
collective waits for, and ranks that die with their launcher.

Timeout. ``--distributed-timeout-minutes`` ([cluster] distributed_timeout_minutes, default
:data:`DEFAULT_TIMEOUT_MINUTES`, Megatron's flag and default) is the process group's
timeout for gloo and NCCL: a collective that some rank never joins fails after it, instead
of gloo's 30 minutes.

Heartbeat. Every rank of a world > 1 runs a daemon thread that writes, every
``timeout / 10`` seconds (between 0.25 s and 15 s), one key of the rendezvous store (torchrun
keeps it in the launcher, so it outlives any rank): the time, the rank's pid and host, and
where its main thread is (the innermost frame of this package, read with
``sys._current_frames``). A rank stopped (SIGSTOP, a debugger), hung in C code that holds
the GIL, or dead stops beating. Two readers:

- the rank whose collective times out (gloo raises on it) reads every rank's key and raises
  :class:`CollectiveTimeout`, which names the ranks with stale heartbeats ("did not arrive")
  or, when all beat, where each rank is;
- ranks 0 and ``world - 1`` read the keys every beat and print a line once a rank has been
  silent for four beats: under NCCL the watchdog aborts the process on a timeout without a
  Python exception, so this line is what names the rank there.

Orphans. :func:`exit_with_parent`, called first thing in each rank, asks Linux to SIGKILL
the rank when its parent (the launcher) dies (``prctl(PR_SET_PDEATHSIG)`` through ctypes;
elsewhere a thread polls the parent pid). A rank that starts after its launcher already
died (the launcher's pid in ``DTP_LAUNCHER_PID`` differs from its parent's) exits at once.
Checkpoints are published atomically, so a killed rank loses at most a save in flight.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_MINUTES = 10.0  # Megatron's --distributed-timeout-minutes default (gloo's own: 30)
LAUNCHER_PID_ENV = "DTP_LAUNCHER_PID"  # set by the CLI's launcher for the ranks it spawns
HEARTBEAT_PREFIX = "dtp_heartbeat/"
STALE_BEATS = 4  # a rank silent for this many beats has not arrived
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


def resolve_device(device: str, nproc_per_node: int | None = None) -> str:
    """``[cluster] device`` -> "cuda" or "cpu"; a CUDA run needs a GPU for each local rank.

    ``nproc_per_node``: the local ranks about to be launched (checked before they spawn)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ValueError("[cluster] device='cuda' (--device cuda) but no GPU is visible: "
                             "run with --device cpu (gloo ranks on this CPU)")
        if nproc_per_node is not None and nproc_per_node > gpus:
            raise ValueError(f"--nproc-per-node {nproc_per_node} with device 'cuda' needs {nproc_per_node} GPUs "
                             f"on this host, but {gpus} are visible: launch at most {gpus} ranks per node, or "
                             f"run on the CPU with --device cpu")
    return device


def init_distributed(device: str = "auto", timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> bool:
    """Init the default group (nccl for device "cuda", gloo for "cpu") from torchrun's
    environment, or a world of one without it, with a ``timeout_minutes`` timeout. Returns
    whether this call created the group."""
    if dist.is_initialized():
        return False
    local_ranks = int(os.environ["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in os.environ else None
    cuda = resolve_device(device, local_ranks) == "cuda"
    backend = "nccl" if cuda else "gloo"
    kwargs: dict = {"timeout": timedelta(minutes=timeout_minutes)}
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, **kwargs)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return True


@contextlib.contextmanager
def process_group(device: str = "auto", timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Iterator[None]:
    """The default group for the body (made here unless one exists, and then destroyed),
    with a heartbeat in a world > 1; a timed-out collective in the body becomes a
    :class:`CollectiveTimeout` that names the ranks it waited for."""
    owns = init_distributed(device, timeout_minutes)
    beat = None
    if owns and dist.get_world_size() > 1:
        beat = Heartbeat(dist.distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size(),
                         timeout_minutes)
        beat.start()
    try:
        yield
    except Exception as e:
        if beat is None or not is_timeout(e):
            raise
        raise CollectiveTimeout(beat.explain(e)) from e
    finally:
        if beat is not None:
            beat.stop()
        if owns and dist.is_initialized():
            dist.destroy_process_group()


class CollectiveTimeout(RuntimeError):
    """A collective timed out; the message names the ranks that did not arrive."""


def is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("timed out" in text or "timeout" in text)


# ---- heartbeat --------------------------------------------------------------------------
@dataclass
class Beat:
    rank: int
    time: float  # wall clock (time.time()) of the last beat
    pid: int
    host: str
    where: str  # the main thread's innermost frame in this package

    def encode(self) -> bytes:
        return f"{self.time:.3f}|{self.pid}|{self.host}|{self.where}".encode()

    @classmethod
    def decode(cls, rank: int, raw: bytes) -> Beat:
        t, pid, host, where = raw.decode().split("|", 3)
        return cls(rank, float(t), int(pid), host, where)


def main_thread_location() -> str:
    """``file:line (function)`` of the main thread's innermost frame in this package (the
    innermost frame at all when none is ours)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    first = None
    while frame is not None:
        code = frame.f_code
        here = f"{Path(code.co_filename).name}:{frame.f_lineno} ({code.co_name})"
        first = first or here
        if code.co_filename.startswith(_PACKAGE_DIR) and not code.co_filename.endswith("launch.py"):
            return here
        frame = frame.f_back
    return first or "?"


class Heartbeat:
    """A daemon thread writing this rank's :class:`Beat` to the store every ``interval``."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_minutes: float,
                 interval: float | None = None):
        self.store = dist.PrefixStore(HEARTBEAT_PREFIX, store)
        self.rank, self.world_size, self.timeout_s = rank, world_size, 60.0 * timeout_minutes
        self.interval = interval or min(max(self.timeout_s / 10, 0.25), 15.0)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.watch = rank in (0, world_size - 1)
        self._reported: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dtp-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self, wait_s: float = 60.0) -> None:
        """Stop beating and wait for the thread to end. The wait matters: a daemon thread
        still inside a store call (C++, the GIL released) when the interpreter exits is
        ended by ``pthread_exit`` as it takes the GIL back, whose unwinding through the
        binding's ``noexcept`` frames calls ``std::terminate``: "terminate called without an
        active exception", SIGABRT, after the last step of a job that had succeeded (seen
        once in CI, rank 0 of 4)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(wait_s)

    def beat(self) -> None:
        self.store.set(str(self.rank), Beat(self.rank, time.time(), self.pid, self.host,
                                            main_thread_location()).encode())

    def read(self) -> list[Beat | None]:
        """Every rank's last beat (None: never beat)."""
        keys = [str(r) for r in range(self.world_size)]
        # (a get of a missing key would wait for the store's timeout: check first, one by one
        # only when some rank never beat)
        have = [True] * len(keys) if self.store.check(keys) else [self.store.check([k]) for k in keys]
        raw = self.store.multi_get([k for k, h in zip(keys, have) if h]) if any(have) else []
        it = iter(raw)
        return [Beat.decode(r, bytes(next(it))) if h else None for r, h in enumerate(have)]

    def stale(self, beats: list[Beat | None], now: float) -> list[int]:
        limit = STALE_BEATS * self.interval
        return [r for r, b in enumerate(beats) if b is None or now - b.time > limit]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
                if self.watch:
                    self._report_silent()
            except Exception:  # the store is gone (launcher or rank 0 dead): nothing to report to
                return

    def _report_silent(self) -> None:
        now = time.time()
        beats = self.read()
        stale = self.stale(beats, now)
        if self.rank != 0 and 0 not in stale:  # rank 0 reports while it beats
            return
        for r in stale:
            if r not in self._reported and r != self.rank:
                self._reported.add(r)
                print(f"[rank {self.rank}] {self._describe(r, beats[r], now)}; a collective that waits "
                      f"for it fails after {self.timeout_s / 60:g} min (--distributed-timeout-minutes)",
                      file=sys.stderr, flush=True)

    @staticmethod
    def _describe(rank: int, b: Beat | None, now: float) -> str:
        if b is None:
            return f"rank {rank} has sent no heartbeat at all (it never started, or died at once)"
        return (f"rank {rank} (pid {b.pid} on {b.host}) has sent no heartbeat for {now - b.time:.1f} s, last "
                f"at {b.where}: it is stopped, hung or dead")

    def explain(self, error: BaseException) -> str:
        """The message for a collective of this rank that timed out."""
        head = (f"rank {self.rank}: a collective timed out after {self.timeout_s / 60:g} min "
                f"(--distributed-timeout-minutes)")
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        try:
            self.store.set_timeout(timedelta(seconds=10))
            now, beats = time.time(), self.read()
        except Exception as e:  # the store's host is gone too
            return f"{head}; the heartbeats could not be read ({e}). {first}"
        stale = [r for r in self.stale(beats, now) if r != self.rank]
        if stale:
            names = "; ".join(self._describe(r, beats[r], now) for r in stale[:8])
            more = f" (and {len(stale) - 8} more)" if len(stale) > 8 else ""
            return f"{head}: rank(s) {', '.join(map(str, stale))} did not arrive: {names}{more}. ({first})"
        mine = beats[self.rank].where if beats[self.rank] else "?"
        elsewhere = [b for b in beats if b is not None and b.where != mine][:8]
        where = "; ".join(f"rank {b.rank} at {b.where}" for b in elsewhere) or "every rank at the same place"
        return (f"{head} at {mine}: every rank still beats, so none is stopped or dead; ranks elsewhere "
                f"(the ones that did not arrive): {where}. ({first})")


# ---- parent death -------------------------------------------------------------------------
def exit_with_parent() -> str:
    """Make this rank die with its parent (the launcher); returns how ("prctl" or "thread").

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills this process when the
    thread that spawned it exits. Elsewhere (or if prctl fails): a daemon thread polls the
    parent pid each second. Then, if the launcher named itself in ``DTP_LAUNCHER_PID`` and is
    no longer the parent, it died before this call: exit now."""
    parent = os.getppid()
    how = "thread"
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                how = "prctl"
        except (OSError, AttributeError):
            pass
    if how == "thread":
        def poll() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=poll, name="dtp-parent-watch", daemon=True).start()
    launcher = os.environ.pop(LAUNCHER_PID_ENV, None)  # (not inherited by this rank's own children)
    if launcher is not None and os.getppid() != int(launcher):
        print(f"rank {os.environ.get('RANK', '?')}: its launcher (pid {launcher}) is gone: exiting",
              file=sys.stderr, flush=True)
        os._exit(1)
    return how


def _children() -> list[int]:
    kids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, T stopped, Z zombie ...), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def continue_stopped_ranks(poll_s: float = 0.5) -> threading.Thread | None:
    """Launcher side (Linux): once one of this process's child ranks has exited, the job is
    ending, and torchrun sends the others SIGTERM; a rank stopped by SIGSTOP would take that
    signal only after torchrun's 30 s wait and SIGKILL. This daemon thread sends stopped
    ranks SIGCONT, so the pending SIGTERM (or a failed collective) ends them at once."""
    if not Path("/proc/self/task").is_dir():
        return None

    def run() -> None:
        seen: set[int] = set()
        while True:
            time.sleep(poll_s)
            kids = _children()
            seen.update(kids)
            states = {pid: _state(pid) for pid in seen}
            if not any(s in (None, "Z") for s in states.values()):
                continue
            for pid, s in states.items():
                if s == "T":
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGCONT)

    thread = threading.Thread(target=run, name="dtp-continue-stopped", daemon=True)
    thread.start()
    return thread
