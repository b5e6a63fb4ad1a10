"""Pipeline schedules on pp GPUs (pp = the world size): step time and measured bubble against theory.

    torchrun --standalone --nproc-per-node 2 benchmarks/pipeline.py
    torchrun --standalone --nproc-per-node 4 benchmarks/pipeline.py --layers 16 --microbatches 16

A Llama-3-8B-shaped model (dim 4096, 32 heads / 8 kv heads, SwiGLU 14336, vocab 128256)
with ``--layers`` layers, bf16 weights, sequence ``--seq``, ``--microbatches`` micro-batches
of one sequence per step. Schedules: 1F1B (v=1), interleaved 1F1B (v=2), zero bubble V
(ZBV, v=2), GPipe (v=1).

Baseline, measured in the same run on each GPU: the same model on one GPU without any
pipeline, the same micro-batches accumulated. Its step time over pp is the ideal step
(perfect balance, no bubble, no communication), so ``step / ideal - 1`` is the whole
pipeline overhead. The bubble each rank measures itself (``PipelineRuntime``: step time
minus time inside the stage's forward/backward methods) is reported as a fraction of its
own compute, which is what the theory (p - 1) / (v m) estimates for 1F1B and interleaved.

``--compile`` (the plan's, default "auto": compiled blocks on GPUs) applies to the baseline too:
its blocks are compiled the same way (``compiling.compile_block``), so the ideal step is that
of the same code. ``--profile`` adds, per schedule and rank, where the GPU time of two more
steps went (``kernel_timeline.py``: compute kernels, NCCL kernels and how much of them ran
beside compute, idle), the measurement that tells a slower schedule's causes apart.
``--schedules`` keeps some rows; ``--name`` names the JSON (runs under different NCCL
settings side by side). ``--pipeline-p2p nccl,copy_engine`` runs each schedule with each
P2P transport (``ParallelPlan.pipeline_p2p``; the copy engine's rows end in ``_copy_engine``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dtensor_parallel import ParallelPlan, build_mesh, parallelize
from dtensor_parallel.models import Llama, llama3_args
from dtensor_parallel.pipeline.schedules import theoretical_bubble

from common import median, write_results
from kernel_timeline import kernel_split

# (schedule, virtual stages, balanced split?). The last stage also holds the 128256-word head,
# about 2.4 layers of FLOPs, so a balanced split (balanced_split) gives the rank holding it
# about 2.4 layers fewer; an even split is run too, for 1F1B, to show what the imbalance costs.
SCHEDULES = [("1f1b", 1, True), ("1f1b", 1, False), ("interleaved_1f1b", 2, True), ("zbv", 2, True),
             ("gpipe", 1, True)]
HEAD_LAYERS = 2.4  # the head's FLOPs in layers of the 8B shape (vocab 128256, dim 4096, SwiGLU 14336)


def stage_rank(stage: int, pp: int, schedule: str) -> int:
    """The pp rank holding ``stage``: loop order (rank r holds r, r + pp, ...), or V order for
    ZBV (rank r holds r and 2pp - 1 - r)."""
    if schedule == "zbv":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def balanced_split(layers: int, pp: int, virtual: int, schedule: str) -> list[int]:
    """Layers per stage that even out the ranks' loads, the head counted as HEAD_LAYERS on the
    last stage's rank: every stage starts with one layer, then each next layer goes to the
    least-loaded rank, on its stage with the fewest layers (the earliest on ties). At pp=2 and
    8 layers this gives the splits measured since 2026-11-26: 1F1B [5, 3], interleaved
    [3, 2, 2, 1], ZBV [2, 3, 2, 1]."""
    n = pp * virtual
    if layers < n:
        raise ValueError(f"{layers} layers cannot fill {n} stages: pass --layers >= {n}")
    counts = [1] * n
    load = [0.0] * pp
    for st in range(n):
        load[stage_rank(st, pp, schedule)] += 1
    load[stage_rank(n - 1, pp, schedule)] += HEAD_LAYERS
    for _ in range(layers - n):
        r = min(range(pp), key=lambda q: (load[q], q))
        st = min((i for i in range(n) if stage_rank(i, pp, schedule) == r), key=lambda i: (counts[i], i))
        counts[st] += 1
        load[r] += 1
    return counts


def batch(args, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, vocab, (args.microbatches, args.seq + 1), device=device, generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup: int, steps: int) -> list[float]:
    out = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def compiles(args, device) -> bool:
    return args.compile == "on" or (args.compile == "auto" and device.type == "cuda")


def single_gpu_step_s(args, model_args, device) -> float:
    """The same model and micro-batches on one GPU: the no-pipeline baseline (its blocks
    compiled as the pipeline's are)."""
    from dtensor_parallel.compiling import compile_block

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(model_args)
    model.to_empty(device=device)
    model.init_weights(buffer_device=device)
    model.to(torch.bfloat16)
    if compiles(args, device):
        for block in model.layers.values():
            compile_block(block, has_ring=False)
    x, y = batch(args, model_args.vocab_size, device)

    def step():
        for i in range(args.microbatches):
            logits = model(x[i:i + 1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y[i:i + 1].flatten()) / args.microbatches
            loss.backward()
        model.zero_grad(set_to_none=True)

    times = timed(step, args.warmup, args.steps)
    del model
    return median(times)


def pipeline_row(args, model_args, schedule: str, virtual: int, split: list[int] | None, device,
                 p2p_ctas: int = 0, carveout: int = 0, p2p: str = "nccl") -> dict:
    """One schedule's row; ``p2p_ctas`` > 0 caps the pp communicator's NCCL CTAs
    (``build_mesh(nccl_max_ctas=...)``), ``carveout`` is ``plan.pipeline_sm_carveout``, ``p2p``
    ``plan.pipeline_p2p``."""
    pp = dist.get_world_size()
    mesh = build_mesh(pp=pp, dp_shard=1, nccl_max_ctas={"pp": p2p_ctas} if p2p_ctas else None)
    with torch.device("meta"):
        model = Llama(model_args)
    plan = ParallelPlan(pipeline_schedule=schedule, virtual_stages=virtual, micro_batch_size=1,
                        layers_per_stage=split, compile={"auto": "auto", "on": True, "off": False}[args.compile],
                        pipeline_sm_carveout=carveout, pipeline_p2p=p2p)
    pm = parallelize(model, mesh, plan)
    pm.init_weights(seed=0)
    for m in pm.stage_modules:
        m.to(torch.bfloat16)
    x, y = batch(args, model_args.vocab_size, device)
    bubbles, busy = [], []

    def step():
        pm.forward_backward(x, y)
        pm.zero_grad()
        bubbles.append(pm.pipeline.bubble_s)
        busy.append(pm.pipeline.busy_s)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = timed(step, args.warmup, args.steps)
    bubble, compute = median(bubbles[args.warmup:]), median(busy[args.warmup:])
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    split_rows = profile_split(step, 2) if args.profile else None
    stats = torch.tensor([bubble, compute, peak], device=device)
    gathered = [torch.zeros_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, stats)
    slots = pm.pipeline.transport.slots if pm.pipeline.transport is not None else None  # copy engine: per channel
    del pm, model
    if cuda:
        torch.cuda.empty_cache()
    extra = {"gpu_time_split_per_rank": split_rows} if split_rows is not None else {}
    return extra | {
        "impl": row_name(pp, schedule, virtual, split is not None) + variant_suffix(p2p_ctas, carveout, p2p),
        "schedule": schedule, "virtual_stages": virtual, "microbatches": args.microbatches,
        "pp_nccl_max_ctas": p2p_ctas or None, "pipeline_sm_carveout": carveout, "pipeline_p2p": p2p,
        "p2p_slots": slots,
        "layers_per_stage": split or "even",
        "shape": f"llama3-{args.flavour} dims x {args.layers} layers, seq {args.seq}, mb 1 x {args.microbatches}, bf16",
        "median_ms": 1000 * median(times),
        "bubble_ms_per_rank": [round(1000 * g[0].item(), 2) for g in gathered],
        "compute_ms_per_rank": [round(1000 * g[1].item(), 2) for g in gathered],
        "bubble_over_compute_per_rank": [round(g[0].item() / g[1].item(), 4) for g in gathered],
        "peak_mem_gib_per_rank": [round(g[2].item(), 2) for g in gathered],
        "theory_bubble_over_compute": (0.0 if schedule == "zbv"
                                       else theoretical_bubble(pp, virtual, args.microbatches)),
    }


def row_name(pp: int, schedule: str, virtual: int, balanced: bool) -> str:
    return f"pp{pp}_{schedule}_v{virtual}" + ("" if balanced else "_even")


def variant_suffix(p2p_ctas: int, carveout: int, p2p: str = "nccl") -> str:
    return ((f"_ctas{p2p_ctas}" if p2p_ctas else "") + (f"_carveout{carveout}" if carveout else "")
            + ("" if p2p == "nccl" else f"_{p2p}"))


def profile_split(step, steps: int) -> list[dict]:
    """kernel_timeline.kernel_split of ``steps`` more steps, every rank's (rank order)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    sync()
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - t0
    mine = kernel_split(prof, steps, wall)
    rows: list = [None] * dist.get_world_size()
    dist.all_gather_object(rows, mine)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--flavour", default="8B", help="'debug' for a CPU smoke run (gloo)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="the plan's compile (auto: on GPUs); the baseline's blocks alike")
    p.add_argument("--schedules", help="comma-separated row names to keep, e.g. pp2_1f1b_v1,pp2_interleaved_1f1b_v2 "
                   "(pp is the world size)")
    p.add_argument("--profile", action="store_true", help="per row: the GPU time split of 2 more steps")
    p.add_argument("--name", default="pipeline", help="results file <name>.json")
    p.add_argument("--variants", default="0:0", help="comma-separated P2P_CTAS:CARVEOUT pairs, each schedule run "
                   "under each: the pp communicator's NCCL CTA cap (0: NCCL's default) and plan.pipeline_sm_carveout")
    p.add_argument("--pipeline-p2p", default="nccl", help="comma-separated plan.pipeline_p2p values "
                   "(nccl, copy_engine, auto), each schedule and variant run under each")
    args = p.parse_args()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    model_args = llama3_args(args.flavour, n_layers=args.layers, max_seq_len=args.seq)

    pp = dist.get_world_size()
    baseline = single_gpu_step_s(args, model_args, device)
    ideal_ms = 1000 * baseline / pp
    rows = [{"impl": "single_gpu_no_pipeline", "shape": f"same model, {args.microbatches} micro-batches accumulated",
             "median_ms": 1000 * baseline, "ideal_pp_ms": ideal_ms, "pp": pp}]
    keep = set(args.schedules.split(",")) if args.schedules else None
    variants = [tuple(int(v) for v in pair.split(":")) for pair in args.variants.split(",")]
    transports = args.pipeline_p2p.split(",")
    runs = [(sch, v, balanced_split(args.layers, pp, v, sch) if bal else None, ctas, carve, p2p)
            for sch, v, bal in SCHEDULES for p2p in transports for ctas, carve in variants
            if keep is None or row_name(pp, sch, v, bal) in keep]
    for schedule, virtual, split, ctas, carve, p2p in runs:
        row = pipeline_row(args, model_args, schedule, virtual, split, device, ctas, carve, p2p)
        row["overhead_vs_ideal"] = row["median_ms"] / ideal_ms - 1
        rows.append(row)
        if dist.get_rank() == 0:
            print(f"{row['impl']:>24}: {row['median_ms']:8.1f} ms  (ideal {ideal_ms:.1f}, overhead "
                  f"{100 * row['overhead_vs_ideal']:5.1f}%)  bubble/compute per rank "
                  f"{row['bubble_over_compute_per_rank']} theory {row['theory_bubble_over_compute']:.4f}",
                  flush=True)
            for r, split_row in enumerate(row.get("gpu_time_split_per_rank") or []):
                print(f"{'':>24}  rank {r}: " + ", ".join(f"{k} {v:.1f}" for k, v in split_row.items()
                                                           if k.endswith("_ms")), flush=True)
    if dist.get_rank() == 0:
        path = write_results(args.name, rows, targets_from(rows, pp), world_size=dist.get_world_size(),
                             compile=compiles(args, device))
        print(f"wrote {path}")
    dist.barrier()
    dist.destroy_process_group()


def targets_from(rows: list[dict], pp: int) -> list[dict]:
    """Issue 24: interleaved faster than 1F1B; each schedule's measured bubble against theory
    (within 0.02) and its efficiency against the ideal step (rows that ran)."""
    by = {r["impl"]: r for r in rows}
    targets = []
    base = row_name(pp, "1f1b", 1, True)
    one = by.get(base)
    one_ce = by.get(base + "_copy_engine")
    for r in rows[1:]:
        if one_ce is not None and r["impl"] != one_ce["impl"] and r.get("pipeline_p2p") == "copy_engine":
            targets.append({"name": f"{r['impl']} step / {one_ce['impl']} step", "value": r["median_ms"]
                            / one_ce["median_ms"], "goal": 1.0, "higher_is_better": False})
        if one is not None and r["impl"] == base + "_copy_engine":
            targets.append({"name": f"{r['impl']} step / {base} step", "value": r["median_ms"] / one["median_ms"],
                            "goal": 1.0, "higher_is_better": False})
    for r in rows[1:]:
        if one is not None and r["schedule"] in ("interleaved_1f1b", "zbv"):
            targets.append({"name": f"{r['impl']} step / {base} step", "value": r["median_ms"] / one["median_ms"],
                            "goal": 1.0, "higher_is_better": False})
    for r in rows[1:]:
        targets.append({"name": f"{r['impl']}: efficiency (ideal step / step)", "value": 1 / (1 + r["overhead_vs_ideal"]),
                        "goal": None, "higher_is_better": True})
        if r["schedule"] != "zbv" and r["layers_per_stage"] != "even":
            worst = max(r["bubble_over_compute_per_rank"])
            targets.append({"name": f"{r['impl']}: measured bubble - theory (worst rank)",
                            "value": worst - r["theory_bubble_over_compute"], "goal": 0.02, "higher_is_better": False})
    return targets


if __name__ == "__main__":
    main()
