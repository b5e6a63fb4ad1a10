"""Tokens/s of trainer runs (``--metrics`` JSONL files) side by side, as a results JSON.

    python3 benchmarks/train_metrics_summary.py --out results.json --baseline no-compile \\
        --device "2 x NVIDIA H200" --versions "torch 2.11.0+cu130, triton 3.6.0" \\
        compile=moe_compile.jsonl no-compile=moe_no-compile.jsonl

Each run: the median of its steps after ``--skip`` (the first steps compile and warm up),
the mean, the peak memory, the last loss; each other run against ``--baseline`` (a run of
the same call, so of the same machine and moment).
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
    p.add_argument("--skip", type=int, default=2, help="leading steps left out (compile, warm-up)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--versions", required=True)
    p.add_argument("--command", default="", help="what produced the runs")
    args = p.parse_args(argv)
    rows = {}
    for spec in args.runs:
        name, _, path = spec.partition("=")
        rows[name] = summarize(Path(path), args.skip)
    if args.baseline not in rows:
        p.error(f"--baseline {args.baseline!r} is not among {list(rows)}")
    base = rows[args.baseline]["tokens_per_s_per_gpu_median"]
    ratios = {f"{n} / {args.baseline} tokens/s/GPU (medians)": r["tokens_per_s_per_gpu_median"] / base
              for n, r in rows.items() if n != args.baseline}
    out = {"device": args.device, "versions": args.versions, "command": args.command, "skip": args.skip,
           "baseline": args.baseline, "rows": rows, "ratios": ratios}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
