"""Host-side timeline of eager TP2+SP steps without a profiler (issue 18, item 10).

    torchrun --nproc-per-node 2 benchmarks/hf_tp2sp_host_gpu.py ours|hf [steps]

The throughput benchmark's model, plan and step (automatic GC off, as there). Each timed
step records, per rank: wall time (host-synchronized), when the host finished launching
the whole step (so ``sync`` is the GPU's tail after the host
was done), and per thread of the process the CPU time it used and the time it waited
runnable on a run queue (``/proc/self/task/*/schedstat``: CPU contention), plus the CPU the
main thread ran on. Prints one summary per rank."""
import gc
import os
import statistics
import sys
import time
from collections import defaultdict
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from throughput_worker import build_ours  # noqa: E402
from train_throughput import parse_layout  # noqa: E402

rank = int(os.environ["RANK"])
world = int(os.environ["WORLD_SIZE"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
which = sys.argv[1]
n_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 12
args = SimpleNamespace(shape="8B", layers=8, seq=8192, compile=False, kernels="torch", microbatches=8)
torch.manual_seed(0)


def threads() -> dict:
    """{tid: (name, cpu_s, runqueue_wait_s)} of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                run_ns, wait_ns, _ = (int(v) for v in f.read().split())
        except OSError:
            continue
        out[tid] = (name, run_ns / 1e9, wait_ns / 1e9)
    return out


def processor() -> int:
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[36])


step = build_ours(parse_layout("tp2sp"), args, torch.device("cuda", rank), hf=which == "hf")[0]
x = torch.randint(0, 128256, (1, args.seq), generator=torch.Generator().manual_seed(1234)).cuda()

for _ in range(3):
    step(x, x)
torch.cuda.synchronize()
gc.collect()
gc.disable()
rows = []
for i in range(n_steps):
    torch.cuda.synchronize()
    th0 = threads()
    cpu0 = processor()
    t0 = time.perf_counter()
    step(x, x)
    t_host = time.perf_counter()
    torch.cuda.synchronize()
    t_end = time.perf_counter()
    th1 = threads()
    per = defaultdict(lambda: [0.0, 0.0])
    for tid, (name, run, wait) in th1.items():
        if tid in th0:
            per[name][0] += run - th0[tid][1]
            per[name][1] += wait - th0[tid][2]
    rows.append(dict(wall=t_end - t0, host=t_host - t0, tail=t_end - t_host, per=dict(per),
                     cpus=(cpu0, processor())))
gc.enable()
walls = torch.tensor([r["wall"] for r in rows], device="cuda")
dist.all_reduce(walls, op=dist.ReduceOp.MAX)
med = statistics.median(walls.tolist()) * 1e3


def m(key):
    return statistics.median(r[key] for r in rows) * 1e3


busy = defaultdict(list)
for r in rows:
    for name, (run, wait) in r["per"].items():
        busy[name].append((run, wait))
thr = sorted(((n, statistics.median(a for a, _ in v) * 1e3, statistics.median(b for _, b in v) * 1e3)
              for n, v in busy.items()), key=lambda t: -t[1])
text = (f"[{which}] rank {rank}: step {med:.1f} ms (median, max over ranks); this rank: wall {m('wall'):.1f}, "
        f"host done launching the step at {m('host'):.1f}, GPU tail "
        f"{m('tail'):.1f} ms; main thread on CPUs {sorted(set(c for r in rows for c in r['cpus']))}; affinity "
        f"{len(os.sched_getaffinity(0))} CPUs\n  per step walls " + ", ".join(f"{r['wall'] * 1e3:.0f}" for r in rows)
        + "\n  host-done " + ", ".join(f"{r['host'] * 1e3:.0f}" for r in rows)
        + "\n  threads (cpu ms, runqueue-wait ms per step): "
        + ", ".join(f"{n} {a:.1f}/{b:.1f}" for n, a, b in thr if a > 0.5 or b > 0.5) + "\n")
texts = [None] * world
dist.all_gather_object(texts, text)
if rank == 0:
    print("".join(texts), flush=True)
dist.destroy_process_group()
