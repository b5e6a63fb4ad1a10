"""Shared benchmark plumbing: environment facts and the results JSON of DESIGN.md."""

from __future__ import annotations

import datetime
import json
import os
import statistics
from pathlib import Path
from typing import Any

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


def write_results(name: str, rows: list[dict], targets: list[dict], out_dir: str | None = None,
                  **extra: Any) -> Path:
    """Write ``<out_dir>/<name>.json`` (``$OUT`` on the device machine, else
    ``benchmarks/results``)."""
    out = Path(out_dir or os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({**environment(), **extra, "rows": rows, "targets": targets}, indent=2) + "\n")
    return path
