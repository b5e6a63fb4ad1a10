"""SP reduce-scatter on 2 GPUs: the Triton symmetric-memory kernel against NCCL.

    torchrun --standalone --nproc-per-node 2 benchmarks/sp_reduce_scatter.py

bf16 throughout. Rows:

- ``bandwidth``: input (1, S, 8192) per rank of 1..256 MB, reduce-scatter along S:
  ``ours_triton_symm_mem`` (``sequence_reduce_scatter``: push into peers' symmetric buffers,
  signal-pad barrier, fp32 sum; one launch) against ``nccl_reduce_scatter_tensor``. Bus
  bandwidth = size * (W-1)/W / time (NCCL's convention).
- ``row_parallel``: Llama-70B row-parallel layer shapes (tokens 4096..16384 x hidden 8192,
  inner 28672/tp): ``matmul_alone``; ``matmul_then_ours`` (sequential: the GEMM, then the
  kernel reading its output); ``matmul_then_nccl``; ``torch_fused_matmul_reduce_scatter``
  (``torch.ops.symm_mem.fused_matmul_reduce_scatter``, where that torch has it).

Times: CUDA events around ``reps`` back-to-back calls after warm-up, divided by reps; the
median of 5 such measurements. Each row checks its output against NCCL's first (inputs are
random, never zeros). Any failure becomes an error row.
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on our machines
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import datetime  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dtensor_parallel.tensor_parallel import sp_reduce_scatter as sprs  # noqa: E402

from common import median, write_results  # noqa: E402

HIDDEN, FFN = 8192, 28672
SIZES_MB = [1, 2, 4, 8, 16, 32, 64, 128, 256]
TOKENS = [4096, 8192, 16384]


def timed(fn, reps: int, warmup: int = 3, measures: int = 5) -> float:
    """Median ms per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(measures):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return median(times)


