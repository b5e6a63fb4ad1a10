"""Part 1 of ``moe_dispatch.py`` (``--part permute_unpermute``, one GPU): the local Triton
permute / unpermute against a copy of the same bytes and the plain-PyTorch paths.

Shapes: T = 8192 tokens, H 4096 / E 8 / top-2 (Mixtral) and H 7168 / top-8 with E 64 and
256 (DeepSeek); k distinct random experts per token, softmaxed fp32 weights, bf16 rows.

Impls (each a forward, and forward+backward through ``torch.autograd.grad``):

- ``triton_permute`` (``permute(..., routing=True)``, routing included),
  ``triton_unpermute`` (``unpermute(..., pos=pos)``), ``triton_permute_unpermute``
  (permute, then unpermute of its output: an identity expert): the MoE layer's calls
  (``ParallelDispatch``); ``triton_unpermute_row_map``: unpermute from a row_map (one more
  launch, the inversion). results/moe_permute.json was measured while a one-launch
  routing was the default: there ``triton_permute_unpermute`` is that path and
  ``triton_permute_unpermute_two_launch_routing`` the two launches kept since;
- ``torch_ref_*``: ``permute_ref`` / ``unpermute_ref`` (argsort + gather; argsort + fp32
  weighted sum); ``torch_moe_index_path_permute_unpermute``: ``MoE.forward`` without the
  kernels (``expert_slots``, ``x[slots // k]``, ``zeros.index_add_``);
- ``copy_d2d``: ``dst.copy_(src)`` of as many bytes (read + written) as the permute+unpermute
  forward, in the same run: the bandwidth ceiling.

Byte convention: only the (rows, H) activation tensors count, each element once per read
and once per write (routing metadata, O(T k) integers, < 0.1%, left out; the same count for
every impl, so bandwidth ratios are time ratios). With e = 2 bytes (bf16):
    permute     fwd: read T H, write T k H                      = (T H + T k H) e
                bwd: read T k H (dx_sorted), write T H          = (T H + T k H) e
    unpermute   fwd: read T k H, write T H                      = (T H + T k H) e
                bwd: read dout T H and y T k H (for dw), write dy T k H = (T H + 2 T k H) e
    permute+unpermute fwd = 2 (T H + T k H) e;  fwd+bwd = (4 T H + 5 T k H) e.

Three measures per row, named in its keys (none replaces another):

- ``median_ms`` / ``fwd_bwd_ms`` (**per call**): CUDA events around one eager call, warm-up
  then the median. A call starts with an idle GPU, so the host's work before and between
  launches counts: what a caller that does nothing else sees. The issue's goals use this.
- ``host_us`` / ``fwd_bwd_host_us``: the host time of one call while the GPU is kept busy
  (a ``torch.cuda._sleep`` ahead, so no launch waits on the device): the launch cost alone.
- ``graph_ms`` / ``fwd_bwd_graph_ms`` (**GPU-side**): a CUDA graph of ``graph_reps``
  back-to-back calls, replayed, time / reps: the kernels without host gaps; and
  ``kernel_ms`` / ``fwd_bwd_kernel_ms``: the sum of the CUDA kernels' durations per call
  (torch.profiler), which also leaves out the gaps between kernels.

CUDA graphs, read critically (the rows of 2026-11-26/30 were wrong): the impls were lambdas
closing over the loop's variables (``x``, ``ids``, ``w``, ...), replayed after the loop, so
every shape's graph ran the *last* shape's tensors (the "0.51 ms at both shapes" was the
H7168 E256 permute twice), and ``autograd.grad`` was asked for the gradient of the shape's
own ``x``, which that graph never used ("appears to not have been used"). Here each shape's
impls are built by a function (fresh closures); the warm-up runs on a side stream before
capture (compiles and allocations happen there, and there is no autotuner left to benchmark
inside a capture); the routing's ticket is allocated by the graph itself under capture; the
replay is timed with events like any call.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from common import median_ms
from dtensor_parallel.models.moe import expert_slots
from triton_kernels.moe_dispatch import permute, permute_ref, unpermute, unpermute_ref

PART = "permute_unpermute"


class Bench:
    """Timing of one call of fn: CUDA events (perf_counter on CPU), warm-up first; host time,
    CUDA-graph replay and profiler kernel time on the GPU (module docstring)."""

    def __init__(self, cuda: bool, warmup: int, iters: int):
        self.cuda, self.warmup, self.iters = cuda, warmup, iters

    def __call__(self, fn, barrier: bool = False, iters: int | None = None) -> float:
        """Median ms of one call (per call: host gaps included); ``barrier``: a dist.barrier,
        untimed, ahead of each call."""
        return median_ms(fn, cuda=self.cuda, warmup=self.warmup, iters=self.iters if iters is None else iters,
                         before=dist.barrier if barrier else None)

    def host_us(self, fn, calls: int = 20) -> float:
        """Host microseconds per call with the GPU busy ahead (no launch waits on the device)."""
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock cycles: longer than the calls' host time
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        return host / calls * 1e6

    def kernel_ms(self, fn, calls: int = 10) -> float:
        """Sum of the CUDA kernels' (and memcpy/memset) durations per call, torch.profiler."""
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        total_us = sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)
        return total_us / calls / 1e3

    def graph(self, fn, reps: int) -> float:
        """Median ms per call of a CUDA graph holding ``reps`` calls of fn (CUDA only)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture stream (compiles, allocator)
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        torch.cuda.synchronize()
        try:
            return self(g.replay) / reps
        finally:
            del g
            torch.cuda.synchronize()


def with_backward(fn, inputs: list[torch.Tensor]):
    """fn() then the gradients of its output w.r.t. inputs (torch.autograd.grad: nothing
    accumulates into .grad between iterations), against a fixed random output gradient."""
    state: dict[str, torch.Tensor] = {}

    def run():
        out = fn()
        if "g" not in state:
            gen = torch.Generator(device=out.device).manual_seed(1)
            state["g"] = torch.randn(out.shape, device=out.device, dtype=out.dtype, generator=gen)
        return torch.autograd.grad(out, inputs, state["g"])
    return run


def err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def routing(t: int, e: int, k: int, device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct random experts per token (T, k) int64 and softmaxed fp32 weights (T, k)."""
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.rand(t, e, device=device, generator=g).topk(k, dim=-1).indices
    w = torch.randn(t, k, device=device, generator=g).softmax(-1)
    return ids, w


