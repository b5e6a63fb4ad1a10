"""SP reduce-scatter and the fused row-parallel matmul on 2 or 4 GPUs, against NCCL and torch.

    torchrun --standalone --nproc-per-node 2 benchmarks/sp_reduce_scatter.py   # -> sp_reduce_scatter.json
    torchrun --standalone --nproc-per-node 4 benchmarks/sp_reduce_scatter.py   # -> sp_reduce_scatter_tp4.json

bf16 throughout. Rows:

- ``bandwidth``: input (1, S, 8192) per rank of 1..256 MB, reduce-scatter along S:
  ``nccl_reduce_scatter_tensor``; ``ours_triton_symm_mem`` (``sequence_reduce_scatter``: push
  into peers' symmetric buffers, signal-pad barrier, fp32 sum; one launch); breakdown rows:
  ``ours_cuda_graph`` (the same calls replayed from a CUDA graph: GPU time without the host
  launch path), ``ours_barrier_only`` and ``ours_barrier_only_cuda_graph`` (the kernel with push
  and reduce off, same grid: the barrier's cost, eager and GPU-only; sizes <= 16 MB). Eager rows
  carry ``host_us_per_call``, the CPU time to issue one call: when it is about the per-call
  time, the host launch path is the bottleneck. Bus bandwidth = size * (W-1)/W / time.
- ``row_parallel``: Llama-70B row-parallel shapes (tokens 4096..16384 x hidden 8192, inner
  28672/W): ``matmul_alone``; ``matmul_then_nccl``; ``matmul_then_ours`` (GEMM, then the
  unfused kernel); ``ours_fused_matmul_rs`` (``matmul_reduce_scatter``: chunk GEMMs, copy-engine
  pushes hidden behind the next GEMM, reduce-only kernel); ``ours_fused_matmul_rs_gemm_push``
  (the GEMMs store into peers' buffers); ``torch_fused_matmul_reduce_scatter``.

Times: CUDA events around ``reps`` back-to-back calls after warm-up, divided by reps; the median
of 5 such measurements. Each row checks its output against NCCL's (inputs are random, never
zeros). Any failure becomes an error row.
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on our machines
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import datetime  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dtensor_parallel.tensor_parallel import matmul_reduce_scatter as mrs  # noqa: E402
from dtensor_parallel.tensor_parallel import sp_reduce_scatter as sprs  # noqa: E402
from triton_kernels.sp_reduce_scatter import launch  # noqa: E402

from common import median, write_results  # noqa: E402

HIDDEN, FFN = 8192, 28672
SIZES_MB = [1, 2, 4, 8, 16, 32, 64, 128, 256]
BREAKDOWN_MAX_MB = 16
TOKENS = [4096, 8192, 16384]
GRAPH_CALLS = 20  # calls per captured graph (even: the workspace halves alternate across replays)


def timed(fn, reps: int, warmup: int = 3, measures: int = 5) -> tuple[float, float]:
    """(median ms per call, median host us to issue one call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times, host = [], []
    for _ in range(measures):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        host.append((time.perf_counter() - t0) / reps * 1e6)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return median(times), median(host)


def graph_timed(fn, replays: int = 5) -> tuple[float, torch.Tensor]:
    """Median ms per call of ``GRAPH_CALLS`` calls captured in one CUDA graph (no host launch
    path), and the last call's output after the replays."""
    ws = sprs._WORKSPACES[dist.group.WORLD.group_name]
    torch.cuda.synchronize()
    dist.barrier()
    ws.stream = None  # no wait on a stream outside the capture; replays run on one stream
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn() for _ in range(GRAPH_CALLS)]
    ws.stream = None
    torch.cuda.synchronize()
    ms, _ = timed(graph.replay, reps=replays, warmup=1)
    return ms / GRAPH_CALLS, outs[-1]


