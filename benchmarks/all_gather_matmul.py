"""The fused all-gather + column-parallel matmul on 2 GPUs, against the matmul alone, NCCL and torch.

    torchrun --standalone --nproc-per-node 2 benchmarks/all_gather_matmul.py [--out PATH.json]

bf16, Llama-70B column-parallel shapes at tp = W: hidden K = 8192; tokens T = 4096, 8192, 16384
(each rank holds T/W of them, the sequence shard); N = (8192 + 2*1024)/W (q/k/v) and
2*28672/W (w1/w3), the layers that share one gather counted as one GEMM of their summed rows.
Rows per (T, N):

- ``matmul_alone``: the (T, K) @ (K, N) GEMM on an input already gathered (the floor);
- ``nccl_all_gather_then_matmul``: ``all_gather_into_tensor``, then the GEMM;
- ``ours_fused``: ``all_gather_matmul`` (copy-engine pulls from symmetric memory behind the
  chunk GEMMs; returns the output and the gathered input);
- ``torch_fused_all_gather_matmul``: ``torch.ops.symm_mem.fused_all_gather_matmul`` (same run);
- backward, the input gradient: ``input_grad_matmul_alone`` ((T, N) @ (N, K)),
  ``input_grad_matmul_then_nccl_rs`` (then NCCL reduce-scatter) and ``input_grad_ours_fused``
  (``matmul_add_reduce_scatter.input_grad``: chunk GEMMs pushed by the copy engine, fp32 reduce).

Times: CUDA events around back-to-back calls after warm-up, per call; the median of 5 such
measurements (``sp_reduce_scatter.timed``). Each fused row checks its output against the NCCL
row (``max_abs_diff_vs_nccl``; the gathered input must be bit-equal). Any failure is an error row.
Targets: ours / matmul alone <= 1.05 (issue 24); torch's / ours >= 1 is reported beside it.
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on our machines
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dtensor_parallel.tensor_parallel import all_gather_matmul as agm  # noqa: E402
from dtensor_parallel.tensor_parallel import matmul_add_reduce_scatter as mars  # noqa: E402
from dtensor_parallel.tensor_parallel import sp_reduce_scatter as sprs  # noqa: E402

from common import write_results  # noqa: E402
from sp_reduce_scatter import _enable_torch_symm_mem, timed  # noqa: E402

HIDDEN, KV, FFN = 8192, 1024, 28672
TOKENS = [4096, 8192, 16384]
GOAL = 1.05


def _row(rows: list, rank: int, row: dict, fn, reps: int, ref: torch.Tensor | None, flops: float) -> object:
    try:
        with torch.no_grad():
            out = fn()
            ms, host = timed(fn, reps)
        row |= {"median_ms": ms, "host_us_per_call": host, "tflops": flops / (ms * 1e-3) / 1e12}
        first = out[0] if isinstance(out, tuple) else out  # ours: (output, gathered)
        if ref is not None:
            row["max_abs_diff_vs_nccl"] = (first.reshape(ref.shape).float() - ref.float()).abs().max().item()
    except Exception as e:  # noqa: BLE001 - an impl that cannot run is a row that says why
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out = None
    rows.append(row)
    if rank == 0:
        print(row, flush=True)
    return out


def column_rows(world: int, dev: torch.device, rank: int) -> list[dict]:
    rows: list[dict] = []
    torch_fused = getattr(getattr(torch.ops, "symm_mem", None), "fused_all_gather_matmul", None)
    if torch_fused is not None:
        _enable_torch_symm_mem(dist.group.WORLD)
    for name, n in (("qkv", (HIDDEN + 2 * KV) // world), ("w1_w3", 2 * FFN // world)):
        for tokens in TOKENS:
            shape_rows(rows, world, dev, rank, name, n, tokens, torch_fused)
            torch.cuda.empty_cache()
    return rows


def shape_rows(rows: list, world: int, dev: torch.device, rank: int, name: str, n: int, tokens: int,
               torch_fused) -> None:
    """The forward and input-gradient rows of one (layers, tokens) shape."""
    group = dist.group.WORLD
    shard = tokens // world
    base = {"section": "forward", "layers": name, "tokens": tokens, "n": n,
            "shape": f"all_gather({shard} x {HIDDEN}) @ {HIDDEN} x {n}, bf16, tp={world}"}
    g = torch.Generator(device=dev).manual_seed(rank + 3)
    x = torch.randn((1, shard, HIDDEN), device=dev, dtype=torch.bfloat16, generator=g)
    w = torch.randn((n, HIDDEN), device=dev, dtype=torch.bfloat16, generator=g) * HIDDEN ** -0.5
    wt = w.t()  # (K, N), as F.linear reads the nn.Linear weight
    full = torch.empty((tokens, HIDDEN), device=dev, dtype=torch.bfloat16)
    dist.all_gather_into_tensor(full, x.view(shard, HIDDEN))
    flops = 2 * tokens * HIDDEN * n

    def nccl_then_mm():
        dist.all_gather_into_tensor(full, x.view(shard, HIDDEN))
        return full @ wt

    impls = [("nccl_all_gather_then_matmul", nccl_then_mm), ("matmul_alone", lambda: full @ wt),
             ("ours_fused", lambda: agm.all_gather_matmul(x, w, 1, group))]
    if torch_fused is not None:
        impls.append(("torch_fused_all_gather_matmul",
                      lambda: torch_fused(x.view(shard, HIDDEN), [wt], 0, group.group_name)[1][0]))
    else:
        rows.append({"impl": "torch_fused_all_gather_matmul", **base,
                     "error": f"torch {torch.__version__} has no torch.ops.symm_mem.fused_all_gather_matmul"})
    ref = None
    for impl, fn in impls:
        out = _row(rows, rank, {"impl": impl, **base}, fn, 5, None if impl == "matmul_alone" else ref, flops)
        if impl == "nccl_all_gather_then_matmul" and out is not None:
            ref = out.clone()
        if impl == "ours_fused" and out is not None:
            rows[-1]["gathered_bit_equal_to_nccl"] = bool(torch.equal(out[1].view(tokens, HIDDEN), full))
    # backward: the input gradient, (T, N) @ (N, K), then the reduce-scatter of the sequence
    base = {**base, "section": "input_grad",
            "shape": f"reduce_scatter(({tokens} x {n}) @ {n} x {HIDDEN}), bf16, tp={world}"}
    grad = torch.randn((1, tokens, n), device=dev, dtype=torch.bfloat16, generator=g)
    out_rs = torch.empty((shard, HIDDEN), device=dev, dtype=torch.bfloat16)

    def mm_then_nccl_rs():
        dist.reduce_scatter_tensor(out_rs, grad.view(tokens, n) @ w)
        return out_rs

    ref = None
    for impl, fn in (("input_grad_matmul_then_nccl_rs", mm_then_nccl_rs),
                     ("input_grad_matmul_alone", lambda: grad.view(tokens, n) @ w),
                     ("input_grad_ours_fused", lambda: mars.input_grad(grad, w, None, 1, group))):
        out = _row(rows, rank, {"impl": impl, **base}, fn, 5, None if "alone" in impl else ref, flops)
        if impl == "input_grad_matmul_then_nccl_rs" and out is not None:
            ref = out.clone()


def targets_from(rows: list[dict]) -> list[dict]:
    nan = float("nan")
    by = {(r["impl"], r["layers"], r["tokens"]): r.get("median_ms", nan) for r in rows}
    targets = []
    for name in ("qkv", "w1_w3"):
        for t in TOKENS:
            ours, alone = by.get(("ours_fused", name, t), nan), by.get(("matmul_alone", name, t), nan)
            targets += [
                {"name": f"{name} {t} tokens: fused all-gather+matmul / matmul alone", "value": ours / alone,
                 "goal": GOAL, "higher_is_better": False},
                {"name": f"{name} {t} tokens: torch fused_all_gather_matmul / ours", "value":
                 by.get(("torch_fused_all_gather_matmul", name, t), nan) / ours, "goal": 1.0, "higher_is_better": True},
                {"name": f"{name} {t} tokens: (NCCL all-gather + matmul) / ours", "value":
                 by.get(("nccl_all_gather_then_matmul", name, t), nan) / ours, "goal": 1.0, "higher_is_better": True},
                {"name": f"{name} {t} tokens: input grad fused / matmul alone", "value":
                 by.get(("input_grad_ours_fused", name, t), nan) / by.get(("input_grad_matmul_alone", name, t), nan),
                 "goal": 1.1, "higher_is_better": False}]
    return targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="results JSON path (default: $OUT or benchmarks/results, all_gather_matmul.json)")
    args = p.parse_args()
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=dev, timeout=datetime.timedelta(seconds=120))
    world = dist.get_world_size()
    reason = sprs.symm_mem_unavailable(world, "cuda")
    rows = column_rows(world, dev, rank)
    if rank == 0:
        try:
            targets = targets_from(rows)
        except Exception as e:  # noqa: BLE001 - missing rows: report, do not crash
            targets = [{"name": "targets", "error": f"{type(e).__name__}: {e}"}]
        name = "all_gather_matmul" if world == 2 else f"all_gather_matmul_tp{world}"
        out_dir = None
        if args.out:
            out_dir, name = str(Path(args.out).parent), Path(args.out).stem
        env = {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")}
        print(write_results(name, rows, targets, out_dir, world=world, symm_mem_unavailable=reason, env=env,
                            baselines=["matmul_alone", "nccl_all_gather_then_matmul", "torch_fused_all_gather_matmul",
                                       "input_grad_matmul_alone", "input_grad_matmul_then_nccl_rs"]))
        for t in targets:
            print(t, flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
