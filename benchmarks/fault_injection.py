"""Fault injection: the cases of issue 20, replayed through the CLI on CPU (2 gloo ranks, a
one-layer Llama), each against what must happen; prints a table and writes
``benchmarks/results/fault_injection.json``.

    python benchmarks/fault_injection.py [--only NAME,...] [--out PATH]

Each case launches ``python -m dtensor_parallel train recipes/debug.toml --nproc-per-node 2``
(as a user would) and injects its fault: SIGKILL of the launcher during an async save,
a learning rate that turns the loss NaN, a new --lr on resume, flipped bytes in a shard and
in checkpoint.json, a crafted .metadata, a SIGSTOPped rank, a killed launcher, bad flags, an
ambiguous token file, a torn metrics line, an unwritable --save. The CPU suite tests the
same behaviours (tests/test_checkpoint_integrity.py, test_trainer_safety.py,
test_launch.py, test_preflight.py); this script is the whole-program replay.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # (tests.test_checkpoint_integrity's manifest rewriter)
TINY = ["--tensor-model-parallel-size", "1", "--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "2", "--vocab-size", "256",
        "--lr-warmup-iters", "0", "--log-interval", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}


def cmd(tmp: Path, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "dtensor_parallel", "train", str(REPO / "recipes" / "debug.toml"),
            "--nproc-per-node", "2", "--metrics", str(tmp / "metrics.jsonl"), *TINY, *flags]


def run(tmp: Path, flags: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd(tmp, flags), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def start(tmp: Path, flags: list[str], until: str) -> tuple[subprocess.Popen, dict[int, int], list[str]]:
    """Launch and read stdout until a line matches the regex ``until``; returns the launcher, its
    ranks' pids and the lines read."""
    proc = subprocess.Popen(cmd(tmp, flags), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines, t0 = [], time.monotonic()
    for line in proc.stdout:
        lines.append(line)
        if re.match(until, line):
            break
        if time.monotonic() - t0 > 180:
            proc.kill()
            raise TimeoutError(f"no line matching {until!r} in 180 s: {''.join(lines[-5:])}")
    ranks = {}
    for pid in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks[int(next(v for v in env if v.startswith(b"RANK="))[5:])] = int(pid)
    return proc, ranks, lines


def gone(pids, within: float) -> bool:
    t0 = time.monotonic()
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() - t0 < within:
        time.sleep(0.1)
    return not any(Path(f"/proc/{p}").exists() for p in pids)


def newest(root: Path) -> Path:
    return sorted(root.glob("step_*"))[-1]


def flip(f: Path, at: int, n: int) -> None:
    data = bytearray(f.read_bytes())
    for i in range(at, min(at + n, len(data))):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


# ---- the cases: each returns (what must happen, what happened, ok) --------------------------
def async_save_killed(tmp: Path):
    save = tmp / "ckpt"
    proc, ranks, _ = start(tmp, ["--save", str(save), "--save-interval", "5", "--async-save",
                                 "--train-iters", "100000"], until=r"step\s+9/")
    proc.kill()  # SIGKILL: the ranks die with it (parent-death signal)
    proc.wait()
    gone(ranks.values(), 10)
    published = sorted(p.name for p in save.glob("step_*"))
    r = run(tmp, ["--save", str(save), "--resume", "auto", "--train-iters", "7"])
    took = re.search(r"taking (\S+) \(step (\d+)\)", r.stdout)
    ok = r.returncode == 0 and "step_00000005" in published and took is not None and took.group(2) == "5"
    return ("step 5's async save published before the kill at step 9; --resume auto takes it",
            f"published {published}; resume: {took.group(0) if took else r.stdout[-200:]}", ok)


def nan_run(tmp: Path):
    save = tmp / "ckpt"
    r = run(tmp, ["--save", str(save), "--save-interval", "1", "--train-iters", "12", "--lr", "1e3"])
    skipped = len(re.findall(r"skipp", r.stdout + r.stderr))
    again = run(tmp, ["--save", str(save), "--resume", "auto", "--lr", "1e-4", "--min-lr", "1e-5", "--train-iters",
                      str(int(newest(save).name.split("_")[1]) + 1)]) if list(save.glob("step_*")) else None
    losses = [json.loads(x)["loss"] for x in (tmp / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ok = r.returncode != 0 and skipped > 0 and again is not None and again.returncode == 0 and all(
        v == v and abs(v) != float("inf") for v in losses[-1:])
    why = "" if again is None or again.returncode == 0 else (again.stdout + again.stderr)[-300:]
    return ("non-finite steps skipped (counted), then the run stops; the last published checkpoint is finite "
            "and resumes", f"rc {r.returncode}, {skipped} skip lines, resume rc "
            f"{again.returncode if again else None}, last loss {losses[-1] if losses else None} {why}", ok)


def resume_new_lr(tmp: Path):
    save = tmp / "ckpt"
    run(tmp, ["--save", str(save), "--save-interval", "3", "--train-iters", "3", "--lr", "3e-3"])
    r = run(tmp, ["--save", str(save), "--resume", "auto", "--train-iters", "5", "--lr", "1e-4", "--min-lr", "1e-5"])
    recs = [json.loads(x) for x in (tmp / "metrics.jsonl").read_text().splitlines() if x.strip()]
    lr4 = next((rec["lr"] for rec in recs if rec["step"] == 4), None)
    ok = r.returncode == 0 and "resumed with --lr 0.0001" in r.stdout and lr4 is not None and lr4 <= 1e-4 * (1 + 1e-6)
    return ("a new --lr on resume is the lr used, said in one line", f"lr at step 4: {lr4}; "
            f"{'said' if 'resumed with --lr' in r.stdout else 'not said'}", ok)


def nothing_to_do(tmp: Path):
    save = tmp / "ckpt"
    run(tmp, ["--save", str(save), "--save-interval", "3", "--train-iters", "3"])
    r = run(tmp, ["--save", str(save), "--resume", "auto", "--train-iters", "2"])
    return ("--train-iters below the checkpoint's step says 'nothing to do'",
            f"rc {r.returncode}; {'said' if 'nothing to do' in r.stdout else 'silent'}",
            r.returncode == 0 and "nothing to do" in r.stdout)


def flipped_shard(tmp: Path):
    save = tmp / "ckpt"
    run(tmp, ["--save", str(save), "--save-interval", "2", "--train-iters", "4"])
    shard = sorted(newest(save).glob("*.distcp"))[-1]
    flip(shard, shard.stat().st_size // 2, 256)
    r = run(tmp, ["--save", str(save), "--resume", "auto", "--train-iters", "5"])
    took = re.search(r"taking (\S+) \(step (\d+)\)", r.stdout)
    ok = r.returncode == 0 and "skipping" in r.stdout and took is not None and took.group(2) == "2"
    return ("256 flipped bytes in the newest shard: named, and --resume auto falls back to step 2",
            took.group(0) if took else (r.stdout + r.stderr)[-300:], ok)


def flipped_step(tmp: Path):
    save = tmp / "ckpt"
    run(tmp, ["--save", str(save), "--save-interval", "2", "--train-iters", "4"])
    meta = newest(save) / "checkpoint.json"
    meta.write_text(meta.read_text().replace('"step": 4', '"step": 6', 1))
    r = run(tmp, ["--load", str(newest(save)), "--train-iters", "8"])
    said = next((x for x in (r.stdout + r.stderr).splitlines() if "checkpoint.json" in x), "")
    return ("an edited step in checkpoint.json is refused, naming the file", said[-200:],
            r.returncode != 0 and "checkpoint.json" in said)


def crafted_metadata(tmp: Path):
    save = tmp / "ckpt"
    run(tmp, ["--save", str(save), "--save-interval", "2", "--train-iters", "2"])
    marker = tmp / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    (newest(save) / ".metadata").write_bytes(pickle.dumps(Payload()))
    # the manifest would catch the change first: rewrite it to the crafted file's hashes, so
    # the restricted unpickler is what stands between the file and the code
    from tests.test_checkpoint_integrity import _rehash
    _rehash(newest(save))
    r = run(tmp, ["--load", str(newest(save)), "--train-iters", "4"])
    said = next((x for x in (r.stdout + r.stderr).splitlines() if "metadata" in x.lower()), "")
    return ("a crafted .metadata (its manifest rewritten to match) fails naming the class; no code runs",
            f"marker {'CREATED' if marker.exists() else 'absent'}; {said[-160:]}",
            r.returncode != 0 and not marker.exists())


def stopped_rank(tmp: Path):
    timeout_s = 6.0
    proc, ranks, _ = start(tmp, ["--train-iters", "100000", "--distributed-timeout-minutes", str(timeout_s / 60)],
                           until="step")
    os.kill(ranks[1], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout_s + 60)
    finally:
        proc.kill()
        if Path(f"/proc/{ranks[1]}").exists():
            os.kill(ranks[1], signal.SIGKILL)
    took = time.monotonic() - t0
    line = next((x for x in err.splitlines() if "did not arrive" in x), "")
    ok = proc.returncode != 0 and took < timeout_s + 10 and "rank(s) 1" in line
    return (f"a SIGSTOPped rank ends the job within the {timeout_s:.0f} s timeout + 10 s, named",
            f"ended after {took:.1f} s: {line[:120]}", ok)


def launcher_killed(tmp: Path):
    proc, ranks, _ = start(tmp, ["--train-iters", "100000"], until="step")
    proc.kill()
    proc.wait()
    t0 = time.monotonic()
    ok = gone(ranks.values(), 10)
    for p in ranks.values():
        if Path(f"/proc/{p}").exists():
            os.kill(p, signal.SIGKILL)
    return ("SIGKILL of the launcher leaves no rank running (10 s)",
            f"ranks gone after {time.monotonic() - t0:.1f} s" if ok else "orphans left", ok)


def bad_flags(tmp: Path):
    t0 = time.monotonic()
    r = run(tmp, ["--tensor-model-parallel-size", "3", "--adam-beta2", "1.5"])
    errors = [x for x in r.stderr.splitlines() if "error:" in x]
    return ("tp vs heads and a bad Adam beta: exit 2 before any rank, one line each",
            f"rc {r.returncode} in {time.monotonic() - t0:.1f} s, {len(errors)} error lines, "
            f"{r.stderr.count('Traceback')} tracebacks", r.returncode == 2 and len(errors) >= 2 and
            "Traceback" not in r.stderr)


def ambiguous_tokens(tmp: Path):
    import numpy as np

    f = tmp / "tokens.bin"
    np.random.default_rng(0).integers(0, 256, 1 << 16).astype(np.uint32).tofile(f)  # no statement beside it
    r = run(tmp, ["--data-path", str(f), "--train-iters", "2"])
    said = next((x for x in r.stderr.splitlines() if "error:" in x), "")
    return ("a uint32 token file without a statement, read as uint16 by default: refused as ambiguous",
            said[:160], r.returncode == 2 and "ambiguous" in said)


def torn_metrics(tmp: Path):
    save = tmp / "ckpt"
    run(tmp, ["--save", str(save), "--save-interval", "2", "--train-iters", "2"])
    with open(tmp / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 1.2')  # the crash's torn line
    r = run(tmp, ["--save", str(save), "--resume", "auto", "--train-iters", "3"])
    lines = (tmp / "metrics.jsonl").read_text().splitlines()
    parsed = all(json.loads(x) for x in lines if x.strip())
    return ("a torn last metrics line is dropped with a warning, the run continues",
            f"rc {r.returncode}, {len(lines)} lines, all parse: {parsed}", r.returncode == 0 and parsed)


def unwritable_save(tmp: Path):
    r = run(tmp, ["--save", "/proc/no_such_dir/ckpt", "--train-iters", "2"])
    said = next((x for x in r.stderr.splitlines() if "error:" in x), "")
    return ("an unwritable --save: exit 2 before any rank, naming it", said[:160],
            r.returncode == 2 and "--save" in said)


CASES = {f.__name__: f for f in (async_save_killed, nan_run, resume_new_lr, nothing_to_do, flipped_shard,
                                 flipped_step, crafted_metadata, stopped_rank, launcher_killed, bad_flags,
                                 ambiguous_tokens, torn_metrics, unwritable_save)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fault_injection.json"))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(CASES)
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"fault_{name}_") as d:
            t0 = time.monotonic()
            try:
                want, got, ok = CASES[name](Path(d))
            except Exception as e:  # noqa: BLE001 - a case that breaks is a failed case, shown
                want, got, ok = "(the case itself failed)", f"{type(e).__name__}: {e}"[:200], False
            rows.append({"case": name, "expected": want, "observed": got, "ok": bool(ok),
                         "seconds": round(time.monotonic() - t0, 1)})
            print(f"{'PASS' if ok else 'FAIL'}  {name:18s} {rows[-1]['seconds']:6.1f}s  {got}", flush=True)
    print()
    print("| case | expected | observed | ok |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['expected']} | {r['observed']} | {'yes' if r['ok'] else '**no**'} |")
    import platform

    import torch
    Path(args.out).write_text(json.dumps({
        "what": "issue 20 fault-injection replay (benchmarks/fault_injection.py)", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__, "cases": rows,
        "targets": [{"name": f"{r['case']} behaves as expected", "value": int(r["ok"]), "goal": 1,
                     "higher_is_better": True} for r in rows]}, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