def nccl_rs(x: torch.Tensor, world: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """NCCL reduce-scatter of x (1, S, H) along S (rows are contiguous chunks for batch 1)."""
    flat = x.view(-1, x.shape[-1])  # (S, H)
    out = out if out is not None else torch.empty(flat.shape[0] // world, flat.shape[1], dtype=x.dtype,
                                                  device=x.device)
    dist.reduce_scatter_tensor(out, flat)
    return out


def barrier_only(x: torch.Tensor) -> torch.Tensor:
    """The kernel with push and reduce off: program-level signal-pad barrier only."""
    ws, plan = sprs._call_plan(x, 1, dist.group.WORLD)
    out = torch.empty(plan.out_shape, dtype=x.dtype, device=x.device)
    half = ws.begin()
    launch(plan.cfg, x, out, plan.stride_xo, plan.stride_oo, plan.bufs8[half], ws.pads8, ws.rank, ws.world,
           sprs._SLOT0, push=False, reduce=False)
    return out


def _row(rows: list, rank: int, row: dict, fn, reps: int, ref: torch.Tensor | None, nbytes: int = 0,
         world: int = 2, graph: bool = False) -> torch.Tensor | None:
    try:
        with torch.no_grad():
            if graph:
                ms, out = graph_timed(fn)
            else:
                out = fn()
                ms, host = timed(fn, reps)
                row["host_us_per_call"] = host
            if ref is not None and out is not None:
                row["max_abs_diff_vs_nccl"] = (out.reshape(ref.shape).float() - ref.float()).abs().max().item()
        row["median_ms"] = ms
        if nbytes:
            row["bus_bw_gbps"] = nbytes * (world - 1) / world / (ms * 1e-3) / 1e9
    except Exception as e:  # noqa: BLE001 - an impl that cannot run is a row that says why
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out = None
    rows.append(row)
    if rank == 0:
        print(row, flush=True)
    return out


def bandwidth_rows(world: int, dev: torch.device, rank: int) -> list[dict]:
    rows: list[dict] = []
    group = dist.group.WORLD
    for mb in SIZES_MB:
        nbytes = mb << 20
        s = nbytes // (2 * HIDDEN)
        shape = f"(1, {s}, {HIDDEN}) bf16, {mb} MB per rank"
        g = torch.Generator(device=dev).manual_seed(rank + 1)
        x = torch.randn((1, s, HIDDEN), device=dev, dtype=torch.bfloat16, generator=g)
        reps = max(3, min(50, (256 // mb) * 2))
        base = {"section": "bandwidth", "shape": shape, "size_mb": mb}
        ref = _row(rows, rank, {"impl": "nccl_reduce_scatter_tensor", **base}, lambda: nccl_rs(x, world), reps,
                   None, nbytes, world)
        ref = ref.clone() if ref is not None else None
        impls = [("ours_triton_symm_mem", lambda: sprs.sequence_reduce_scatter(x, 1, group), False, True),
                 ("ours_cuda_graph", lambda: sprs.sequence_reduce_scatter(x, 1, group), True, True)]
        if mb <= BREAKDOWN_MAX_MB:
            impls += [("ours_barrier_only", lambda: barrier_only(x), False, False),
                      ("ours_barrier_only_cuda_graph", lambda: barrier_only(x), True, False)]
        for impl, fn, graph, check in impls:
            _row(rows, rank, {"impl": impl, **base}, fn, reps, ref if check else None, nbytes, world, graph)
        del x, ref
        torch.cuda.empty_cache()
    return rows


def _enable_torch_symm_mem(group) -> None:
    try:
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enable_symm_mem_for_group(group.group_name)
    except Exception:  # noqa: BLE001 - the row itself will report the failure
        pass


def row_parallel_rows(world: int, dev: torch.device, rank: int) -> list[dict]:
    rows: list[dict] = []
    group = dist.group.WORLD
    inner = FFN // world
    fused = getattr(getattr(torch.ops, "symm_mem", None), "fused_matmul_reduce_scatter", None)
    if fused is not None:
        _enable_torch_symm_mem(group)
    for tokens in TOKENS:
        shape = f"tokens {tokens} x inner {inner} @ {inner} x hidden {HIDDEN}, bf16, tp={world}"
        g = torch.Generator(device=dev).manual_seed(rank + 7)
        a = torch.randn((1, tokens, inner), device=dev, dtype=torch.bfloat16, generator=g) * inner ** -0.5
        w = torch.randn((HIDDEN, inner), device=dev, dtype=torch.bfloat16, generator=g)  # nn.Linear weight
        wt = w.t()  # (inner, hidden)
        out_nccl = torch.empty(tokens // world, HIDDEN, device=dev, dtype=torch.bfloat16)
        base = {"section": "row_parallel", "shape": shape, "tokens": tokens}
        flops = 2 * tokens * inner * HIDDEN
        impls = [("matmul_then_nccl", lambda: nccl_rs(a @ wt, world, out_nccl)),
                 ("matmul_alone", lambda: a @ wt),
                 ("matmul_then_ours", lambda: sprs.sequence_reduce_scatter(a @ wt, 1, group)),
                 ("ours_fused_matmul_rs", lambda: mrs.matmul_reduce_scatter(a, w, 1, group)),
                 ("ours_fused_matmul_rs_gemm_push", lambda: mrs.matmul_reduce_scatter(a, w, 1, group, push="gemm"))]
        if fused is not None:
            impls.append(("torch_fused_matmul_reduce_scatter",
                          lambda: fused(a.view(tokens, inner), wt, "sum", 0, group.group_name)))
        else:
            rows.append({"impl": "torch_fused_matmul_reduce_scatter", **base, "error": f"torch {torch.__version__} "
                         "has no torch.ops.symm_mem.fused_matmul_reduce_scatter"})
        ref = None
        for impl, fn in impls:
            row = {"impl": impl, **base}
            out = _row(rows, rank, row, fn, 5, None if impl == "matmul_alone" else ref)
            if impl == "matmul_then_nccl" and out is not None:
                ref = out.clone()
            if "median_ms" in row:
                row["matmul_tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
        del a, w, wt, out_nccl, ref
        torch.cuda.empty_cache()
    return rows


def targets_from(rows: list[dict]) -> list[dict]:
    by = {(r["impl"], r.get("size_mb", r.get("tokens"))): r.get("median_ms", float("nan")) for r in rows}
    nan = float("nan")
    targets = []
    for mb in SIZES_MB:
        if 4 <= mb <= 64:
            targets.append({"name": f"bandwidth {mb} MB: ours / NCCL speed", "value":
                            by.get(("nccl_reduce_scatter_tensor", mb), nan) / by.get(("ours_triton_symm_mem", mb), nan),
                            "goal": 1.3, "higher_is_better": True})
    for t in TOKENS:
        alone, fused = by.get(("matmul_alone", t), nan), by.get(("ours_fused_matmul_rs", t), nan)
        targets += [
            {"name": f"row-parallel {t} tokens: fused / matmul alone", "value": fused / alone, "goal": 1.1,
             "higher_is_better": False},
            {"name": f"row-parallel {t} tokens: (matmul + NCCL) / fused", "value":
             by.get(("matmul_then_nccl", t), nan) / fused, "goal": 1.0, "higher_is_better": True},
            {"name": f"row-parallel {t} tokens: (matmul + ours unfused) / fused", "value":
             by.get(("matmul_then_ours", t), nan) / fused, "goal": 1.0, "higher_is_better": True},
            {"name": f"row-parallel {t} tokens: torch fused_matmul_reduce_scatter / fused", "value":
             by.get(("torch_fused_matmul_reduce_scatter", t), nan) / fused, "goal": 1.0, "higher_is_better": True}]
    return targets


def main() -> None:
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=dev, timeout=datetime.timedelta(seconds=120))
    world = dist.get_world_size()
    reason = sprs.symm_mem_unavailable(world, "cuda")
    rows = bandwidth_rows(world, dev, rank) + row_parallel_rows(world, dev, rank)
    if rank == 0:
        try:
            targets = targets_from(rows)
        except Exception as e:  # noqa: BLE001 - missing rows: report, do not crash
            targets = [{"name": "targets", "error": f"{type(e).__name__}: {e}"}]
        ws = sprs._WORKSPACES.get(dist.group.WORLD.group_name)
        name = "sp_reduce_scatter" if world == 2 else f"sp_reduce_scatter_tp{world}"
        env = {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")}
        print(write_results(name, rows, targets, world=world, symm_mem_unavailable=reason,
                            programs=getattr(ws, "max_programs", None), env=env))
        for t in targets:
            print(t, flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
