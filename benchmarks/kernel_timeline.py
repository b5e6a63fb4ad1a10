"""Where a rank's GPU time goes over profiled steps: compute kernels, NCCL kernels, idle.

``kernel_split(prof, steps, wall_s)`` reads a ``torch.profiler`` trace (CUDA activity) and
returns per step, in ms:

- ``compute_ms``: the union of the intervals of every non-NCCL kernel (and memcpy/memset),
  so kernels overlapping on two streams count once;
- ``nccl_ms``: the summed duration of the NCCL kernels (they may overlap compute: a P2P
  kernel posted early spins on its SMs until the peer's data arrives);
- ``nccl_overlapping_compute_ms``: how much of that NCCL time ran while a compute kernel
  also ran (where SM sharing can slow the compute);
- ``p2p_wait_ms`` / ``p2p_wait_overlapping_compute_ms``: the copy-engine pipeline P2P's one-thread
  wait kernels (``pipeline/copy_engine_p2p.py``; on the consumer's stream, or a side stream
  waiting for a slot's ack), kept out of the compute union like NCCL's kernels;
  ``memcpy_peer_ms``: peer-to-peer copies (its copy-engine pushes; no SM);
- ``idle_ms``: the wall time of the steps minus the compute union (bubble, exposed
  communication and host gaps together);
- ``top``: the compute kernels with the most time, (ms per step, calls per step, name).

Used by ``pipeline.py --profile`` to tell a slower schedule's causes apart: more compute
kernel time (kernels slowed, or more of them) against more idle time (bubble, waits, host).
"""

from __future__ import annotations


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3  # us -> ms


def _overlap_ms(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Length of (union of xs) intersected with (union of ys), in ms."""
    def merged(iv):
        out = []
        for a, b in sorted(iv):
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return out
    mx, my = merged(xs), merged(ys)
    i = j = 0
    total = 0.0
    while i < len(mx) and j < len(my):
        lo, hi = max(mx[i][0], my[j][0]), min(mx[i][1], my[j][1])
        if hi > lo:
            total += hi - lo
        if mx[i][1] < my[j][1]:
            i += 1
        else:
            j += 1
    return total / 1e3


def kernel_split(prof, steps: int, wall_s: float, top: int = 12, is_comm=None) -> dict:
    """The per-step split described in the module docstring (``wall_s``: the profiled steps'
    total wall time). ``is_comm(name)``: which kernels count as communication (the "nccl_"
    keys); default: NCCL's."""
    import torch

    compute, nccl, waits, peer, per_name = [], [], [], [], {}
    for e in prof.events():
        if (e.device_type != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False)
                or e.name.startswith("PP:")):
            continue  # (record_function ranges mirrored on the GPU, e.g. the schedules' "PP:0F7", span kernels and gaps)
        iv = (e.time_range.start, e.time_range.end)
        if (is_comm(e.name) if is_comm is not None else "nccl" in e.name.lower()):
            nccl.append(iv)
            continue
        if "_wait_kernel" in e.name:
            waits.append(iv)
            continue
        if e.name.startswith("Memcpy") and "PtoP" in e.name:
            peer.append(iv)
            continue
        compute.append(iv)
        ms, n = per_name.get(e.name, (0.0, 0))
        per_name[e.name] = (ms + (iv[1] - iv[0]) / 1e3, n + 1)
    compute_ms = _union_ms(compute) / steps
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "wall_ms": 1e3 * wall_s / steps,
        "compute_ms": compute_ms,
        "nccl_ms": sum(b - a for a, b in nccl) / 1e3 / steps,
        "nccl_overlapping_compute_ms": _overlap_ms(nccl, compute) / steps,
        "p2p_wait_ms": sum(b - a for a, b in waits) / 1e3 / steps,
        "p2p_wait_overlapping_compute_ms": _overlap_ms(waits, compute) / steps,
        "memcpy_peer_ms": sum(b - a for a, b in peer) / 1e3 / steps,
        "idle_ms": 1e3 * wall_s / steps - compute_ms,
        "n_compute_kernels": len(compute) // steps,
        "top": [(round(ms / steps, 3), n // steps, name[:100]) for name, (ms, n) in ranked],
    }
