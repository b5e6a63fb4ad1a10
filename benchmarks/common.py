"""Shared benchmark plumbing: environment facts and the results JSON of DESIGN.md."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch


def environment() -> dict[str, Any]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "n_devices": torch.cuda.device_count(), "torch": torch.__version__,
            "triton": triton_version, "date": datetime.date.today().isoformat()}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def median_ms(fn: Callable[[], object], *, cuda: bool, warmup: int, iters: int,
              before: Callable[[], object] | None = None) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls after ``warmup``: CUDA events
    on the GPU, the wall clock elsewhere; ``before`` runs ahead of each call, untimed (a
    barrier, say)."""
    times = []
    for i in range(warmup + iters):
        if before is not None:
            before()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = 1e3 * (time.perf_counter() - t0)
        if i >= warmup:
            times.append(ms)
    return median(times)


def write_results(name: str, rows: list[dict], targets: list[dict], out_dir: str | None = None,
                  **extra: Any) -> Path:
    """Write ``<out_dir>/<name>.json`` (``$OUT`` on the device machine, else
    ``benchmarks/results``)."""
    out = Path(out_dir or os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({**environment(), **extra, "rows": rows, "targets": targets}, indent=2) + "\n")
    return path
