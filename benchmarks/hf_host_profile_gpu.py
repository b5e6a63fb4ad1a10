"""Where does eager TP2+SP spend its host time, transformers' Llama vs ours? (issue 18,
item 10.) torchrun --nproc-per-node 2 benchmarks/hf_host_profile_gpu.py: the throughput
benchmark's 8B-shaped, 8-layer models and plan (bf16 autocast, selective recompute), 3
warm-up steps, then 3 steps timed and 2 more under cProfile on rank 0; prints ms/step and
the Python functions with the most own time for each model. cProfile sees only the main
thread: the backward (and its recompute) runs on the autograd engine's thread and is missing
here; ``hf_tp2sp_host_gpu.py`` measures every thread's CPU time."""
import cProfile
import io
import os
import pstats
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from throughput_worker import build_ours  # noqa: E402
from train_throughput import parse_layout  # noqa: E402

rank = int(os.environ["RANK"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
args = SimpleNamespace(shape="8B", layers=8, seq=8192, compile=False, kernels="torch", microbatches=8)
lay = parse_layout("tp2sp")
for hf in (False, True):
    step = build_ours(lay, args, torch.device("cuda", rank), hf=hf)[0]
    x = torch.randint(0, 128256, (1, args.seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for _ in range(3):
        step(x, x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        step(x, x)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / 3 * 1000
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2):
        step(x, x)
    torch.cuda.synchronize()
    prof.disable()
    if rank == 0:
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats("tottime").print_stats(28)
        print(f"==== {'transformers' if hf else 'ours'}: {ms:.1f} ms/step eager, tp2sp ====")
        print("\n".join(line[:170] for line in s.getvalue().splitlines()[:45]))
    del step
    torch.cuda.empty_cache()
dist.destroy_process_group()
