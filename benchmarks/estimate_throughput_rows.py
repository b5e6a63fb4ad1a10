"""The memory estimator against the measured peaks of a throughput run, on the CPU.

    python3 benchmarks/estimate_throughput_rows.py benchmarks/results/train_throughput_compiled_loss.json

``throughput_worker.py`` records the estimator's peak beside each of our rows at run time;
this recomputes it with the estimator as it is now (the measured peaks do not change when the
estimator learns something), for every ``ours`` row of the given results files, and writes
``results/memory_estimate_throughput.json``: predicted / measured per row (goal within 10%,
issue 23) and the phase the estimator expects the peak in. Each row's plan is rebuilt the way
``throughput_worker.build_ours`` builds it (selective recompute, bf16, fused AdamW or ours with
bf16 moments).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_results  # noqa: E402
from train_throughput import model_args, parse_layout, stage_layers  # noqa: E402

GIB = 2**30


def estimate_row(row: dict, config: dict) -> dict:
    from dtensor_parallel import ParallelPlan
    from dtensor_parallel.mesh import ParallelDims
    from dtensor_parallel.planning.memory import estimate_memory

    lay = parse_layout(row["layout"])
    n_micro = config["microbatches"] if lay.pp > 1 else 1
    kernels = {f: "triton" for f in lay.triton_families} if row["kernels"] == "triton" else "torch"
    if row["kernels"] == "sdpa":
        kernels = {"attention": "sdpa"}
    plan = ParallelPlan(sequence_parallel=lay.sp, recompute="selective", compile=row["compile"], kernels=kernels,
                        fused_loss=bool(row.get("fused_loss")), mixed_precision="bf16", micro_batch_size=1,
                        global_batch_size=n_micro * lay.dp_shard, pipeline_schedule="1f1b" if lay.pp > 1 else None,
                        layers_per_stage=stage_layers(config["layers"], lay.pp) if lay.pp > 1 else None)
    dims = ParallelDims(pp=lay.pp, dp_shard=lay.dp_shard, cp=lay.cp, tp=lay.tp, world_size=lay.world_size)
    margs = model_args(config["shape"], config["layers"], config["seq"])
    est = max((estimate_memory(margs, dims, plan, seq_len=config["seq"], micro_batch_size=1, n_micro=n_micro,
                               pp_rank=r, optimizer="bf16_moments" if row.get("moments") == "bf16" else "fused")
               for r in range(lay.pp)), key=lambda e: e.peak_bytes)
    return {"impl": row["impl"], "measured_peak_gib": row["peak_allocated_gib"],
            "predicted_peak_gib": est.peak_bytes / GIB, "predicted_phase": est.peak_phase,
            "predicted_at_run_time_gib": row.get("predicted_peak_gib"),
            "ratio": est.peak_bytes / GIB / row["peak_allocated_gib"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="train_throughput results JSON files")
    p.add_argument("--name", default="memory_estimate_throughput")
    args = p.parse_args()
    rows, targets = [], []
    for path in args.results:
        run = json.loads(Path(path).read_text())
        for r in run["rows"]:
            if r.get("framework") != "ours" or r.get("status") != "ok" or not r.get("peak_allocated_gib"):
                continue
            est = {**estimate_row(r, run["config"]), "source": Path(path).name, "device": run["device"],
                   "date": run["date"]}
            rows.append(est)
            targets.append({"name": f"{est['source']} {r['impl']}: estimate / measured peak allocated",
                            "value": est["ratio"], "goal": [0.9, 1.1], "higher_is_better": None})
            print(f"{est['source']:40s} {r['impl']:38s} measured {est['measured_peak_gib']:6.2f}  "
                  f"predicted {est['predicted_peak_gib']:6.2f}  {est['ratio']:.3f}  ({est['predicted_phase']})")
    print(write_results(args.name, rows, targets, out_dir=str(ROOT / "benchmarks" / "results"),
                        note="estimated on the CPU from the measured rows of the named files"))


if __name__ == "__main__":
    main()