def nccl_rs(x: torch.Tensor, world: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """NCCL reduce-scatter of x (1, S, H) along S (rows are contiguous chunks for batch 1)."""
    flat = x.view(-1, x.shape[-1])  # (S, H)
    out = out if out is not None else torch.empty(flat.shape[0] // world, flat.shape[1], dtype=x.dtype,
                                                  device=x.device)
    dist.reduce_scatter_tensor(out, flat)
    return out


def bandwidth_rows(world: int, dev: torch.device, rank: int) -> list[dict]:
    rows = []
    group = dist.group.WORLD
    for mb in SIZES_MB:
        nbytes = mb << 20
        s = nbytes // (2 * HIDDEN)
        shape = f"(1, {s}, {HIDDEN}) bf16, {mb} MB per rank"
        g = torch.Generator(device=dev).manual_seed(rank + 1)
        x = torch.randn((1, s, HIDDEN), device=dev, dtype=torch.bfloat16, generator=g)
        reps = max(3, min(50, (256 // mb) * 2))
        ref = None
        for impl, fn in (("nccl_reduce_scatter_tensor", lambda: nccl_rs(x, world)),
                         ("ours_triton_symm_mem", lambda: sprs.sequence_reduce_scatter(x, 1, group))):
            row = {"impl": impl, "section": "bandwidth", "shape": shape, "size_mb": mb}
            try:
                with torch.no_grad():
                    out = fn().view(-1, HIDDEN)
                    if ref is None:
                        ref = out.clone()
                    row["max_abs_diff_vs_nccl"] = (out.float() - ref.float()).abs().max().item()
                    ms = timed(fn, reps)
                row.update(median_ms=ms, bus_bw_gbps=nbytes * (world - 1) / world / (ms * 1e-3) / 1e9)
            except Exception as e:  # noqa: BLE001 - an impl that cannot run is a row that says why
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            if rank == 0:
                print(row, flush=True)
        del x
        torch.cuda.empty_cache()
    return rows


def row_parallel_rows(world: int, dev: torch.device, rank: int) -> list[dict]:
    rows = []
    group = dist.group.WORLD
    inner = FFN // world
    fused = getattr(getattr(torch.ops, "symm_mem", None), "fused_matmul_reduce_scatter", None)
    for tokens in TOKENS:
        shape = f"tokens {tokens} x inner {inner} @ {inner} x hidden {HIDDEN}, bf16, tp={world}"
        g = torch.Generator(device=dev).manual_seed(rank + 7)
        a = torch.randn((1, tokens, inner), device=dev, dtype=torch.bfloat16, generator=g) * inner ** -0.5
        w = torch.randn((HIDDEN, inner), device=dev, dtype=torch.bfloat16, generator=g)  # nn.Linear weight
        wt = w.t()  # (inner, hidden)
        out_nccl = torch.empty(tokens // world, HIDDEN, device=dev, dtype=torch.bfloat16)

        def torch_fused():
            return fused(a.view(tokens, inner), wt, "sum", 0, group.group_name)

        if fused is not None:
            try:
                import warnings

                from torch.distributed._symmetric_memory import enable_symm_mem_for_group
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    enable_symm_mem_for_group(group.group_name)
            except Exception:  # noqa: BLE001 - the row itself will report the failure
                pass

        impls = [("matmul_alone", lambda: a @ wt),
                 ("matmul_then_nccl", lambda: nccl_rs(a @ wt, world, out_nccl)),
                 ("matmul_then_ours", lambda: sprs.sequence_reduce_scatter(a @ wt, 1, group))]
        if fused is not None:
            impls.append(("torch_fused_matmul_reduce_scatter", torch_fused))
        else:
            rows.append({"impl": "torch_fused_matmul_reduce_scatter", "section": "row_parallel", "shape": shape,
                         "tokens": tokens, "error": f"torch {torch.__version__} has no torch.ops.symm_mem."
                                                     "fused_matmul_reduce_scatter"})
        ref = None
        flops = 2 * tokens * inner * HIDDEN
        for impl, fn in impls:
            row = {"impl": impl, "section": "row_parallel", "shape": shape, "tokens": tokens}
            try:
                with torch.no_grad():
                    out = fn()
                    if impl == "matmul_then_nccl":
                        ref = out.clone()
                    elif impl != "matmul_alone" and ref is not None:
                        diff = (out.reshape(ref.shape).float() - ref.float()).abs().max().item()
                        row["max_abs_diff_vs_nccl"] = diff
                    ms = timed(fn, reps=5)
                row.update(median_ms=ms, matmul_tflops=flops / (ms * 1e-3) / 1e12)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            if rank == 0:
                print(row, flush=True)
        del a, w, wt, out_nccl
        torch.cuda.empty_cache()
    return rows


def targets_from(rows: list[dict], world: int) -> list[dict]:
    by = {(r["impl"], r.get("size_mb", r.get("tokens"))): r.get("median_ms", float("nan")) for r in rows}
    targets = []
    for mb in SIZES_MB:
        if 4 <= mb <= 64:
            targets.append({"name": f"bandwidth {mb} MB: ours / NCCL speed", "value":
                            by[("nccl_reduce_scatter_tensor", mb)] / by[("ours_triton_symm_mem", mb)],
                            "goal": 1.3, "higher_is_better": True})
    for t in TOKENS:
        alone = by[("matmul_alone", t)]
        targets.append({"name": f"row-parallel {t} tokens: (matmul + ours) / matmul alone",
                        "value": by[("matmul_then_ours", t)] / alone, "goal": 1.1, "higher_is_better": False})
        targets.append({"name": f"row-parallel {t} tokens: (matmul + NCCL) / (matmul + ours)",
                        "value": by[("matmul_then_nccl", t)] / by[("matmul_then_ours", t)], "goal": 1.0,
                        "higher_is_better": True})
        fused = by.get(("torch_fused_matmul_reduce_scatter", t), float("nan"))
        targets.append({"name": f"row-parallel {t} tokens: torch fused_matmul_reduce_scatter / (matmul + ours)",
                        "value": fused / by[("matmul_then_ours", t)], "goal": 1.0, "higher_is_better": True})
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
            targets = targets_from(rows, world)
        except Exception as e:  # noqa: BLE001 - missing rows: report, do not crash
            targets = [{"name": "targets", "error": f"{type(e).__name__}: {e}"}]
        ws = sprs._WORKSPACES.get(dist.group.WORLD.group_name)
        print(write_results("sp_reduce_scatter", rows, targets, world=world, symm_mem_unavailable=reason,
                            programs=getattr(ws, "max_programs", None),
                            env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")}))
        for t in targets:
            print(t, flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
