"""Tokens/s of trainer runs (``--metrics`` JSONL files) side by side, as a results JSON.

    python3 benchmarks/train_metrics_summary.py --out results.json --baseline no-compile \\
        --device "2 x NVIDIA H200" --torch 2.11.0+cu130 --triton 3.6.0 --date 2026-11-30 \\
        compile=moe_compile.jsonl no-compile=moe_no-compile.jsonl

Each run: the median of its steps after ``--skip`` (the first steps compile and warm up),
the mean, the peak memory, the last loss; each other run against ``--baseline`` (a run of
the same call, so of the same machine and moment) as a target (``--goal``, default 1.0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def summarize(path: Path, skip: int) -> dict:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    timed = [r["tokens_per_s_per_gpu"] for r in recs[skip:]]
    if not timed:
        raise ValueError(f"{path}: {len(recs)} steps, none after --skip {skip}")
    return {"file": path.name, "steps": len(recs), "timed_steps": len(timed),
            "tokens_per_s_per_gpu_median": statistics.median(timed), "tokens_per_s_per_gpu_mean": statistics.fmean(timed),
            "tokens_per_s_per_gpu_min": min(timed), "tokens_per_s_per_gpu_max": max(timed),
            "peak_mem_gib": max(r.get("peak_mem_gib") or 0.0 for r in recs), "last_loss": recs[-1]["loss"]}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="NAME=JSONL")
    p.add_argument("--baseline", required=True, help="the NAME the others are compared with")
    p.add_argument("--goal", type=float, default=1.0,
                   help="each run's median tokens/s over the baseline's should reach this")
    p.add_argument("--skip", type=int, default=2, help="leading steps left out (compile, warm-up)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--torch", required=True)
    p.add_argument("--triton", required=True)
    p.add_argument("--date", required=True, help="YYYY-MM-DD of the runs")
    p.add_argument("--command", default="", help="what produced the runs")
    args = p.parse_args(argv)
    rows = []
    for spec in args.runs:
        name, _, path = spec.partition("=")
        rows.append({"impl": name, **summarize(Path(path), args.skip)})
    by_name = {r["impl"]: r for r in rows}
    if args.baseline not in by_name:
        p.error(f"--baseline {args.baseline!r} is not among {list(by_name)}")
    base = by_name[args.baseline]["tokens_per_s_per_gpu_median"]
    targets = [{"name": f"{r['impl']} / {args.baseline}: tokens/s/GPU (medians of the timed steps)",
                "value": r["tokens_per_s_per_gpu_median"] / base, "goal": args.goal, "higher_is_better": True}
               for r in rows if r["impl"] != args.baseline]
    out = {"device": args.device, "torch": args.torch, "triton": args.triton, "date": args.date,
           "command": args.command, "skip": args.skip, "baseline": args.baseline, "rows": rows, "targets": targets}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(targets, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
