"""How much a pending NCCL P2P kernel slows the GEMMs beside it (issue 24, item 3), on 2 GPUs.

    cd benchmarks && torchrun --standalone --nproc-per-node 2 p2p_beside_gemm.py  # -> $OUT/p2p_beside_gemm.json

The pipeline profile (RESULTS.md, "Pipeline schedules on H200") found interleaved 1F1B's GEMMs
4-7% slower than 1F1B's, with NCCL P2P kernels spinning beside them. This isolates that
mechanism: rank 0 posts a receive, then times a run of bf16 GEMMs (the 8B shape's w1, 4096
tokens: (4096 x 4096) @ (4096 x 14336)) while rank 1 holds its matching send back behind a
GPU sleep for longer than the GEMMs take, so rank 0's receive kernel waits on its SMs the whole
time. Each row: the GEMMs' median ms with a pending receive / without one, on a communicator
with NCCL's defaults, with ``max_ctas`` capped, and (where this torch exposes it) NCCL's
zero-CTA policy; each with and without torch's cuBLAS SM carveout. Baseline in the same run.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on our machines

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from common import median, write_results  # noqa: E402

M, K, N = 4096, 4096, 14336
GEMMS = 40


def gemms_ms(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(GEMMS):
        torch.mm(a, b, out=out)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / GEMMS


def group_with(config: dict[str, int]) -> dist.ProcessGroup | None:
    """A new 2-rank NCCL group whose config has ``config`` set; None where this torch's
    NCCLConfig lacks a field (every rank decides alike: same build)."""
    opts = dist.ProcessGroupNCCL.Options()
    for key, value in config.items():
        if not hasattr(opts.config, key):
            return None
        setattr(opts.config, key, value)
    return dist.new_group([0, 1], pg_options=opts)


def measure(group: dist.ProcessGroup, carveout: int, sleep_cycles: int, reps: int) -> tuple[float, float]:
    """(GEMM ms without a pending receive, with one) on rank 0; rank 1 sends late."""
    rank, dev = dist.get_rank(), torch.device("cuda", torch.cuda.current_device())
    a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    b = torch.randn(K, N, device=dev, dtype=torch.bfloat16)
    out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
    msg = torch.empty(8 << 20, device=dev, dtype=torch.bfloat16)  # 16 MB: an activation's order
    previous = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(carveout or None)
    alone, beside = [], []
    try:
        for _ in range(reps):
            dist.barrier(group=group)
            if rank == 0:
                alone.append(gemms_ms(a, b, out))
            dist.barrier(group=group)
            torch.cuda.synchronize()
            if rank == 0:
                work = dist.irecv(msg, src=1, group=group)
                beside.append(gemms_ms(a, b, out))
                work.wait()
            else:
                torch.cuda._sleep(sleep_cycles)  # the send waits behind it on this rank's stream
                dist.send(msg, dst=0, group=group)
            torch.cuda.synchronize()
    finally:
        torch._C._set_sm_carveout_experimental(previous)
    return (median(alone), median(beside)) if rank == 0 else (0.0, 0.0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None, help="a path whose folder gets p2p_beside_gemm.json (default $OUT)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ctas", type=int, default=2, help="the capped communicator's max_ctas")
    args = p.parse_args()
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank = dist.get_rank()
    # the sleep must outlast rank 0's GEMMs: time them once, then sleep about 3x that
    dev = torch.device("cuda", local)
    a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    b = torch.randn(K, N, device=dev, dtype=torch.bfloat16)
    ms = gemms_ms(a, b, torch.empty(M, N, device=dev, dtype=torch.bfloat16))
    ms = gemms_ms(a, b, torch.empty(M, N, device=dev, dtype=torch.bfloat16))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles_per_ms = 10_000_000 / start.elapsed_time(end)
    sleep_cycles = int(3 * GEMMS * ms * cycles_per_ms)
    rows = []
    communicators = [("nccl_default", {}), (f"max_ctas_{args.ctas}", {"max_ctas": args.ctas}),
                     ("cta_policy_zero", {"cta_policy": 2})]  # NCCL_CTA_POLICY_ZERO (NCCL >= 2.28)
    for name, config in communicators:
        group = group_with(config)
        for carveout in (0, args.ctas):
            row = {"impl": f"{name}{f'_carveout{carveout}' if carveout else ''}", "config": config,
                   "sm_carveout": carveout, "shape": f"bf16 ({M} x {K}) @ ({K} x {N}), {GEMMS} GEMMs, 16 MB message"}
            if group is None:
                row["error"] = f"torch {torch.__version__}'s NCCLConfig has no field {list(config)}"
            else:
                alone, beside = measure(group, carveout, sleep_cycles, args.reps)
                row |= {"gemm_ms_alone": alone, "gemm_ms_beside_pending_recv": beside,
                        "slowdown": beside / alone if alone else None}
            rows.append(row)
            if rank == 0:
                print(row, flush=True)
    if rank == 0:
        by = {r["impl"]: r for r in rows}
        targets = [{"name": f"{impl}: GEMM time beside a pending receive / alone", "value": r["slowdown"],
                    "goal": 1.02, "higher_is_better": False} for impl, r in by.items() if r.get("slowdown")]
        out_dir = os.path.dirname(args.out) if args.out else None
        path = write_results("p2p_beside_gemm", rows, targets, out_dir, nccl_version=str(torch.cuda.nccl.version()))
        print(f"wrote {path}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
