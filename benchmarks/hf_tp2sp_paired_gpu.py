"""transformers' Llama against ours under eager TP2+SP, step by step in the same processes
(issue 18, item 10).

    torchrun --nproc-per-node 2 benchmarks/hf_tp2sp_paired_gpu.py [pairs] [json]

Why: the eager TP2+SP step is host-bound (the host needs ~250 ms of CPU a step to launch
~190 ms of GPU work: ``hf_tp2sp_host_gpu.py``), and the host's speed drifts between runs and
within a run on the lent machine, so one run of each model (the throughput benchmark's
rows) compares two different host speeds: the same command gave ratios from 0.76 to 1.08.
Here both models are built in the same two processes (the benchmark's model, plan and step;
automatic GC off) and their timed steps alternate, ours-hf then hf-ours, so each pair sees
the same host. Per pair: both step times (host-synchronized, max over ranks) and the CPU
time of the step's two busy threads (main and autograd) on each rank. Prints the medians
and the median of the per-pair ratios (hf tokens/s / ours tokens/s = ours ms / hf ms);
rank 0 writes them to ``json`` if given. On CPU (gloo) it runs a tiny model as a smoke test.
"""
import gc
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from throughput_worker import build_ours  # noqa: E402
from train_throughput import parse_layout  # noqa: E402

CUDA = torch.cuda.is_available()
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
if CUDA:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
else:
    dist.init_process_group("gloo")
device = torch.device("cuda", rank) if CUDA else torch.device("cpu")
pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 24
args = SimpleNamespace(shape="8B" if CUDA else "tiny", layers=8 if CUDA else 2, seq=8192 if CUDA else 256,
                       compile=False, kernels="torch", microbatches=8)
vocab = 128256 if CUDA else 512


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def cpu_seconds() -> float:
    """CPU time of this process's threads (main, autograd, NCCL watchdog ...)."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total / 1e9


steps = {}
for name in ("ours", "hf"):
    torch.manual_seed(0)
    steps[name] = build_ours(parse_layout("tp2sp"), args, device, hf=name == "hf")[0]
g = torch.Generator().manual_seed(1234)
mine = torch.randint(0, vocab, (1, args.seq + 1), generator=g)
x, y = mine[:, :-1].contiguous().to(device), mine[:, 1:].contiguous().to(device)
for name in ("ours", "hf"):
    for _ in range(3):
        steps[name](x, y)
sync()
gc.collect()
gc.disable()
ms = {"ours": [], "hf": []}
cpu = {"ours": [], "hf": []}
for i in range(pairs):
    for name in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
        sync()
        c0, t0 = cpu_seconds(), time.perf_counter()
        steps[name](x, y)
        sync()
        ms[name].append(1e3 * (time.perf_counter() - t0))
        cpu[name].append(1e3 * (cpu_seconds() - c0))
gc.enable()
t = torch.tensor([ms["ours"], ms["hf"]], dtype=torch.float64, device=device)
dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets each step
ours, hf = t[0].tolist(), t[1].tolist()
ratios = [o / h for o, h in zip(ours, hf)]
c = torch.tensor([statistics.median(cpu["ours"]), statistics.median(cpu["hf"])], dtype=torch.float64, device=device)
cs = [torch.zeros_like(c) for _ in range(world)]
dist.all_gather(cs, c)
if rank == 0:
    res = {"pairs": pairs, "ours_median_ms": statistics.median(ours), "hf_median_ms": statistics.median(hf),
           "ratio_of_medians": statistics.median(ours) / statistics.median(hf),
           "median_pair_ratio": statistics.median(ratios), "mean_pair_ratio": statistics.fmean(ratios),
           "pairs_below_0.95": sum(r < 0.95 for r in ratios),
           "cpu_ms_per_step_by_rank": {"ours": [round(v[0].item(), 1) for v in cs],
                                       "hf": [round(v[1].item(), 1) for v in cs]},
           "ours_ms": [round(v, 1) for v in ours], "hf_ms": [round(v, 1) for v in hf],
           "pair_ratios": [round(r, 3) for r in ratios]}
    print(json.dumps(res, indent=1), flush=True)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump(res, f, indent=1)
dist.destroy_process_group()
