"""The worker of ``train_throughput.py``: one (framework, layout, kernels, compile, fused loss)
config under torchrun. It builds the model with our library or TorchTitan
(``torchtitan_adapter``), times warm-up and measured steps, optionally profiles, measures
one more step's memory by phase (``phase_memory.py``; not under PP), and writes one JSON row."""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import math
import os
import signal
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from train_throughput import (PEAK_FLOPS, SHAPES, Layout, RunConfig, config_slug, flops_per_token, model_args, parse_layout,
                              stage_layers)


def _sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_llama(margs, seq: int, device):
    """transformers' LlamaForCausalLM of our Llama's shape (fp32, random init on ``device``;
    default RoPE: the Llama 3.1 frequency scaling changes no FLOP)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=margs.vocab_size, hidden_size=margs.dim, intermediate_size=margs.ffn_hidden_dim,
        num_hidden_layers=margs.n_layers, num_attention_heads=margs.n_heads, num_key_value_heads=margs.n_kv_heads,
        max_position_embeddings=seq, rms_norm_eps=margs.norm_eps, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": margs.rope_theta})
    with torch.device(device):
        return transformers.LlamaForCausalLM(cfg).float()


def build_ours(lay: Layout, args, device, hf: bool = False):
    """Our library: build_mesh -> meta Llama -> parallelize -> AdamW; a step function and the
    root module (for the phase marks; None under PP). ``hf``: the same with transformers'
    LlamaForCausalLM (no rules: its built-in plan)."""
    import torch
    from dtensor_parallel import ParallelPlan, build_mesh, parallelize
    from dtensor_parallel.models import Llama

    mesh = build_mesh(pp=lay.pp, dp_shard=lay.dp_shard, cp=lay.cp, tp=lay.tp)
    if hf:
        model = hf_llama(model_args(args.shape, args.layers, args.seq), args.seq, device)
    else:
        with torch.device("meta"):
            model = Llama(model_args(args.shape, args.layers, args.seq))
    n_micro = args.microbatches if lay.pp > 1 else 1
    kernels = {f: "triton" for f in lay.triton_families} if args.kernels == "triton" else "torch"
    if args.kernels == "sdpa":  # the ring's blocks through PyTorch's fused attention ops
        kernels = {"attention": "sdpa"}
    fused_loss = getattr(args, "fused_loss", False)  # (the hf_*_gpu.py scripts' arguments have none)
    policy = getattr(args, "selective_policy", "save_matmuls")
    plan = ParallelPlan(sequence_parallel=lay.sp, recompute="selective", compile=args.compile,
                        selective_policy=policy, kernels=kernels, fused_loss=fused_loss, mixed_precision="bf16", micro_batch_size=1,
                        global_batch_size=n_micro * lay.dp_shard,
                        pipeline_schedule="1f1b" if lay.pp > 1 else None,
                        layers_per_stage=stage_layers(args.layers, lay.pp) if lay.pp > 1 else None)
    pm = parallelize(model, mesh, plan)
    if not hf:
        pm.init_weights(seed=0)
    moments = getattr(args, "moments", "fp32")
    if moments == "bf16":  # ours: the moments in bf16, one Triton kernel a parameter
        from dtensor_parallel.adamw import AdamW
        opt = AdamW(pm.parameters(), lr=8e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, state_dtype="bf16")
    else:
        opt = torch.optim.AdamW(pm.parameters(), lr=8e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                fused=True)

    def step(x, y, mark=lambda phase: None):
        loss = pm.forward_backward(x, y)
        mark("backward")
        pm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer")
        return loss

    fsdp = lay.dp_shard * lay.cp > 1  # parallelize applies FSDP over dp_shard x cp
    info = {"autocast": "FSDP MixedPrecisionPolicy(bf16, fp32)" if fsdp else "torch.autocast(bf16) (no FSDP)",
            "plan_kernels": plan.kernels, "adamw_moments": moments}
    if not hf:  # the memory estimator's peak for this config (issue 23: within 10% of the measured peak)
        from dtensor_parallel.mesh import ParallelDims
        from dtensor_parallel.planning.memory import estimate_memory

        dims = ParallelDims(pp=lay.pp, dp_shard=lay.dp_shard, cp=lay.cp, tp=lay.tp, world_size=lay.world_size)
        est = max((estimate_memory(model_args(args.shape, args.layers, args.seq), dims, plan, seq_len=args.seq,
                                   micro_batch_size=1, n_micro=n_micro, pp_rank=r,
                                   optimizer="bf16_moments" if moments == "bf16" else "fused",
                                   pipeline_p2p=pm.pipeline.p2p if pm.pipeline is not None else "nccl")
                   for r in range(lay.pp)),
                  key=lambda e: e.peak_bytes)
        info.update(predicted_peak_gib=est.peak_bytes / 2**30, predicted_phase=est.peak_phase)
    return step, (lambda t: float(t)), pm.dp_rank, pm.dp_size, info, (pm.module if lay.pp == 1 else None)


def busy_ms(prof, steps: int) -> float:
    """Milliseconds a step in which at least one kernel or copy ran on the GPU (the union of
    their intervals, every stream): against the step time, what the GPU idled."""
    import torch

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / 1e3 / steps


def profile_summary(prof, cuda: bool, steps: int, rows: int = 40) -> tuple[str, float, float]:
    """Top ``rows`` kernels by device time (CPU ops on CPU); (table, NCCL ms/step, all ms/step).
    On the GPU, record_function ranges mirrored there ("Optimizer.step#AdamW.step", c10d's
    "nccl:all_gather...") are left out: they span kernels already counted (counting them
    doubled the NCCL time of the eager TP2+SP profile of 2026-11-30)."""
    import torch

    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    ranges = {e.name for e in prof.events() if cuda and getattr(e, "is_user_annotation", False)}
    events = sorted((e for e in prof.key_averages()
                     if e.device_type == kind and getattr(e, attr) > 0 and e.key not in ranges),
                    key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events) / 1e3 / steps
    nccl = sum(getattr(e, attr) for e in events if "nccl" in e.key.lower()) / 1e3 / steps
    lines = [f"{'ms/step':>9} {'%':>6} {'calls':>6}  kernel"]
    for e in events[:rows]:
        ms = getattr(e, attr) / 1e3 / steps
        lines.append(f"{ms:9.2f} {100 * ms / total:6.2f} {e.count // steps:6d}  {e.key[:120]}")
    return "\n".join(lines) + "\n", nccl, total


def init_worker():
    """The process group of this torchrun (NCCL on GPUs, gloo on CPU); returns the device."""
    import torch
    import torch.distributed as dist

    faulthandler.register(signal.SIGTERM, chain=True)  # a timed-out run logs where it hung
    if not torch.cuda.is_available():
        dist.init_process_group("gloo")
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    return device


def timed_steps(step, x, y, args, label: str) -> tuple[list[float], list]:
    """Warm-up, then timed steps (host-synchronized wall time); the peak memory counters
    restart after the warm-up."""
    import torch

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        _sync()
        t0 = time.perf_counter()
        losses.append(step(x, y))
        _sync()
        times.append(time.perf_counter() - t0)
        if label:
            print(f"{label} step {i + 1}: {1e3 * times[-1]:.1f} ms", flush=True)
    return times, losses


def profile_steps(step, x, y, header: str, n: int = 2) -> str:
    """torch.profiler over n more steps: every rank's step time, NCCL and total kernel time and
    GPU busy time (:func:`busy_ms`), and every rank's top kernels (``DTP_PROFILE_ROWS``, 40)."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    _sync()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            step(x, y)
        _sync()
    wall = (time.perf_counter() - t0) * 1e3 / n
    table, nccl_ms, total_ms = profile_summary(prof, cuda, steps=n, rows=int(os.environ.get("DTP_PROFILE_ROWS", 40)))
    busy = busy_ms(prof, n) if cuda else float("nan")
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, (dist.get_rank(), wall, nccl_ms, total_ms, busy, table))
    return (f"{header}: {n} profiled steps\n"
            + "".join(f"rank {r}: step {w:.1f} ms (profiled), GPU busy {u:.1f} ms/step, NCCL kernels {a:.1f} "
                      f"ms/step (overlapped or not) of {b:.1f} ms/step of kernels\n"
                      for r, w, a, b, u, _ in per_rank)
            + "".join(f"rank {r}:\n{t}" for r, *_, t in per_rank))