def torch_moe_path(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, n_experts: int) -> torch.Tensor:
    """MoE.forward's dispatch without the kernels (dropless), with an identity expert."""
    k = ids.shape[1]
    slots, _, _ = expert_slots(ids, n_experts, None)
    rows = x[slots // k]  # (T*k, H)
    ws = w.reshape(-1)[slots].unsqueeze(-1).to(rows.dtype)
    return torch.zeros_like(x).index_add_(0, slots // k, rows * ws)


def shape_name(t: int, h: int, n_exp: int, k: int, dtype) -> str:
    return f"T{t} H{h} E{n_exp} top{k} {str(dtype).removeprefix('torch.')}"


def impls_of(t: int, h: int, n_exp: int, k: int, dtype, device) -> dict:
    """{name: (op, fn, inputs)} for one shape; fresh tensors and closures (never the loop's)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(t, h, device=device, dtype=dtype, generator=g).requires_grad_()
    ids, w = routing(t, n_exp, k, device, seed=1)
    w.requires_grad_()
    y = torch.randn(t * k, h, device=device, dtype=dtype, generator=g).requires_grad_()
    with torch.no_grad():
        _, row_map, _, pos = permute(x, ids, n_experts=n_exp, routing=True)
        ref_map = permute_ref(x, ids)[1]
        if not torch.equal(row_map, ref_map):  # same stable order: else the rows mean nothing
            raise RuntimeError("triton permute's row_map differs from the argsort reference")

    def permute_unpermute():
        rows, _, _, p = permute(x, ids, n_experts=n_exp, routing=True)
        return unpermute(rows, None, w, pos=p)

    return {
        "triton_permute": ("permute", lambda: permute(x, ids, n_experts=n_exp, routing=True)[0], [x]),
        "triton_unpermute": ("unpermute", lambda: unpermute(y, None, w, pos=pos), [y, w]),
        "triton_unpermute_row_map": ("unpermute", lambda: unpermute(y, row_map, w), [y, w]),
        "triton_permute_unpermute": ("permute_unpermute", permute_unpermute, [x, w]),
        "torch_ref_permute": ("permute", lambda: permute_ref(x, ids)[0], [x]),
        "torch_ref_unpermute": ("unpermute", lambda: unpermute_ref(y, ref_map, w), [y, w]),
        "torch_ref_permute_unpermute": ("permute_unpermute", lambda: unpermute_ref(*permute_ref(x, ids), w), [x, w]),
        "torch_moe_index_path_permute_unpermute": (
            "permute_unpermute", lambda: torch_moe_path(x, ids, w, n_exp), [x, w]),
    }


def _copy_row(shape: str, nbytes: int, dtype, device, bench: Bench, graph_reps: int) -> dict:
    """copy_d2d: as many bytes read + written as the permute+unpermute forward."""
    row = {"part": PART, "impl": "copy_d2d", "shape": shape}
    try:
        e_size = torch.finfo(dtype).bits // 8
        src = torch.randn(nbytes // 2 // e_size, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        moved = 2 * src.numel() * e_size
        ms = bench(lambda: dst.copy_(src))
        row.update(median_ms=ms, bytes=moved, GBps=moved / ms / 1e6)
        if device.type == "cuda" and graph_reps:
            gms = bench.graph(lambda: dst.copy_(src), graph_reps)
            row.update(graph_ms=gms, graph_GBps=moved / gms / 1e6, graph_reps=graph_reps)
    except Exception as e:  # noqa: BLE001
        row["error"] = err_text(e)
    return row


def part_permute(shapes, dtype, device, bench: Bench, emit, graph_reps: int = 0) -> None:
    """Every impl at every shape: per-call times, and on the GPU host time, kernel time and
    (graph_reps > 0) CUDA-graph replays (module docstring)."""
    cuda = device.type == "cuda"
    e_size = torch.finfo(dtype).bits // 8
    for t, h, n_exp, k in shapes:
        shape = shape_name(t, h, n_exp, k, dtype)
        th, tkh = t * h * e_size, t * k * h * e_size
        nbytes = {  # (forward, forward+backward), see the docstring
            "permute": (th + tkh, 2 * (th + tkh)),
            "unpermute": (th + tkh, 2 * th + 3 * tkh),
            "permute_unpermute": (2 * (th + tkh), 4 * th + 5 * tkh),
        }
        try:
            impls = impls_of(t, h, n_exp, k, dtype, device)
        except Exception as e:  # noqa: BLE001
            emit({"part": PART, "impl": "setup", "shape": shape, "error": err_text(e)})
            continue

        emit(_copy_row(shape, nbytes["permute_unpermute"][0], dtype, device, bench, graph_reps))
        for name, (op, fn, inputs) in impls.items():
            b_fwd, b_both = nbytes[op]
            row = {"part": PART, "impl": name, "shape": shape, "bytes": b_fwd, "fwd_bwd_bytes": b_both}
            both_fn = with_backward(fn, inputs)
            for prefix, f, b in (("", fn, b_fwd), ("fwd_bwd_", both_fn, b_both)):
                try:
                    ms = bench(f)
                    row.update({prefix + "ms" if prefix else "median_ms": ms, prefix + "GBps": b / ms / 1e6})
                    if cuda:
                        row[prefix + "host_us"] = bench.host_us(f)
                        kms = bench.kernel_ms(f)
                        row.update({prefix + "kernel_ms": kms, prefix + "kernel_GBps": b / kms / 1e6})
                    if cuda and graph_reps and name.startswith(("triton_", "torch_ref_")):
                        gms = bench.graph(f, graph_reps)
                        row.update({prefix + "graph_ms": gms, prefix + "graph_GBps": b / gms / 1e6,
                                    "graph_reps": graph_reps})
                except Exception as e:  # noqa: BLE001
                    row[prefix + "error"] = err_text(e)
            emit(row)
        del impls
        if cuda:
            torch.cuda.empty_cache()


def permute_targets(rows: list[dict], shapes: list[str]) -> list[dict]:
    """Issue 22 item 3: >= 0.6x copy bandwidth at H4096 top-2 and >= 0.8x at H7168 top-8,
    forward and forward+backward, on the per-call measure (the issue's); the same ratios on
    the GPU-side measure (CUDA-graph replay against the copy's replay) beside them; >= 3x
    the faster torch path per call."""
    by = {(r["impl"], r["shape"]): r for r in rows if r.get("part") == PART}
    nan = float("nan")

    def get(impl, shape, key):
        v = by.get((impl, shape), {}).get(key)
        return nan if v is None else v

    def ratio(a, b):
        return a / b if b and b == b and a == a else nan

    out = []
    for s in shapes:
        goal = 0.6 if " top2 " in s else 0.8
        tri = "triton_permute_unpermute"
        copy, copy_graph = get("copy_d2d", s, "GBps"), get("copy_d2d", s, "graph_GBps")
        measures = [("per call (CUDA events around one eager call, host launch gaps included)", "GBps", copy),
                    ("GPU-side (CUDA-graph replay, no host gaps; copy replayed alike)", "graph_GBps", copy_graph)]
        for label, key, base in measures:
            for what, k in (("fwd", key), ("fwd+bwd", "fwd_bwd_" + key)):
                out.append({"name": f"{s}: triton permute+unpermute {what} bandwidth / copy_d2d, {label}",
                            "value": ratio(get(tri, s, k), base), "goal": goal, "higher_is_better": True,
                            "measure": "per_call" if key == "GBps" else "cuda_graph"})
        for what, k in (("fwd", "median_ms"), ("fwd+bwd", "fwd_bwd_ms")):
            torch_ms = min(get("torch_ref_permute_unpermute", s, k), get("torch_moe_index_path_permute_unpermute", s, k))
            out.append({"name": f"{s}: triton permute+unpermute {what} speed-up over the faster torch path, per call",
                        "value": ratio(torch_ms, get(tri, s, k)), "goal": 3.0, "higher_is_better": True,
                        "measure": "per_call"})
    return out
