"""Why is eager TP2+SP slower with transformers' Llama than with ours? (issue 18, item 10.)

    torchrun --nproc-per-node 2 benchmarks/hf_tp2sp_trace_gpu.py [ours,hf,...]

The throughput benchmark's 8B-shaped, 8-layer models and plan (bf16 autocast, selective
recompute, AdamW, clipping). For each variant: 3 warm-up steps, 8 timed steps
(host-synchronized, median, max over ranks), then 2 steps under torch.profiler with CPU ops
on *both* ranks, analysed here (``$OUT/trace_analysis.txt``): host<->device syncs
(cudaStreamSynchronize, DtoH copies, aten::item), the GPU's idle gaps per rank (no kernel on
any stream) and which op's launch ended each, how far the host runs ahead of the GPU
(launch -> start latency), and the host time of forward and backward. Then one step under
``torch.cuda.set_sync_debug_mode("warn")`` with the Python stack of each synchronizing call.
Gzipped Chrome traces of both ranks come back for the first two variants. Automatic GC
stays on here (the benchmark turns it off), and the variants share one process one after
the other: compare its timings within a call only. On CPU (gloo) it runs a tiny model as a
smoke test.

Variants: ``ours`` (our Llama), ``hf`` (LlamaForCausalLM, its built-in plan), ``hf_seqembed``
(the built-in plan with the embedding reduce-scattered on the sequence, as ours, and no slice
at layer 0: positions come from ParallelModel's ``position_ids``).
"""
import collections
import gzip
import json
import os
import shutil
import statistics
import sys
import time
import traceback
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import dtensor_parallel.plans as plans  # noqa: E402
from throughput_worker import build_ours  # noqa: E402
from train_throughput import parse_layout  # noqa: E402

rank = int(os.environ["RANK"])
world = int(os.environ["WORLD_SIZE"])
CUDA = torch.cuda.is_available()
if CUDA:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
else:  # a CPU smoke run of this script: tiny model, gloo
    dist.init_process_group("gloo")
DEV = torch.device("cuda", rank) if CUDA else torch.device("cpu")
OUT = os.environ.get("OUT", "gpu_out")
os.makedirs(OUT, exist_ok=True)
args = SimpleNamespace(shape="8B" if CUDA else "tiny", layers=8 if CUDA else 2, seq=8192 if CUDA else 256,
                       compile=False, kernels="torch", microbatches=8)
lay = parse_layout("tp2sp")
variants = (sys.argv[1] if len(sys.argv) > 1 else "ours,hf,hf_seqembed").split(",")
report: list[str] = []

_builtin_hf_plan = plans.hf_plan


def sync():
    if CUDA:
        torch.cuda.synchronize()


def seqembed_plan(model, sequence_parallel=False):
    p = _builtin_hf_plan(model, sequence_parallel)
    if sequence_parallel:
        p["rules"]["model.embed_tokens"] = "embedding"  # Shard(1): reduce-scatter, as ours
        p["rules"].pop("model.layers.0", None)
    return p


SYNC_RUNTIME = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                "cudaMemcpyAsync", "cudaStreamWaitEvent", "cudaMalloc", "cudaFree", "cudaHostAlloc")
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal",
            "aten::tolist", "aten::masked_select", "aten::unique", "aten::repeat_interleave")


