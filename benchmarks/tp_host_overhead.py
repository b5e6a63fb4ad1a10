"""Host (CPU) time of an eager TP2+SP training step, split by phase and per decoder layer
(issues 23 and 24: eager TP is host-bound on H200s).

    python benchmarks/tp_host_overhead.py --label before            # CPU: 2 gloo ranks + 1-rank baseline
    python benchmarks/tp_host_overhead.py --device cuda --label gpu  # 2 GPUs (NCCL), same tiny model

Host overhead is per-op dispatch work (Python hooks, DTensor sharding propagation, autograd,
checkpointing), independent of tensor sizes, so a Llama of the library's op structure at a
tiny width (compute negligible) measures it on any machine. Each config runs eager with the
throughput benchmark's plan (SP, selective recompute, bf16 autocast, fused/for-each AdamW,
clip) and times, per step on rank 0, the wall clock of:

- ``forward``: the root module's call (pre- to post-forward hook);
- ``backward``: the rest of ``forward_backward`` (loss, backward incl. the recompute, the
  partial-gradient reductions);
- ``clip``: ``clip_grad_norm_``; ``optimizer``: ``step`` and ``zero_grad``.

On CPU the autograd engine runs backward on the calling thread, so the wall clock is the
host time; on CUDA the step is synchronized only at its end (host-bound at this width).
Beside each wall time, the calling thread's CPU time (``cpu_ms_*``): on CPU it is the host
work itself, without the waits for the peer rank and for other processes on the cores (on
CUDA it misses the autograd thread's backward: read the wall time there).
Per layer: the slope between two layer counts, (T(L2) - T(L1)) / (L2 - L1), so the
embedding, head and loss drop out and no per-layer hooks perturb the timing.

The profile (rank 0, the larger layer count): torch.profiler's CPU ops (both threads on
CUDA) by self time, and on CPU a cProfile of the same steps grouped by where the Python
time is spent: our package, torch's DTensor, checkpointing, the rest of torch. Gloo
collectives at tiny sizes cost latency that NCCL does not (its launch is the host cost), so
the profile's communication ops are reported apart.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

PHASES = ("forward", "backward", "clip", "optimizer", "step")
CPU_PHASES = tuple(f"cpu_{p}" for p in PHASES)
NAME = "tp_host_overhead_cpu"
#: cProfile time grouped by the file a function lives in (first match wins)
ORIGINS = (("ours", "dtensor_parallel/"), ("torch DTensor", "torch/distributed/tensor/"),
           ("torch checkpoint", "torch/utils/checkpoint"), ("torch functional collectives", "_functional_collectives"),
           ("torch autograd", "torch/autograd/"), ("torch nn", "torch/nn/"), ("torch optim", "torch/optim/"),
           ("torch other", "torch/"), ("builtins (C++: ops, dispatch)", "{"))


def tiny_args(dim: int, layers: int, seq: int):
    from dtensor_parallel.models.llama import ModelArgs

    return ModelArgs(dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden=2 * dim,
                     rope_theta=10000.0, rope_scaling_factor=None, max_seq_len=seq)


def build(world: int, args, device: torch.device, opts):
    from dtensor_parallel import ParallelPlan, build_mesh, parallelize
    from dtensor_parallel.models import Llama

    mesh = build_mesh(tp=world, dp_shard=1, device_type=device.type)
    with torch.device("meta"):
        model = Llama(args)
    kernels = {"sp_reduce_scatter": opts.kernels}  # (triton: the fused SP all-gather and reduce-scatter)
    plan = ParallelPlan(sequence_parallel=world > 1, recompute=opts.recompute, compile=False, kernels=kernels,
                        mixed_precision=opts.precision)
    pm = parallelize(model, mesh, plan)
    pm.init_weights(seed=0)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    return pm, opt


def timed_step(pm, opt, x, y, marks: dict, cuda: bool) -> dict[str, float]:
    """Per phase: wall ms and the calling thread's CPU ms (``cpu_<phase>``: robust to other
    processes on the cores; on CPU the backward runs on this thread too)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    pm.forward_backward(x, y)
    t1, c1 = time.perf_counter(), time.thread_time()
    pm.clip_grad_norm_(1.0)
    t2, c2 = time.perf_counter(), time.thread_time()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3, c3 = time.perf_counter(), time.thread_time()
    if cuda:
        torch.cuda.synchronize()
    t4, c4 = time.perf_counter(), time.thread_time()
    ms = lambda a, b: 1e3 * (b - a)  # noqa: E731
    return {"forward": ms(marks["f0"], marks["f1"]), "backward": ms(marks["f1"], t1), "clip": ms(t1, t2),
            "optimizer": ms(t2, t3), "step": ms(t0, t4),
            "cpu_forward": ms(marks["c0"], marks["c1"]), "cpu_backward": ms(marks["c1"], c1), "cpu_clip": ms(c1, c2),
            "cpu_optimizer": ms(c2, c3), "cpu_step": ms(c0, c4)}


