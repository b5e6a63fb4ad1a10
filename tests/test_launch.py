"""The ranks' process group (``trainer/launch.py``): ``--distributed-timeout-minutes``, the
heartbeat that names the ranks a timed-out collective waited for, and ranks that die with
their launcher. Two real launches (2 gloo ranks, a one-layer Llama of 64 features)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from dtensor_parallel.trainer import config_from_dict, load_config
from dtensor_parallel.trainer.launch import DEFAULT_TIMEOUT_MINUTES, Heartbeat

REPO = Path(__file__).resolve().parents[1]
TINY = ["--tensor-model-parallel-size", "1", "--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "2", "--vocab-size", "256",
        "--lr-warmup-iters", "0", "--train-iters", "100000", "--log-interval", "1"]


def test_timeout_flag_and_default():
    assert DEFAULT_TIMEOUT_MINUTES == 10  # Megatron's default, not gloo's 30 minutes
    assert config_from_dict({}).cluster.distributed_timeout_minutes == DEFAULT_TIMEOUT_MINUTES
    cfg = load_config(REPO / "recipes" / "debug.toml", ["--distributed-timeout-minutes", "2.5"])
    assert cfg.cluster.distributed_timeout_minutes == 2.5
    with pytest.raises(ValueError, match=r"distributed_timeout_minutes=0.0 \(--distributed-timeout-minutes\) must be"):
        config_from_dict({"cluster": {"distributed_timeout_minutes": 0}})


def test_heartbeat_names_the_silent_ranks():
    store = dist.TCPStore("127.0.0.1", 0, 1, True)
    beats = [Heartbeat(store, r, 3, timeout_minutes=1.0, interval=0.05) for r in range(3)]
    beats[0].beat()
    beats[1].beat()  # rank 2 never beats
    time.sleep(0.3)  # > STALE_BEATS beats: rank 1 is silent now too
    beats[0].beat()
    msg = beats[0].explain(RuntimeError("Timed out waiting 60000ms for recv operation to complete"))
    assert "rank(s) 1, 2 did not arrive" in msg and "has sent no heartbeat at all" in msg, msg
    assert f"pid {os.getpid()}" in msg and "(--distributed-timeout-minutes)" in msg
    beats[1].beat()
    beats[2].beat()
    msg = beats[0].explain(RuntimeError("Timed out"))
    assert "every rank still beats" in msg, msg


def test_heartbeat_stop_waits_for_a_store_call_in_flight():
    """A heartbeat thread left inside a store call at interpreter exit aborts the rank
    (std::terminate from pthread_exit's unwinding): stop() returns only once it has ended."""
    store = dist.TCPStore("127.0.0.1", 0, 1, True)
    beat = Heartbeat(store, 0, 2, timeout_minutes=1.0, interval=0.01)
    beat.start()
    in_call, real_beat = [], beat.beat

    def slow_beat():
        in_call.append(1)
        time.sleep(0.5)
        real_beat()

    beat.beat = slow_beat
    while not in_call:
        time.sleep(0.005)
    beat.stop()
    assert not beat._thread.is_alive()


def _start(tmp_path: Path, flags: list[str]) -> tuple[subprocess.Popen, dict[int, int]]:
    """A 2-rank launch; returns once the first step is logged, with {rank: pid}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "dtensor_parallel", "train", str(REPO / "recipes" / "debug.toml"),
                             "--nproc-per-node", "2", "--metrics", str(tmp_path / "metrics.jsonl"), *TINY, *flags],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step"):
            break
    else:
        pytest.fail(f"no step logged: {proc.stderr.read()[-3000:]}")
    ranks = {}
    for pid in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split():
        env_vars = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(v for v in env_vars if v.startswith(b"RANK="))
        ranks[int(rank[5:])] = int(pid)
    assert sorted(ranks) == [0, 1]
    return proc, ranks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_stopped_rank_ends_the_job_within_the_timeout_naming_it(tmp_path):
    timeout_s = 6.0
    proc, ranks = _start(tmp_path, ["--distributed-timeout-minutes", str(timeout_s / 60)])
    os.kill(ranks[1], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout_s + 40)
    finally:
        proc.kill()
        os.kill(ranks[1], signal.SIGKILL) if Path(f"/proc/{ranks[1]}").exists() else None
    took = time.monotonic() - t0
    assert proc.returncode != 0
    assert took < timeout_s + 10, f"the job took {took:.1f} s to end after a {timeout_s} s timeout"
    line = next((x for x in err.splitlines() if "a collective timed out" in x), "")
    assert "rank(s) 1 did not arrive" in line and f"pid {ranks[1]}" in line, err[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_ranks_die_with_their_launcher(tmp_path):
    proc, ranks = _start(tmp_path, [])
    proc.kill()  # SIGKILL: the launcher cannot forward anything
    proc.wait()
    t0 = time.monotonic()
    while any(Path(f"/proc/{pid}").exists() for pid in ranks.values()) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    alive = [r for r, pid in ranks.items() if Path(f"/proc/{pid}").exists()]
    for r in alive:
        os.kill(ranks[r], signal.SIGKILL)
    assert not alive, f"ranks {alive} outlived their launcher by 10 s"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_rank_whose_launcher_is_already_gone_exits(monkeypatch):
    """The race: the launcher dies before a rank asks for the parent-death signal. (A forked
    child: it only calls prctl and exits, so torch's threads do not matter.)"""
    from dtensor_parallel.trainer.launch import LAUNCHER_PID_ENV, exit_with_parent

    for launcher, survives in ((os.getpid(), True), (1, False)):  # its parent, or a pid that is not
        pid = os.fork()
        if pid == 0:  # the child: stderr quiet, exit 0 if it survives the call
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            os.environ[LAUNCHER_PID_ENV] = str(launcher)
            exit_with_parent()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == (0 if survives else 1), launcher
