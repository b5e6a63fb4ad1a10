"""What content hashes cost a checkpoint save (issue 20, item 4), on an 8B-shaped shard.

The state one FSDP rank saves for 2 layers of Llama 3 8B (dim 4096, 32/8 heads, SwiGLU
14336) sharded N ways (default 8): every weight's dim-0 shard in fp32 with its AdamW
``exp_avg``, ``exp_avg_sq`` and ``step``, under our checkpoint's key names. It is saved
with DCP (one process, one file, fsynced, as a rank of a real save writes) twice per
repetition, alternating which goes first: with DCP's own ``FileSystemWriter`` (the
baseline: the save without hashing, in the same run) and with our ``HashingWriter``
(sha256 of every 16 MiB block hashed in a helper thread while it is written, the rank's
digests, then ``.metadata``, ``checkpoint.json`` and ``manifest.json``); ``os.sync()``
before each. The target is ``median(hashed) / median(baseline) - 1``, at most 10%. Also measured: the pure hash
throughput on this CPU and the time to verify the written checkpoint (one process, 4
threads), which a load pays once.

    python benchmarks/checkpoint_hash_cost.py                # FSDP8 shard, 8 repetitions, under /tmp
    python benchmarks/checkpoint_hash_cost.py --fsdp 4 --reps 5 --dir /dev/shm   # no disk: the worst case
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from dtensor_parallel.checkpoint import manifest
from dtensor_parallel.checkpoint.atomic import META_FILE

MIB = 2 ** 20
# Llama 3 8B: (rows, cols) of one layer's weights
LAYER = {"attention.wq.weight": (4096, 4096), "attention.wk.weight": (1024, 4096),
         "attention.wv.weight": (1024, 4096), "attention.wo.weight": (4096, 4096),
         "feed_forward.w1.weight": (14336, 4096), "feed_forward.w2.weight": (4096, 14336),
         "feed_forward.w3.weight": (14336, 4096), "attention_norm.weight": (4096,), "ffn_norm.weight": (4096,)}


def shard_state(layers: int, fsdp: int) -> dict[str, torch.Tensor]:
    """One FSDP rank's parameters and AdamW state (random values: incompressible, as trained ones)."""
    g = torch.Generator().manual_seed(0)
    flat: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for name, shape in LAYER.items():
            rows = -(-shape[0] // fsdp)
            shard = (rows, *shape[1:])
            key = f"layers.{i}.{name}"
            flat[f"model.{key}"] = torch.randn(shard, generator=g)
            flat[f"optim.{key}.exp_avg"] = torch.randn(shard, generator=g)
            flat[f"optim.{key}.exp_avg_sq"] = torch.rand(shard, generator=g)
            flat[f"optim.{key}.step"] = torch.tensor(100.0)
    return flat


def save(flat: dict, path: Path, hashed: bool) -> float:
    os.sync()  # start each save with no other dirty pages being written back
    path.mkdir(parents=True)
    (path / META_FILE).write_text(json.dumps({"step": 100}))  # ours: hashed into the manifest
    writer = manifest.HashingWriter(path) if hashed else FileSystemWriter(path)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(flat, storage_writer=writer, no_dist=True)
    return time.perf_counter() - t0


def hash_throughput(nbytes: int = 256 * MIB) -> float:
    buf = memoryview(torch.randint(0, 255, (nbytes,), dtype=torch.uint8).numpy().tobytes())
    t0 = time.perf_counter()
    h = hashlib.new(manifest.ALGORITHM)
    for i in range(0, nbytes, 16 * MIB):
        h.update(buf[i:i + 16 * MIB])
    return nbytes / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--fsdp", type=int, default=8, help="the FSDP degree whose one shard is saved")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoint_hash_cost.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    flat = shard_state(a.layers, a.fsdp)
    nbytes = sum(t.numel() * t.element_size() for t in flat.values())
    print(f"shard: {len(flat)} tensors, {nbytes / MIB:.0f} MiB ({a.layers} layers of 8B, FSDP{a.fsdp})", flush=True)
    work = Path(tempfile.mkdtemp(prefix="ckpt_hash_", dir=a.dir))
    base, hashed, verify_s = [], [], []
    try:
        for r in range(a.reps):
            order = (False, True) if r % 2 == 0 else (True, False)
            for h in order:
                path = work / f"r{r}_{'hashed' if h else 'plain'}"
                dt = save(flat, path, h)
                (hashed if h else base).append(dt)
                print(f"rep {r} {'hashed  ' if h else 'baseline'} save {dt:.2f} s "
                      f"({nbytes / dt / MIB:.0f} MiB/s)", flush=True)
                if h and r == a.reps - 1:  # once, out of the timed loop's way
                    t0 = time.perf_counter()
                    assert manifest.verify(path, collective=False)
                    verify_s.append(time.perf_counter() - t0)
                shutil.rmtree(path)
        tput = hash_throughput()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    overheads = [h / b - 1 for h, b in zip(hashed, base)]
    med_base, med_hashed = statistics.median(base), statistics.median(hashed)
    overhead = med_hashed / med_base - 1  # the orders alternate, so neither side always goes first
    print(f"baseline {med_base:.2f} s, hashed {med_hashed:.2f} s (medians): overhead {overhead:+.1%} "
          f"(per repetition {[f'{o:+.1%}' for o in overheads]}); verify {statistics.median(verify_s):.2f} s; "
          f"{manifest.ALGORITHM} alone {tput / MIB:.0f} MiB/s", flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    result = {
        "benchmark": "checkpoint_hash_cost",
        "date": datetime.date.today().isoformat(),
        "device": f"CPU ({cpu}, {os.cpu_count()} cores; shared, load average {os.getloadavg()[0]:.1f})",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "shard": f"{a.layers} layers of Llama 3 8B, one FSDP{a.fsdp} rank: fp32 params + AdamW moments",
        "bytes": nbytes, "algorithm": manifest.ALGORITHM, "block_bytes": manifest.BLOCK_BYTES,
        "baseline": {"what": "dcp.save with FileSystemWriter (fsynced), same run", "save_s": base,
                     "median_s": med_base},
        "hashed": {"what": "dcp.save with HashingWriter", "save_s": hashed, "median_s": med_hashed},
        "overheads": overheads,
        "verify_s": verify_s,
        "hash_only_mib_per_s": tput / MIB,
        "targets": [{"name": "save time added by content hashing (median hashed / median baseline - 1)",
                     "value": overhead, "goal": 0.10, "higher_is_better": False}],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
