"""Predicted peak memory (dtensor_parallel.memory) against torch.cuda.max_memory_allocated.

Run on 2 GPUs (each configuration is a few real training steps of a Llama-3-8B-shaped
model with fewer layers, bf16):

    torchrun --standalone --nproc-per-node 2 benchmarks/memory_estimate.py

Each row: the estimator's peak for rank 0 and the measured peak of the steady-state steps
(2 and 3: AdamW state exists, gradients are set to None between steps), the largest over
the ranks; plus the memory right after initialization (fp32 weights + buffers) against the
estimator's weight bytes. Target: |predicted / measured - 1| <= 0.10 on every row. A
configuration that fails becomes a row with its error; the script never crashes.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, without PYTHONPATH
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from dtensor_parallel import ParallelPlan, build_mesh, parallelize  # noqa: E402
from dtensor_parallel.memory import GIB, estimate_memory  # noqa: E402
from dtensor_parallel.mesh import ParallelDims  # noqa: E402
from dtensor_parallel.models.llama import Llama, llama3_args  # noqa: E402
from dtensor_parallel.trainer.schedule import build_optimizer  # noqa: E402

SEQ = int(os.environ.get("MEMORY_ESTIMATE_SEQ", 4096))
LAYERS = 4
FLAVOUR = os.environ.get("MEMORY_ESTIMATE_FLAVOUR", "8B")  # "debug": a CPU smoke run of the script (gloo)
CUDA = torch.cuda.is_available()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()
STEPS = 3
TARGET = 0.10

# name, degrees (world 2), plan fields, micro-batch size, micro-batches a step
CONFIGS = [
    ("fsdp2", dict(dp_shard=2), dict(), 1, 1),
    ("fsdp2_selective", dict(dp_shard=2), dict(recompute="selective"), 1, 1),
    ("fsdp2_full_mbs2x2", dict(dp_shard=2), dict(recompute="full"), 2, 2),
    ("tp2_sp", dict(dp_shard=1, tp=2), dict(sequence_parallel=True), 1, 1),
    ("tp2_sp_full", dict(dp_shard=1, tp=2), dict(sequence_parallel=True, recompute="full"), 1, 1),
]


def run_config(name, degrees, plan_fields, mbs, n_micro, device) -> dict:
    world = dist.get_world_size()
    args = llama3_args(FLAVOUR, n_layers=LAYERS, max_seq_len=SEQ)
    dims = ParallelDims(**degrees, world_size=world)
    plan = ParallelPlan(mixed_precision="bf16", micro_batch_size=mbs, global_batch_size=mbs * n_micro * dims.dp,
                        **plan_fields)
    est = estimate_memory(args, dims, plan, seq_len=SEQ, micro_batch_size=mbs, n_micro=n_micro)
    row = {"impl": name, "shape": f"{FLAVOUR}-shaped x{LAYERS} layers, seq {SEQ}, mbs {mbs} x {n_micro}",
           "degrees": degrees, "plan": plan_fields, "predicted_gib": est.peak_bytes / GIB,
           "predicted_phase": est.peak_phase, "predicted_weights_gib": (est.param_bytes + est.buffer_bytes) / GIB,
           "predicted_breakdown_gib": {k: v / GIB for k, v in est.breakdown().items()}}
    mesh = build_mesh(**degrees)
    with torch.device("meta"):
        model = Llama(args)
    pm = parallelize(model, mesh, plan)
    pm.init_weights(seed=0)
    _sync()
    after_init = torch.cuda.memory_allocated(device) if CUDA else 0
    opt = build_optimizer(pm.named_parameters(), lr=1e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(pm.dp_rank)
    x = torch.randint(0, args.vocab_size, (mbs * n_micro, SEQ + 1), generator=g)
    times = []
    peak = 0
    for step in range(STEPS):
        if step == 1 and CUDA:  # steady state: AdamW state exists from here on
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        loss = pm.forward_backward(x[:, :-1], x[:, 1:])
        pm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) if CUDA else 1
    stats = torch.tensor([peak, after_init], dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    measured, init = stats.tolist()
    row.update(measured_gib=measured / GIB, measured_after_init_gib=init / GIB,
               ratio=est.peak_bytes / measured, loss=float(loss), step_s=times[-1])
    del pm, model, opt, loss
    return row


def main() -> int:
    if not CUDA and FLAVOUR != "debug":
        print("memory_estimate: needs CUDA GPUs (torchrun --nproc-per-node 2); MEMORY_ESTIMATE_FLAVOUR=debug "
              "smoke-tests the script on CPU")
        return 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if CUDA:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if CUDA else torch.device("cpu")
    backend, extra = ("nccl", {"device_id": device}) if CUDA else ("gloo", {})
    if "RANK" in os.environ:
        dist.init_process_group(backend, **extra)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **extra)
    world = dist.get_world_size()
    rows = []
    for name, degrees, plan_fields, mbs, n_micro in CONFIGS:
        need = 1
        for v in degrees.values():
            need *= v
        if need != world:
            rows.append({"impl": name, "error": f"needs {need} ranks, world is {world}: run under "
                                                f"torchrun --nproc-per-node {need}"})
            if dist.get_rank() == 0:
                print(f"{name}: {rows[-1]['error']}", flush=True)
            continue
        try:
            row = run_config(name, degrees, plan_fields, mbs, n_micro, device)
        except Exception as e:  # a row, not a crash
            row = {"impl": name, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=4)}
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        rows.append(row)
        if dist.get_rank() == 0:
            msg = (f"{name}: predicted {row['predicted_gib']:.2f} GiB ({row['predicted_phase']}), measured "
                   f"{row['measured_gib']:.2f} GiB, ratio {row['ratio']:.3f}; after init {row['measured_after_init_gib']:.2f}"
                   f" vs {row['predicted_weights_gib']:.2f} GiB") if "error" not in row else f"{name}: {row['error']}"
            print(msg, flush=True)
    errs = [abs(r["ratio"] - 1) for r in rows if "ratio" in r]
    targets = [{"name": "max |predicted / measured - 1| of peak memory", "value": max(errs) if errs else None,
                "goal": TARGET, "higher_is_better": False}]
    if dist.get_rank() == 0:
        path = write_results("memory_estimate", rows, targets, world_size=world)
        print(f"wrote {path}; max error {targets[0]['value']}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