def phase_rows(step, x, y, root) -> list[dict] | None:
    """One more step's memory by phase (``phase_memory.py``), the fullest rank's at each mark;
    None without a root module (PP: forward and backward interleave)."""
    import torch
    import torch.distributed as dist
    from phase_memory import measure_phases

    if root is None:
        return None
    rows = measure_phases(step, x, y, root)
    if torch.cuda.is_available():
        t = torch.tensor([[r["allocated_gib"], r["peak_gib"]] for r in rows], device="cuda", dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rows = [{**r, "allocated_gib": a, "peak_gib": p} for r, (a, p) in zip(rows, t.tolist())]
    return rows


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    t_start = time.perf_counter()
    device = init_worker()
    cuda, rank, world = device.type == "cuda", dist.get_rank(), dist.get_world_size()
    lay = parse_layout(args.layout)
    n_micro = args.microbatches if lay.pp > 1 else 1
    margs = model_args(args.shape, args.layers, args.seq)
    cfg = RunConfig(args.framework, args.layout, args.kernels, args.compile, args.fused_loss, args.selective_policy,
                    args.moments)
    torch.manual_seed(0)  # TorchTitan initializes from the global RNG
    if args.framework in ("ours", "hf"):
        step, global_loss, dp_rank, dp_size, info, root = build_ours(lay, args, device, hf=args.framework == "hf")
    else:
        import torchtitan_adapter
        run = torchtitan_adapter.build(lay, dims=SHAPES[args.shape], n_layers=args.layers, seq=args.seq,
                                       n_micro=n_micro, compile=args.compile,
                                       stage_layers=stage_layers(args.layers, lay.pp) if lay.pp > 1 else None,
                                       device=device, async_tp=args.kernels == "async_tp")
        step, global_loss, dp_rank, dp_size, info, root = (run.step, run.global_loss, run.dp_rank, run.dp_size,
                                                           run.info, run.root)
    global_batch = n_micro * dp_size
    g = torch.Generator().manual_seed(1234)  # the same tokens for both frameworks
    mine = torch.randint(0, margs.vocab_size, (global_batch, args.seq + 1), generator=g).chunk(dp_size)[dp_rank]
    x, y = mine[:, :-1].contiguous().to(device), mine[:, 1:].contiguous().to(device)
    label = f"[{cfg.key}]" if rank == 0 else ""
    if label:
        print(f"{label} built in {time.perf_counter() - t_start:.1f} s", flush=True)

    gc.collect()
    gc.disable()  # both frameworks alike (TorchTitan's trainer also turns automatic GC off)
    times, losses = timed_steps(step, x, y, args, label)
    prof_text = profile_steps(step, x, y, cfg.key) if args.profile else None
    # the step-level peaks (since the warm-up), read before the phase step restarts the counters
    mem = [torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30] if cuda else [0, 0]
    phases = phase_rows(step, x, y, root)
    gc.enable()
    dynamo = {"dynamo_graphs": counters["stats"].get("unique_graphs", 0),  # 0 under compile: ran eagerly
              "dynamo_graph_breaks": sum(counters["graph_break"].values())}
    # every rank takes part in these all-reduces (inside `if rank == 0` below they hung
    # TorchTitan's CP2 run, whose loss is reduced over a mesh)
    step_losses = [global_loss(v) for v in losses]
    loss_first, loss_last = step_losses[0], step_losses[-1]
    stats = torch.tensor([statistics.median(times[args.warmup:]), *mem], device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank, the fullest GPU
    if rank == 0:
        step_s, f = stats[0].item(), flops_per_token(margs, args.seq)
        tokens_step = global_batch * args.seq
        tps_gpu = tokens_step / step_s / world
        row = {"impl": cfg.key, **asdict(cfg), "status": "ok", "world_size": world,
               "device": torch.cuda.get_device_name() if cuda else "cpu",
               "shape": f"llama3-{args.shape} dims x {args.layers} layers, seq {args.seq}, "
                        f"{global_batch} seqs/step ({n_micro} micro-batches/rank), bf16",
               "n_layers": args.layers, "params": margs.num_params(), "global_batch": global_batch,
               "micro_batches": n_micro, "tokens_per_step": tokens_step,
               "median_ms": 1e3 * step_s, "step_ms": [round(1e3 * t, 2) for t in times],
               "tokens_per_s": tokens_step / step_s, "tokens_per_s_per_gpu": tps_gpu,
               "tflops_per_gpu": tps_gpu * f["total"] / 1e12,
               "mfu": tps_gpu * f["total"] / PEAK_FLOPS if cuda else None,
               "mfu_causal": tps_gpu * f["total_causal"] / PEAK_FLOPS if cuda else None,
               "peak_allocated_gib": stats[1].item() if cuda else None,
               "peak_reserved_gib": stats[2].item() if cuda else None,
               # one more step: allocated at each mark and the peak since the previous one (GiB)
               "phases": phases, "phases_note": None if phases is not None else
               "no phases under PP (1F1B interleaves forward and backward): the step's peak only",
               "loss_first": loss_first, "loss_last": loss_last,
               "losses": [round(v, 4) for v in step_losses],  # every step's (read after timing)
               "loss_finite": math.isfinite(loss_first) and math.isfinite(loss_last), **dynamo, **info}
        Path(args.result).write_text(json.dumps(row) + "\n")
        if prof_text is not None:
            (Path(os.environ["OUT"]) / f"profile_{config_slug(cfg)}.txt").write_text(prof_text)
    dist.barrier()
    dist.destroy_process_group()



def worker_args(argv: list[str]):
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    for name in ("framework", "layout", "kernels", "shape", "result"):
        p.add_argument(f"--{name}", required=True)
    for name in ("layers", "seq", "microbatches", "warmup", "steps"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fused-loss", action="store_true")
    p.add_argument("--selective-policy", default="save_matmuls")
    p.add_argument("--moments", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--profile", action="store_true")
    return p.parse_args(argv)