def profile_ops(run, steps: int, cuda: bool) -> dict:
    """torch.profiler: CPU ops by self time, per step (all threads); comm ops apart."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            run()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    comm_words = ("gloo", "nccl", "all_gather", "reduce_scatter", "all_reduce", "allreduce", "allgather",
                  "wait_tensor", "c10d")
    comm = sum(e.self_cpu_time_total for e in events if any(w in e.key.lower() for w in comm_words)) / 1e3 / steps
    top = [{"op": e.key[:100], "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
            "total_ms_per_step": round(e.cpu_time_total / 1e3 / steps, 3), "calls_per_step": e.count // steps}
           for e in events[:30]]
    n_aten = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) // steps
    return {"self_cpu_ms_per_step": round(total, 2), "comm_ms_per_step": round(comm, 2),
            "aten_calls_per_step": n_aten, "top_ops": top}


def profile_python(run, steps: int) -> dict:
    """cProfile of the steps (the calling thread: all of it on CPU), by origin and top functions."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        run()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, fn): (cc, nc, tottime, cumtime, callers)}
    by_origin: dict[str, float] = {}
    rows = []
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in stats.items():
        origin = next((name for name, key in ORIGINS if key in file or (key == "{" and file == "~")), "other")
        by_origin[origin] = by_origin.get(origin, 0.0) + tottime
        short = file.split("site-packages/")[-1].split("wt-tphost/")[-1]
        rows.append((tottime, cumtime, ncalls, f"{short}:{line}({fn})"))
    rows.sort(reverse=True)
    total = sum(by_origin.values())
    return {"note": "cProfile inflates Python time; read the shares, not the absolute ms",
            "tottime_ms_per_step_by_origin": {k: round(1e3 * v / steps, 2)
                                              for k, v in sorted(by_origin.items(), key=lambda kv: -kv[1])},
            "total_ms_per_step": round(1e3 * total / steps, 2),
            "top_functions": [{"fn": name, "tottime_ms_per_step": round(1e3 * t / steps, 3),
                               "cumtime_ms_per_step": round(1e3 * c / steps, 3), "calls_per_step": n // steps}
                              for t, c, n, name in rows[:40]]}


def worker(rank: int, world: int, port: int, opts, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    cuda = opts.device == "cuda"
    if cuda:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif opts.backend == "fake":  # rank 0 of a fake group: collectives return at once
        from torch.testing._internal.distributed.fake_pg import FakeStore

        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # one core a rank (2 cores here)
        dist.init_process_group("gloo")
    import gc

    out = {"world": world, "layers": {}}
    for layers in opts.layers:
        args = tiny_args(opts.dim, layers, opts.seq)
        torch.manual_seed(0)
        pm, opt = build(world, args, device, opts)
        marks: dict[str, float] = {}
        pm.module.register_forward_pre_hook(lambda *a: marks.update(f0=time.perf_counter(), c0=time.thread_time()))
        pm.module.register_forward_hook(lambda *a: marks.update(f1=time.perf_counter(), c1=time.thread_time()))
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, args.vocab_size, (1, opts.seq), generator=g).to(device)
        y = torch.randint(0, args.vocab_size, (1, opts.seq), generator=g).to(device)
        for _ in range(opts.warmup):
            timed_step(pm, opt, x, y, marks, cuda)
        gc.collect()
        gc.disable()
        times = []
        for _ in range(opts.steps):
            dist.barrier()
            times.append(timed_step(pm, opt, x, y, marks, cuda))
        gc.enable()
        med = {p: statistics.median(t[p] for t in times) for p in PHASES + CPU_PHASES}
        entry = {"median_ms": med}
        if layers == max(opts.layers) and opts.ab_local_norms and world > 1:
            entry["local_norms_ab"] = local_norms_ab(pm, lambda: timed_step(pm, opt, x, y, marks, cuda), opts)
        if layers == max(opts.layers) and opts.profile_steps:
            run = lambda: timed_step(pm, opt, x, y, marks, cuda)  # noqa: E731
            entry["profile_ops"] = profile_ops(run, opts.profile_steps, cuda)
            if not cuda:
                entry["profile_python"] = profile_python(run, opts.profile_steps)
        out["layers"][layers] = entry
        pm = opt = run = None  # free this layer count's model before the next
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def local_norms_ab(pm, run, opts) -> dict:
    """The eager SP norms on local shards (``norm_styles.py``) against the same norms through
    DTensor, in one process: rounds alternate the two (``opts.steps`` steps each) so that
    drift in the machine's speed falls on both; medians of the calling thread's CPU ms a step
    (on CUDA, where backward runs on autograd's device thread, of the wall ms: host-bound at
    this width)."""
    from dtensor_parallel.tensor_parallel.norm_styles import LOCAL_NORM

    norms = [(m, m.__dict__["forward"]) for m in pm.module.modules() if getattr(m, LOCAL_NORM, None)]
    held = {m: getattr(m, LOCAL_NORM) for m, _ in norms}

    def use_local(on: bool) -> None:
        for m, wrapper in norms:
            if on:
                m.forward = wrapper
                setattr(m, LOCAL_NORM, held[m])
            else:
                del m.forward  # the class's forward, on DTensors
                delattr(m, LOCAL_NORM)

    key = "step" if opts.device == "cuda" else "cpu_step"
    ms = {True: [], False: []}
    for _ in range(opts.ab_local_norms):
        for on in (False, True):
            use_local(on)
            run()  # (one unmeasured step after the switch)
            for _ in range(opts.steps):
                ms[on].append(run()[key])
    use_local(True)
    return {"norms": len(norms), "measure": key, "local_ms_per_step": statistics.median(ms[True]),
            "dtensor_ms_per_step": statistics.median(ms[False])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(world: int, opts) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    ranks = 1 if opts.backend == "fake" else world  # fake: rank 0 alone stands for every rank
    procs = [ctx.Process(target=worker, args=(r, world, port, opts, queue)) for r in range(ranks)]
    for p in procs:
        p.start()
    out = queue.get(timeout=opts.timeout)
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a rank of the world-{world} run exited with {p.exitcode}")
    return out


def summarize(out: dict, impl: str, label: str, opts) -> list[dict]:
    """Rows: per phase, ms per step at each layer count and the per-layer slope."""
    l1, l2 = min(opts.layers), max(opts.layers)
    m1, m2 = out["layers"][l1]["median_ms"], out["layers"][l2]["median_ms"]
    shape = f"dim {opts.dim}, seq {opts.seq}, layers {l1}/{l2}, {opts.precision}, recompute {opts.recompute}"
    return [{"impl": impl, "label": label, "phase": p, "shape": shape,
             f"median_ms_{l1}_layers": round(m1[p], 3), f"median_ms_{l2}_layers": round(m2[p], 3),
             "ms_per_layer": round((m2[p] - m1[p]) / (l2 - l1), 3),
             f"cpu_ms_{l1}_layers": round(m1["cpu_" + p], 3), f"cpu_ms_{l2}_layers": round(m2["cpu_" + p], 3),
             "cpu_ms_per_layer": round((m2["cpu_" + p] - m1["cpu_" + p]) / (l2 - l1), 3)} for p in PHASES]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--label", default="run", help="rows of an earlier run with another label are kept")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--layers", type=lambda s: [int(v) for v in s.split(",")], default=[2, 6])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--recompute", default="selective")
    ap.add_argument("--kernels", choices=("torch", "triton"), default="torch", help="the SP communication kernels")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--backend", choices=("gloo", "fake"), default="gloo",
                    help="CPU only: fake runs rank 0 alone on a fake process group (no communication: "
                         "dispatch cost only; values are garbage)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--name", default=None, help=f"results name (default {NAME}, or tp_host_overhead_cuda)")
    ap.add_argument("--ab-local-norms", type=int, default=0, metavar="ROUNDS",
                    help="TP run, largest layer count: alternate the eager SP norms on local shards with the "
                         "DTensor norms for ROUNDS rounds of --steps steps each (norm_styles.py)")
    opts = ap.parse_args()
    name = opts.name or (NAME if opts.device == "cpu" else "tp_host_overhead_cuda")
    if opts.backend == "fake" and opts.device == "cuda":
        ap.error("--backend fake is for CPU")

    base = run_config(1, opts)
    tp = run_config(opts.tp, opts)
    tp_impl = f"TP{opts.tp}+SP" + (" (fake group)" if opts.backend == "fake" else "")
    rows = summarize(base, "1 rank (no TP)", opts.label, opts) + summarize(tp, tp_impl, opts.label, opts)
    for r in rows:
        print(f"{r['label']:>8} {r['impl']:>15} {r['phase']:>9}: " +
              ", ".join(f"{k} {v}" for k, v in r.items() if k.startswith(("median", "ms_", "cpu_ms_per"))))
    top_layers = max(opts.layers)
    profiles = {f"{opts.label}/{name_}": out["layers"][top_layers].get("profile_ops")
                for name_, out in (("1rank", base), (f"tp{opts.tp}sp" + ("_fake" if opts.backend == "fake" else ""), tp))}
    py_profiles = {f"{opts.label}/{name_}": out["layers"][top_layers].get("profile_python")
                   for name_, out in (("1rank", base), (f"tp{opts.tp}sp" + ("_fake" if opts.backend == "fake" else ""), tp))}
    for key, prof in py_profiles.items():
        if prof:
            print(key, json.dumps(prof["tottime_ms_per_step_by_origin"]))
    ab = tp["layers"][top_layers].get("local_norms_ab")
    if ab:
        print(f"{opts.label} {tp_impl}, {top_layers} layers, {ab['measure']} ms: norms on local shards "
              f"{ab['local_ms_per_step']:.2f}, through DTensor {ab['dtensor_ms_per_step']:.2f} ({ab['norms']} norms)")

    path = Path(os.environ.get("OUT") or Path(__file__).parent / "results") / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    keep = [r for r in old.get("rows", []) if r.get("label") != opts.label]
    all_rows = keep + rows
    targets = []
    key = "ms_per_layer" if opts.device == "cuda" else "cpu_ms_per_layer"
    by = {(r["label"], r["impl"], r["phase"]): r.get(key) for r in all_rows}
    for label in sorted({r["label"] for r in all_rows}):
        t, b = by.get((label, tp_impl, "step")), by.get((label, "1 rank (no TP)", "step"))
        if t and b:
            targets.append({"name": f"{label}: TP {key} of a step / 1 rank's", "value": round(t / b, 3),
                            "goal": 1.0, "higher_is_better": False})
    out = write_results(name, all_rows, targets, out_dir=str(path.parent),
                        profiles={**old.get("profiles", {}), **profiles},
                        python_profiles={**old.get("python_profiles", {}), **py_profiles},
                        local_norms_ab={**old.get("local_norms_ab", {}), **({opts.label: ab} if ab else {})},
                        config={"dim": opts.dim, "seq": opts.seq, "layers": opts.layers, "steps": opts.steps,
                                "precision": opts.precision, "recompute": opts.recompute, "kernels": opts.kernels,
                                "cpu_cores": os.cpu_count()})
    print("wrote", out)


if __name__ == "__main__":
    main()