def analyse(trace_path: str, name: str, steps: int) -> str:
    with open(trace_path) as f:
        ev = json.load(f)["traceEvents"]
    xs = [e for e in ev if e.get("ph") == "X"]
    gpu = [e for e in xs if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    rt = [e for e in xs if e.get("cat") == "cuda_runtime" or e.get("cat") == "cuda_driver"]
    ops = [e for e in xs if e.get("cat") == "cpu_op"]
    user = [e for e in xs if e.get("cat") == "user_annotation" and e["name"].startswith("dtp_step")]
    lines = [f"== {name} rank {rank}: {len(gpu)} GPU events, {len(rt)} runtime calls, {len(ops)} cpu ops"]
    # runtime calls that can block the host / drain the queue
    agg = collections.defaultdict(lambda: [0, 0.0])
    for e in rt:
        if e["name"] in SYNC_RUNTIME:
            agg[e["name"]][0] += 1
            agg[e["name"]][1] += e["dur"]
    for e in ops:
        if e["name"] in SYNC_OPS:
            agg[e["name"]][0] += 1
            agg[e["name"]][1] += e["dur"]
    lines.append("  sync-prone calls per step: " + ", ".join(
        f"{k} x{v[0] / steps:g} {v[1] / steps / 1e3:.2f} ms" for k, v in sorted(agg.items())))
    # GPU busy (any stream) and compute-only busy
    def union(evs):
        iv = sorted((e["ts"], e["ts"] + e["dur"], e) for e in evs)
        merged = []
        for s, t, e in iv:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], t)
            else:
                merged.append([s, t, e])
        return merged
    steps_iv = sorted((u["ts"], u["ts"] + u["dur"]) for u in user)
    if not gpu or not steps_iv:
        return "\n".join(lines) + "\n"
    t0, t1 = steps_iv[0][0], steps_iv[-1][1]
    lines.append(f"  host span of the {steps} steps: {(t1 - t0) / 1e3 / steps:.1f} ms/step; per step "
                 + ", ".join(f"{(b - a) / 1e3:.1f}" for a, b in steps_iv))
    allm = union(gpu)
    comp = union([e for e in gpu if "nccl" not in e["name"].lower()])
    busy_all = sum(t - s for s, t, _ in allm if s >= t0) / 1e3 / steps
    busy_comp = sum(t - s for s, t, _ in comp if s >= t0) / 1e3 / steps
    lines.append(f"  GPU busy (any stream) {busy_all:.1f} ms/step; compute (non-NCCL) busy {busy_comp:.1f} ms/step")
    # idle gaps of the whole GPU, and the op whose launch ended each
    corr_rt = {e["args"].get("correlation"): e for e in rt if "args" in e}
    ops_sorted = sorted(ops, key=lambda e: e["ts"])
    starts = [e["ts"] for e in ops_sorted]
    import bisect

    def enclosing(ts, tid):
        i = bisect.bisect_right(starts, ts) - 1
        best = None
        while i >= 0 and i > bisect.bisect_right(starts, ts) - 4000:
            e = ops_sorted[i]
            if e.get("tid") == tid and e["ts"] <= ts <= e["ts"] + e["dur"]:
                if best is None or e["ts"] > best["ts"]:
                    best = e
            i -= 1
        return best
    gaps = []
    for (s0, e0, _), (s1, e1, ev1) in zip(allm, allm[1:]):
        g = s1 - e0
        if g > 20 and s1 >= t0:
            gaps.append((g, e0, ev1))
    tot = sum(g for g, _, _ in gaps) / 1e3 / steps
    lines.append(f"  GPU idle gaps > 20 us (no kernel on any stream): {len(gaps) / steps:g}/step, {tot:.1f} ms/step")
    hist = collections.Counter()
    for g, e0, ev1 in gaps:
        r = corr_rt.get(ev1.get("args", {}).get("correlation"))
        op = enclosing(r["ts"], r.get("tid")) if r else None
        hist[op["name"] if op else "?"] += g
    lines.append("  idle time by the op launching the kernel after the gap (ms/step): " + ", ".join(
        f"{k} {v / 1e3 / steps:.2f}" for k, v in hist.most_common(12)))
    for g, e0, ev1 in sorted(gaps, key=lambda x: -x[0])[:12]:
        r = corr_rt.get(ev1.get("args", {}).get("correlation"))
        op = enclosing(r["ts"], r.get("tid")) if r else None
        launched = (r["ts"] - t0) / 1e3 if r else float("nan")
        lines.append(f"    gap {g / 1e3:7.2f} ms at +{(e0 - t0) / 1e3:8.2f} ms, next {ev1['name'][:60]!r} "
                     f"launched at +{launched:8.2f} ms by {op['name'] if op else '?'}")
        # a host call that waited for the GPU to drain ends just after the GPU went idle
        for w in rt:
            end = w["ts"] + w["dur"]
            if w["dur"] > 20 and e0 - 10 <= end <= e0 + 300:
                wop = enclosing(w["ts"], w.get("tid"))
                lines.append(f"      host {w['name']} {w['dur'] / 1e3:.2f} ms ending at +{(end - t0) / 1e3:.2f} ms "
                             f"in {wop['name'] if wop else '?'}")
    # how far ahead of the GPU the host is: launch -> kernel start
    lat = []
    for e in gpu:
        r = corr_rt.get(e.get("args", {}).get("correlation"))
        if r is not None and e["ts"] >= t0:
            lat.append(((e["ts"] - r["ts"]) / 1e3, r["ts"]))
    lat.sort(key=lambda x: x[1])
    if lat:
        n = len(lat)
        for lab, part in (("first third", lat[: n // 3]), ("middle third", lat[n // 3: 2 * n // 3]),
                          ("last third", lat[2 * n // 3:])):
            v = sorted(x for x, _ in part)
            lines.append(f"  launch->start latency, {lab} of launches: median {v[len(v) // 2]:.2f} ms, "
                         f"p10 {v[len(v) // 10]:.2f} ms, share < 0.05 ms {sum(x < 0.05 for x in v) / len(v):.2f}")
    # host: forward vs backward (first autograd engine event of each step)
    bw = sorted(e["ts"] for e in ops if e["name"].startswith("autograd::engine::evaluate_function"))
    for a, b in steps_iv:
        first_bw = next((t for t in bw if a <= t <= b), None)
        opt = next((e for e in ops if e["name"].startswith("Optimizer.step") and a <= e["ts"] <= b), None)
        if first_bw:
            lines.append(f"  step host: forward {(first_bw - a) / 1e3:.1f} ms, backward..optimizer "
                         f"{((opt['ts'] if opt else b) - first_bw) / 1e3:.1f} ms, total {(b - a) / 1e3:.1f} ms")
    # top cpu ops by total self-inclusive time per step (host cost)
    return "\n".join(lines) + "\n"


def sync_debug_step(step, x, name):
    seen = collections.Counter()
    stacks = {}
    old = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        st = "".join(traceback.format_stack(limit=14)[:-2])
        key = (str(message)[:80], st)
        seen[key] += 1
        stacks[key] = st

    warnings.showwarning = show
    warnings.simplefilter("always")
    if CUDA:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        step(x, x)
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old
    out = [f"== {name} rank {rank}: sync debug mode, one step: {sum(seen.values())} synchronizing calls"]
    for (msg, st), n in seen.most_common(10):
        out.append(f"  x{n}: {msg}\n" + "\n".join("      " + s for s in st.splitlines()[-16:]))
    return "\n".join(out) + "\n"


for variant in variants:
    plans.hf_plan = seqembed_plan if variant == "hf_seqembed" else _builtin_hf_plan
    torch.manual_seed(0)
    step0 = build_ours(lay, args, DEV, hf=variant != "ours")[0]

    def step(x, y, _s=step0):
        with torch.profiler.record_function("dtp_step"):
            return _s(x, y)

    vocab = 128256 if CUDA else 512
    x = torch.randint(0, vocab, (1, args.seq), generator=torch.Generator().manual_seed(0)).to(DEV)
    losses = [float(step(x, x)) for _ in range(3)]
    sync()
    times = []
    for _ in range(8):
        sync()
        t0 = time.perf_counter()
        step(x, x)
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    med = torch.tensor([statistics.median(times)], device=DEV)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    head = (f"#### {variant}: {med.item():.1f} ms/step (median of 8, max over ranks); warm-up losses {losses}; "
            f"rank {rank} steps " + ", ".join(f"{t:.1f}" for t in times) + "\n")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(2):
            step(x, x)
        sync()
    path = f"/tmp/trace_{variant}_r{rank}.json"
    prof.export_chrome_trace(path)
    text = head + analyse(path, variant, 2)
    text += sync_debug_step(step, x, variant)
    if variant in ("ours", "hf"):
        with open(path, "rb") as f, gzip.open(f"{OUT}/trace_{variant}_r{rank}.json.gz", "wb", compresslevel=6) as g:
            shutil.copyfileobj(f, g)
    texts = [None] * world
    dist.all_gather_object(texts, text)
    if rank == 0:
        block = "".join(texts)
        print(block, flush=True)
        report.append(block)
        with open(f"{OUT}/trace_analysis.txt", "w") as f:
            f.write("\n".join(report))
    del step0, step
    if CUDA:
        torch.cuda.empty_cache()
dist.destroy_process_group()
