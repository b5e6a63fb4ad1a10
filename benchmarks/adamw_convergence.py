"""Training with AdamW's moments in bf16 against fp32: the loss curves of the same run.

Runs ``dtensor-parallel train`` (the debug recipe's tiny Llama on its Markov chain, one CPU
rank, or any recipe and flags) with ``--exp-avg-dtype fp32`` and ``bf16`` for each ``beta2``,
and writes the per-step losses, the mean loss of the last quarter of the steps for each, and
their difference. ``beta2 = 0.999`` is where rounding to nearest would freeze the second
moment (``dtensor_parallel/adamw.py``).

    python3 benchmarks/adamw_convergence.py --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_results

ROOT = Path(__file__).resolve().parents[1]


def run(recipe: str, flags: list[str], metrics: Path) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "dtensor_parallel", "train", recipe, *flags, "--metrics", str(metrics)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "debug.toml"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--beta2", default="0.95,0.999")
    p.add_argument("--flags", default="--nproc-per-node 1 --tensor-model-parallel-size 1 --lr-warmup-iters 20",
                   help="more train flags (default: one CPU rank)")
    p.add_argument("--name", default="adamw_convergence")
    args = p.parse_args()
    rows, targets = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for beta2 in args.beta2.split(","):
            curves = {}
            for dtype in ("fp32", "bf16"):
                flags = args.flags.split() + ["--train-iters", str(args.steps), "--adam-beta2", beta2,
                                              "--exp-avg-dtype", dtype, "--exp-avg-sq-dtype", dtype]
                curves[dtype] = run(args.recipe, flags, Path(tmp) / f"{beta2}_{dtype}.jsonl")
                tail = curves[dtype][-max(1, args.steps // 4):]
                rows.append({"beta2": float(beta2), "moments": dtype, "losses": curves[dtype],
                             "first": curves[dtype][0], "tail_mean": sum(tail) / len(tail)})
                print({k: v for k, v in rows[-1].items() if k != "losses"}, flush=True)
            gap = max(abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"]))
            tail_gap = rows[-1]["tail_mean"] - rows[-2]["tail_mean"]
            targets.append({"name": f"beta2 {beta2}: tail mean loss, bf16 moments - fp32", "value": tail_gap,
                            "max_abs_step_gap": gap, "goal": None})
            print(targets[-1], flush=True)
    print("wrote", write_results(args.name, rows, targets, recipe=args.recipe, steps=args.steps, flags=args.flags))


if __name__ == "__main__":
    main()
