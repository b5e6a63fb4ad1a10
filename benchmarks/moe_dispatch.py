"""MoE dispatch: Triton permute/unpermute bandwidth, the MoE layer's TFLOP/s, EP2 all-to-all.

    cd benchmarks && torchrun --standalone --nproc-per-node 2 moe_dispatch.py
    cd benchmarks && TRITON_INTERPRET=1 OUT=/tmp/moe_smoke torchrun --standalone \\
        --nproc-per-node 2 moe_dispatch.py --smoke   # tiny shapes, CPU, gloo: logic only

Rank 0 runs parts 1 and 2 on its GPU while rank 1 waits at a barrier; both run part 3.
Every measured item is wrapped: one that fails is a row with ``error``.
Times: CUDA events around one call, warm-up then the median (``--smoke``: perf_counter).
bf16 activations and weights; router weights fp32 (as MoE's router makes them).

1. ``part: permute_unpermute`` (``moe_permute_bench.py``, whose docstring has the impls, byte
   counts and measures): the Triton permute / unpermute at T 8192, H4096 E8 top-2 and H7168
   top-8 (E 64, 256) against a copy of the same bytes and the torch paths; per call (CUDA
   events around one eager call), host time, kernel time and CUDA-graph replay. Alone on one
   GPU: ``python moe_dispatch.py --part permute_unpermute`` (no torchrun; ``moe_permute.json``).

2. ``part: moe_layer``. ``MoE(dim 4096, MoEArgs(8 experts, top 2, ffn 14336))``, 8192 tokens
   (batch 1), forward and forward+backward (grads of the input, expert weights and router):
   ``moe_dispatch_triton`` / ``moe_dispatch_torch`` (``ParallelDispatch(kernels=...)``; both run the
   experts through ``grouped_swiglu``, ``torch._grouped_mm`` where torch has it), against
   ``loop_over_experts`` (written here: per expert, ``torch.where`` its tokens, index them,
   SwiGLU with plain matmuls, ``index_add_`` back with the router weights; same router and
   weights) and ``grouped_swiglu_only`` (the grouped GEMMs alone on pre-permuted rows with
   the same routing counts: the expert-compute ceiling of the layer).
   FLOPs: forward 3 matmuls x 2 x T x k x H x F (router and elementwise ops not counted);
   forward+backward 3x the forward.

3. ``part: ep2``, both ranks. 8192 tokens per GPU, H 4096, 8 experts, top 2, rows already
   sorted by expert: ``ep2_dispatch_combine_identity`` is
   ``expert_parallel.dispatch_combine`` with an identity expert (counts all-to-all, rows
   there, regroup by local expert, rows back) on the ep group of ``build_expert_groups``;
   ``nccl_all_to_all_single_x2`` is ``dist.all_to_all_single`` of the same rows with the same
   splits there and back (splits exchanged once, outside the timing; forward+backward: 4 of
   them); ``ep2_triton_permute_dispatch_combine_unpermute``: the whole token path around the
   experts. Bytes: the whole (T k, H) row buffer, there and back (2 T k H e; half of it stays
   on the rank with 2 GPUs): ``algbw_GBps`` = that / time; forward+backward counts it twice.
   ``median_ms`` is rank 0's; ``*_per_rank`` lists both.

   ``ep_symm_dispatch_combine_identity``: ``symm_dispatch.symm_dispatch_combine`` (issue 22:
   symmetric memory, no host sync) with the same identity expert, for every ``--ep-shape``
   (default issue 22 item 5's rows: H4096 top-2 and H7168 top-8, E 8 and 64);
   ``remote_GBps_per_gpu``: the rows this rank sends over NVLink, one way, / half the
   forward time (DeepEP's per-GPU convention; its anchor 153 / 158 GB/s on H800).
   ``ep_symm_dispatch_combine_identity_bound<b>``: the same with the receive bound
   ``--tight-bounds`` b (``ParallelPlan.moe_recv_bound``; the plain row has ``--recv-bound``,
   by default ep, the worst case), so the bound's effect is visible beside it: the
   dispatch output, and any work over it, has ``bound`` rows (issue 22b). A routing that
   exceeds a bound makes its row an ``error`` naming the bound (checked after the row).

4. ``part: moe_layer_ep``, both ranks: MoE(4096, 8 experts, top 2, ffn 14336) with E/ep local
   experts, forward+backward, through ``ParallelDispatch(kernels="triton")`` with the
   symmetric-memory exchange and with NCCL, against the local grouped SwiGLU alone on T*k
   rows (issue 22: the layer within 1.15x of it); ``moe_ep_triton_symm_bound<b>`` with each
   ``--tight-bounds`` receive bound (the SwiGLU's element-wise ops run over all bound rows).

Goals: part 1 >= 0.6x copy at H4096 top-2 and >= 0.8x at H7168 top-8 (issue 22 item 3; per
call, the issue's measure, with the CUDA-graph ratio beside it),
>= 3x torch; part 3 symmetric memory >= 1.2x NCCL (issue 22 item 5); parts 2-3's NCCL-path
goals (beat the loop, >= 0.9x NCCL) are this script's picks.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, without PYTHONPATH
from dtensor_parallel import build_mesh  # noqa: E402
from dtensor_parallel.expert_parallel import ParallelDispatch, build_expert_groups, dispatch_combine
from dtensor_parallel.expert_parallel import overlap, symm_dispatch
from dtensor_parallel.expert_parallel.symm_dispatch import choose_exchange, symm_dispatch_combine
from dtensor_parallel.mesh import ParallelDims
from dtensor_parallel.models.moe import MoE, MoEArgs, grouped_swiglu
from triton_kernels import moe_dispatch_rows
from triton_kernels.moe_dispatch import moe_dispatch, permute_ref, unpermute

from common import write_results
from moe_permute_bench import Bench, err_text, part_permute, permute_targets, routing, shape_name, with_backward

NAME = "moe_dispatch"


# ----------------------------------------------------------------------------------------
# Part 2: the MoE layer
# ----------------------------------------------------------------------------------------


def loop_over_experts(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Baseline: per expert, gather its tokens, SwiGLU with plain matmuls, index_add back."""
    b, s, d = x.shape
    flat = x.reshape(-1, d)  # (T, d)
    ids, weights, _ = moe.router(flat, b)  # (T, k), (T, k) fp32
    out = torch.zeros_like(flat)
    for e in range(moe.args.n_experts):
        tok, slot = torch.where(ids == e)  # synchronizes, as any loop over experts does
        xe = flat[tok]
        ye = (F.silu(xe @ moe.w1[e]) * (xe @ moe.w3[e])) @ moe.w2[e]
        out.index_add_(0, tok, ye * weights[tok, slot].unsqueeze(-1).to(ye.dtype))
    return out.view(b, s, d)


def part_moe_layer(t: int, dim: int, ffn: int, n_exp: int, k: int, dtype, device, bench: Bench, emit) -> None:
    shape = f"T{t} H{dim} F{ffn} E{n_exp} top{k} {str(dtype).removeprefix('torch.')}"
    flops = 3 * 2 * t * k * dim * ffn  # forward; forward+backward is 3x
    try:
        torch.manual_seed(0)
        with torch.device(device):
            moe = MoE(dim, MoEArgs(n_experts=n_exp, top_k=k, hidden_dim=ffn))
        moe.to(dtype)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, t, dim, device=device, dtype=dtype, generator=g).requires_grad_()
        params = [moe.w1, moe.w3, moe.w2, moe.router.gate.weight]
        with torch.no_grad():
            ids, _, _ = moe.router(x.reshape(-1, dim), 1)
            counts = torch.bincount(ids.reshape(-1), minlength=n_exp)
        rows = torch.randn(t * k, dim, device=device, dtype=dtype, generator=g).requires_grad_()
    except Exception as e:  # noqa: BLE001
        emit({"part": "moe_layer", "impl": "setup", "shape": shape, "error": err_text(e)})
        return

    def layer(backend: str):
        def fn():
            moe.dispatch = ParallelDispatch(kernels=backend)
            return moe(x)
        return fn

    impls = {
        "moe_dispatch_triton": (layer("triton"), [x, *params]),
        "moe_dispatch_torch": (layer("torch"), [x, *params]),
        "loop_over_experts": (lambda: loop_over_experts(moe, x), [x, *params]),
        "grouped_swiglu_only": (lambda: grouped_swiglu(rows, moe.w1, moe.w3, moe.w2, counts),
                                [rows, moe.w1, moe.w3, moe.w2]),
    }
    for name, (fn, inputs) in impls.items():
        row = {"part": "moe_layer", "impl": name, "shape": shape, "fwd_flops": flops}
        try:
            fwd = bench(fn)
            row.update(median_ms=fwd, fwd_tflops=flops / fwd / 1e9)
            both = bench(with_backward(fn, inputs))
            row.update(fwd_bwd_ms=both, fwd_bwd_tflops=3 * flops / both / 1e9)
        except Exception as e:  # noqa: BLE001
            row["error"] = err_text(e)
        emit(row)
    del moe, x, rows
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------
# Part 3: EP2 dispatch + combine
# ----------------------------------------------------------------------------------------


def bound_name(b: float) -> str:
    return f"bound{b:g}"


def symm_overflow_check(group: dist.ProcessGroup, cuda: bool) -> None:
    """Raise in this row if its last symmetric-memory call exceeded the receive bound, and
    forget it, so the next row starts clean (every rank sees the same largest count)."""
    if cuda:
        symm_dispatch.check_and_forget(group)


def overlap_name(o: tuple[int, int, int]) -> str:
    return f"chunks{o[0]}_p{o[1]}_s{o[2]}"


def _is_exchange_kernel(name: str) -> bool:
    return any(k in name for k in ("_push_kernel", "_copy_out_kernel", "_exchange_kernel", "nccl"))


def profile_calls(fn, group: dist.ProcessGroup, calls: int = 2) -> dict:
    """``fn`` ``calls`` times under torch.profiler: per call, the exchange's kernels (push,
    copy-out, counts; NCCL's) against every other kernel, and how long they ran side by side."""
    from kernel_timeline import kernel_split
    from torch.profiler import ProfilerActivity, profile

    dist.barrier(group)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    split = kernel_split(prof, calls, wall, top=6, is_comm=_is_exchange_kernel)
    return {"wall_ms": split["wall_ms"], "compute_ms": split["compute_ms"], "exchange_kernels_ms": split["nccl_ms"],
            "exchange_beside_compute_ms": split["nccl_overlapping_compute_ms"], "top": split["top"]}


def part_ep(t: int, h: int, n_exp: int, k: int, dtype, device, bench: Bench, emit,
            recv_bound: float | None = None, tight_bounds: tuple[float, ...] = ()) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    shape = f"{t} tokens/GPU H{h} E{n_exp} top{k} {str(dtype).removeprefix('torch.')}, ep{world}"
    e_size = torch.finfo(dtype).bits // 8
    row_bytes = t * k * h * e_size  # the (T k, H) buffer, each way
    try:
        mesh = build_mesh(dp_shard=world)
        groups = build_expert_groups(mesh, ParallelDims.from_mesh(mesh), world)
        group = groups.ep_group
        g = torch.Generator(device=device).manual_seed(100 + rank)
        x = torch.randn(t, h, device=device, dtype=dtype, generator=g).requires_grad_()
        ids, w = routing(t, n_exp, k, device, seed=200 + rank)
        w.requires_grad_()
        with torch.no_grad():
            rows0, _ = permute_ref(x, ids)
        rows = rows0.detach().clone().requires_grad_()  # (T*k, H) sorted by expert
        counts = torch.bincount(ids.reshape(-1), minlength=n_exp)  # (E,) int64
        # the splits, once: what we send to / receive from each rank
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)
        send_split = counts.view(world, -1).sum(1).tolist()
        recv_split = recv_counts.view(world, -1).sum(1).tolist()
        remote = sum(s for r, s in enumerate(send_split) if r != dist.get_rank(group)) * h * e_size
    except Exception as e:  # noqa: BLE001
        emit({"part": "ep2", "impl": "setup", "shape": shape, "error": err_text(e)})
        return
    identity = lambda xs, c: xs  # noqa: E731

    def nccl_there_and_back(inp: torch.Tensor, backward: bool) -> None:
        out = inp.new_empty(sum(recv_split), h)
        dist.all_to_all_single(out, inp, recv_split, send_split, group=group)
        back = torch.empty_like(inp)
        dist.all_to_all_single(back, out, send_split, recv_split, group=group)
        if backward:  # the gradients retrace the same two exchanges
            dist.all_to_all_single(out, back, recv_split, send_split, group=group)
            dist.all_to_all_single(inp.new_empty(inp.shape), out, send_split, recv_split, group=group)

    def full_path():
        xs, row_map, c, _ = moe_dispatch(x, ids, n_exp)  # c: int32 counts from the histogram kernel
        return unpermute(dispatch_combine(xs, c.long(), identity, groups), row_map, w)

    exchange = choose_exchange(world, device.type, "auto")  # symm on NVLink GPUs, emulated under --smoke

    def symm(inp, bound=recv_bound):
        return symm_dispatch_combine(inp, counts, identity, group, exchange, bound)

    impls = {
        "ep_symm_dispatch_combine_identity": (lambda: symm(rows), with_backward(lambda: symm(rows), [rows])),
        **{f"ep_symm_dispatch_combine_identity_{bound_name(b)}": (
            lambda b=b: symm(rows, b), with_backward(lambda b=b: symm(rows, b), [rows])) for b in tight_bounds},
        "ep2_dispatch_combine_identity": (
            lambda: dispatch_combine(rows, counts, identity, groups),
            with_backward(lambda: dispatch_combine(rows, counts, identity, groups), [rows])),
        "nccl_all_to_all_single_x2": (
            lambda: nccl_there_and_back(rows0, False), lambda: nccl_there_and_back(rows0, True)),
        "ep2_triton_permute_dispatch_combine_unpermute": (full_path, with_backward(full_path, [x, w])),
    }
    for name, (fwd_fn, both_fn) in impls.items():
        row = {"part": "ep2", "impl": name, "shape": shape, "bytes": 2 * row_bytes, "exchange": exchange,
               "remote_bytes": 2 * remote, "fwd_bwd_bytes": 4 * row_bytes}
        is_symm = name.startswith("ep_symm")
        if is_symm:
            b = next((b for b in tight_bounds if name.endswith(bound_name(b))), recv_bound)
            o = next((o for o in overlaps if name.endswith(overlap_name(o))), None)
            if o is not None:
                row["chunks"], row["push_programs"], row["gemm_sm_carveout"] = o
            row["recv_bound"] = b if b is not None else float(world)
        try:
            fwd = bench(fwd_fn, barrier=True)
            both = bench(both_fn, barrier=True)
            if is_symm:
                symm_overflow_check(group, device.type == "cuda")
            local = torch.tensor([fwd, both], dtype=torch.float64, device=device)
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local)
            row.update(median_ms=fwd, fwd_bwd_ms=both,
                       median_ms_per_rank=[p[0].item() for p in parts],
                       fwd_bwd_ms_per_rank=[p[1].item() for p in parts],
                       algbw_GBps=2 * row_bytes / max(p[0].item() for p in parts) / 1e6,
                       fwd_bwd_algbw_GBps=4 * row_bytes / max(p[1].item() for p in parts) / 1e6,
                       # NVLink bytes this rank sends one way / time (DeepEP's per-GPU convention)
                       remote_GBps_per_gpu=remote / (max(p[0].item() for p in parts) / 2) / 1e6)
        except Exception as e:  # noqa: BLE001 - both ranks should fail alike; if not, this hangs
            row["error"] = err_text(e)
            symm_dispatch.check_and_forget(group, check=False)
        emit(row)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def part_moe_layer_ep(t: int, dim: int, ffn: int, n_exp: int, k: int, dtype, device, bench: Bench, emit,
                      recv_bound: float | None = None, tight_bounds: tuple[float, ...] = (),
                      overlaps: tuple[tuple[int, int, int], ...] = (), profile: bool = False) -> None:
    """Both ranks: MoE(dim, E experts, top k) with E/ep local experts, forward+backward,
    through ParallelDispatch(kernels=triton) with the symmetric-memory exchange and with
    NCCL, and the local grouped SwiGLU alone on T*k rows over the local experts.
    ``overlaps``: (chunks, push programs, SMs carved out of the GEMMs) of rows with the
    exchange in chunks beside the GEMMs (``moe_ep_triton_symm_chunks<c>_p<p>_s<s>``, issue 22
    item 4), and the same layer with one shared expert of ``ffn`` with one exchange and with
    the first overlap's settings. ``profile``: each symmetric-memory row's kernels over 2
    more calls (``kernel_timeline.kernel_split``: the exchange's kernels against the rest, and
    how much of them ran beside a compute kernel)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    shape = f"{t} tokens/GPU H{dim} F{ffn} E{n_exp} top{k} {str(dtype).removeprefix('torch.')}, ep{world}"
    try:
        mesh = build_mesh(dp_shard=world)
        groups = build_expert_groups(mesh, ParallelDims.from_mesh(mesh), world)
        torch.manual_seed(0)
        with torch.device(device):
            moe = MoE(dim, MoEArgs(n_experts=n_exp, top_k=k, hidden_dim=ffn, load_balance="none"))
        moe.to(dtype)
        el = n_exp // world
        for name in ("w1", "w2", "w3"):  # this rank's experts only, as expert parallelism shards them
            full = getattr(moe, name)
            setattr(moe, name, torch.nn.Parameter(full.data[rank * el:(rank + 1) * el].clone()))
        g = torch.Generator(device=device).manual_seed(rank)
        x = torch.randn(1, t, dim, device=device, dtype=dtype, generator=g).requires_grad_()
        params = [moe.w1, moe.w3, moe.w2, moe.router.gate.weight]
        rows = torch.randn(t * k, dim, device=device, dtype=dtype, generator=g).requires_grad_()
        local_counts = torch.full((el,), t * k // el, device=device, dtype=torch.int64)
        local_counts[-1] += t * k - int(local_counts.sum())
    except Exception as e:  # noqa: BLE001
        emit({"part": "moe_layer_ep", "impl": "setup", "shape": shape, "error": err_text(e)})
        return

    shared_moe = None
    if overlaps:
        torch.manual_seed(0)
        with torch.device(device):
            shared_moe = MoE(dim, MoEArgs(n_experts=n_exp, top_k=k, hidden_dim=ffn, load_balance="none",
                                          n_shared_experts=1))
        shared_moe.to(dtype)
        for name in ("w1", "w2", "w3"):
            full = getattr(shared_moe, name)
            setattr(shared_moe, name, torch.nn.Parameter(full.data[rank * el:(rank + 1) * el].clone()))

    def layer(exchange: str, bound: float | None = recv_bound, chunks: int = 1, programs: int | None = None,
              carveout: int = 0, module=moe):
        dispatch = ParallelDispatch(kernels="triton", groups=groups, exchange=exchange, recv_bound=bound,
                                    chunks=chunks)

        def fn():
            module.dispatch = dispatch
            overlap.OVERLAP_PROGRAMS, overlap.OVERLAP_CARVEOUT = programs or default_programs, carveout
            return module(x)
        return fn

    default_programs = overlap.OVERLAP_PROGRAMS
    shared_params = [] if shared_moe is None else [x, *shared_moe.parameters()]
    impls = {
        "moe_ep_triton_symm": (layer("auto"), [x, *params]),
        **{f"moe_ep_triton_symm_{bound_name(b)}": (layer("auto", b), [x, *params]) for b in tight_bounds},
        **{f"moe_ep_triton_symm_{overlap_name(o)}": (layer("auto", chunks=o[0], programs=o[1], carveout=o[2]),
                                                       [x, *params]) for o in overlaps},
        **({} if shared_moe is None else {
            "moe_shared_ep_triton_symm": (layer("auto", module=shared_moe), shared_params),
            f"moe_shared_ep_triton_symm_{overlap_name(overlaps[0])}":
                (layer("auto", chunks=overlaps[0][0], programs=overlaps[0][1], carveout=overlaps[0][2],
                       module=shared_moe), shared_params)}),
        "moe_ep_triton_nccl": (layer("nccl"), [x, *params]),
        "grouped_swiglu_local_only": (lambda: grouped_swiglu(rows, moe.w1, moe.w3, moe.w2, local_counts),
                                      [rows, moe.w1, moe.w3, moe.w2]),
    }
    for name, (fn, inputs) in impls.items():
        row = {"part": "moe_layer_ep", "impl": name, "shape": shape}
        is_symm = "triton_symm" in name
        if is_symm:
            b = next((b for b in tight_bounds if name.endswith(bound_name(b))), recv_bound)
            o = next((o for o in overlaps if name.endswith(overlap_name(o))), None)
            if o is not None:
                row["chunks"], row["push_programs"], row["gemm_sm_carveout"] = o
            row["recv_bound"] = b if b is not None else float(world)
        try:
            fwd = bench(fn, barrier=True)
            both = bench(with_backward(fn, inputs), barrier=True)
            if is_symm:
                symm_overflow_check(groups.ep_group, device.type == "cuda")
            local = torch.tensor([fwd, both], dtype=torch.float64, device=device)
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local)
            row.update(median_ms=fwd, fwd_bwd_ms=both, fwd_bwd_ms_max_rank=max(p[1].item() for p in parts))
            if profile and is_symm and device.type == "cuda":
                row["profile_fwd_bwd"] = profile_calls(with_backward(fn, inputs), groups.ep_group)
        except Exception as e:  # noqa: BLE001
            row["error"] = err_text(e)
            symm_dispatch.check_and_forget(groups.ep_group, check=False)
        emit(row)
    overlap.OVERLAP_PROGRAMS = default_programs
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------
# Targets and main
# ----------------------------------------------------------------------------------------


def targets_of(rows: list[dict], shapes_p1: list[str], shape_p2: str, shapes_p3: list[str],
               shape_p4: str | None = None, tight_bounds: tuple[float, ...] = (),
               overlaps: tuple[tuple[int, int, int], ...] = ()) -> list[dict]:
    by = {(r["part"], r["impl"], r["shape"]): r for r in rows}
    nan = float("nan")

    def get(part, impl, shape, key):
        v = by.get((part, impl, shape), {}).get(key)
        return nan if v is None else v

    def ratio(a, b):
        return a / b if b and b == b and a == a else nan

    out = permute_targets(rows, shapes_p1)
    m = "moe_layer"
    tri = get(m, "moe_dispatch_triton", shape_p2, "fwd_bwd_tflops")
    out += [
        {"name": f"{shape_p2}: MoE (triton dispatch) fwd+bwd TFLOP/s / loop over experts",
         "value": ratio(tri, get(m, "loop_over_experts", shape_p2, "fwd_bwd_tflops")), "goal": 1.0,
         "higher_is_better": True},
        {"name": f"{shape_p2}: MoE fwd+bwd, triton dispatch / torch dispatch",
         "value": ratio(tri, get(m, "moe_dispatch_torch", shape_p2, "fwd_bwd_tflops")), "goal": 1.0,
         "higher_is_better": True},
        {"name": f"{shape_p2}: MoE (triton dispatch) fwd+bwd / grouped SwiGLU alone (dispatch overhead)",
         "value": ratio(tri, get(m, "grouped_swiglu_only", shape_p2, "fwd_bwd_tflops")), "goal": 0.9,
         "higher_is_better": True},
    ]
    e = "ep2"
    for shape_p3 in shapes_p3:
        nccl = get(e, "nccl_all_to_all_single_x2", shape_p3, "algbw_GBps")
        nccl_both = get(e, "nccl_all_to_all_single_x2", shape_p3, "fwd_bwd_algbw_GBps")
        out += [
            {"name": f"{shape_p3}: dispatch_combine (NCCL path) fwd bandwidth / NCCL all_to_all_single x2",
             "value": ratio(get(e, "ep2_dispatch_combine_identity", shape_p3, "algbw_GBps"), nccl), "goal": 0.9,
             "higher_is_better": True},
            {"name": f"{shape_p3}: symmetric-memory dispatch+combine fwd bandwidth / NCCL all_to_all_single x2",
             "value": ratio(get(e, "ep_symm_dispatch_combine_identity", shape_p3, "algbw_GBps"), nccl), "goal": 1.2,
             "higher_is_better": True},
            {"name": f"{shape_p3}: symmetric-memory dispatch+combine fwd+bwd bandwidth / NCCL all_to_all_single x4",
             "value": ratio(get(e, "ep_symm_dispatch_combine_identity", shape_p3, "fwd_bwd_algbw_GBps"), nccl_both),
             "goal": 1.2, "higher_is_better": True},
            {"name": f"{shape_p3}: symmetric-memory dispatch+combine NVLink GB/s per GPU (DeepEP H800 anchor: "
                     "153 dispatch / 158 combine)",
             "value": get(e, "ep_symm_dispatch_combine_identity", shape_p3, "remote_GBps_per_gpu"), "goal": 153.0,
             "higher_is_better": True},
        ]
        for b in tight_bounds:
            impl = f"ep_symm_dispatch_combine_identity_{bound_name(b)}"
            out += [
                {"name": f"{shape_p3}: symmetric-memory dispatch+combine, receive bound {b:g}, fwd bandwidth / NCCL "
                         "all_to_all_single x2",
                 "value": ratio(get(e, impl, shape_p3, "algbw_GBps"), nccl), "goal": 1.2, "higher_is_better": True},
                {"name": f"{shape_p3}: symmetric-memory dispatch+combine, receive bound {b:g}, fwd+bwd bandwidth / "
                         "NCCL all_to_all_single x4",
                 "value": ratio(get(e, impl, shape_p3, "fwd_bwd_algbw_GBps"), nccl_both), "goal": 1.2,
                 "higher_is_better": True},
            ]
    if shape_p4 is not None:
        m = "moe_layer_ep"
        out.append({"name": f"{shape_p4}: MoE layer (triton, symmetric memory) fwd+bwd time / local grouped SwiGLU "
                            "alone", "value": ratio(get(m, "moe_ep_triton_symm", shape_p4, "fwd_bwd_ms_max_rank"),
                                                    get(m, "grouped_swiglu_local_only", shape_p4, "fwd_bwd_ms_max_rank")),
                    "goal": 1.15, "higher_is_better": False})
        out.append({"name": f"{shape_p4}: MoE layer fwd+bwd, symmetric memory / NCCL exchange (time)",
                    "value": ratio(get(m, "moe_ep_triton_symm", shape_p4, "fwd_bwd_ms_max_rank"),
                                   get(m, "moe_ep_triton_nccl", shape_p4, "fwd_bwd_ms_max_rank")),
                    "goal": 1.0, "higher_is_better": False})
        for o in overlaps:
            c, pr, sm = o
            out.append({"name": f"{shape_p4}: MoE layer (symmetric memory, {c} chunks beside the GEMMs, pushes on {pr} "
                                f"programs, {sm} SMs carved out of the GEMMs) fwd+bwd time / local grouped SwiGLU alone",
                        "value": ratio(get(m, f"moe_ep_triton_symm_{overlap_name(o)}", shape_p4, "fwd_bwd_ms_max_rank"),
                                       get(m, "grouped_swiglu_local_only", shape_p4, "fwd_bwd_ms_max_rank")),
                        "goal": 1.15, "higher_is_better": False})
            out.append({"name": f"{shape_p4}: MoE layer fwd+bwd, {overlap_name(o)} / one exchange (time)",
                        "value": ratio(get(m, f"moe_ep_triton_symm_{overlap_name(o)}", shape_p4, "fwd_bwd_ms_max_rank"),
                                       get(m, "moe_ep_triton_symm", shape_p4, "fwd_bwd_ms_max_rank")),
                        "goal": 1.0, "higher_is_better": False})
        if overlaps:
            out.append({"name": f"{shape_p4} + one shared expert: MoE layer fwd+bwd, {overlap_name(overlaps[0])}, the "
                                "shared expert beside the first exchange / one exchange (time)",
                        "value": ratio(get(m, f"moe_shared_ep_triton_symm_{overlap_name(overlaps[0])}", shape_p4,
                                           "fwd_bwd_ms_max_rank"),
                                       get(m, "moe_shared_ep_triton_symm", shape_p4, "fwd_bwd_ms_max_rank")),
                        "goal": 1.0, "higher_is_better": False})
        for b in tight_bounds:
            out.append({"name": f"{shape_p4}: MoE layer fwd+bwd, symmetric memory with receive bound {b:g} / NCCL "
                                "exchange (time)",
                        "value": ratio(get(m, f"moe_ep_triton_symm_{bound_name(b)}", shape_p4, "fwd_bwd_ms_max_rank"),
                                       get(m, "moe_ep_triton_nccl", shape_p4, "fwd_bwd_ms_max_rank")),
                        "goal": 1.0, "higher_is_better": False})
    return out


def pinned_configs(shapes) -> dict:
    """The row kernels' (BLOCK_T, BLOCK_H, num_warps) at each part-1 shape (pinned, not tuned)."""
    return {f"H{h} top{k}": {kind: moe_dispatch_rows.row_config(kind, h, k) for kind in ("combine", "bwd")}
            for _, h, _, k in shapes}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU (gloo, perf_counter; set TRITON_INTERPRET=1): checks the logic only")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ep-shape", default="4096,8,2;4096,64,2;7168,8,8;7168,64,8", metavar="H,E,K[;H,E,K...]",
                   help="hidden, experts, top-k of the expert-parallel part, ';'-separated (issue 22 item 5's "
                        "rows by default; issue 11's anchor: 7168,256,8)")
    p.add_argument("--recv-bound", type=float, default=None,
                   help="symmetric-memory receive bound, a multiple of T*k (default: ep, the worst case)")
    p.add_argument("--tight-bounds", default="1.25", metavar="B[,B...]",
                   help="receive bounds of extra symmetric-memory rows beside the --recv-bound ones (issue 22b; "
                        "'' for none)")
    p.add_argument("--no-layer", action="store_true", help="skip the single-GPU MoE layer and the EP layer parts")
    p.add_argument("--overlaps", default="2:32:0,2:16:16,2:32:32,4:16:16", metavar="C:P[:S][,...]",
                   help="EP layer rows with the exchange in C chunks beside the GEMMs, pushes on P programs, S SMs "
                        "carved out of the GEMMs (ParallelPlan.moe_dispatch_chunks; issue 22 item 4); '' for none")
    p.add_argument("--profile-layer", action="store_true",
                   help="profile each symmetric-memory EP layer row (the exchange's kernels beside the GEMMs)")
    p.add_argument("--layer-ep-only", action="store_true",
                   help="only part 4, the EP layer (skip the single-GPU parts and the bare exchange)")
    p.add_argument("--no-deepseek", action="store_true", help="skip the H7168 top-8 shapes of part 1")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--graph-reps", type=int, default=10)
    p.add_argument("--part", choices=("all", "permute_unpermute"), default="all",
                   help="permute_unpermute: part 1 alone on one GPU, no torch.distributed (run with plain "
                        "python); writes moe_permute[_smoke].json")
    args = p.parse_args()
    if args.smoke:
        args.warmup, args.iters, args.graph_reps = 1, 2, 2
    dtype = torch.bfloat16
    t = 64 if args.smoke else args.tokens
    h_p1, h_ds = (64, 96) if args.smoke else (4096, 7168)
    shapes = [(t, h_p1, 8, 2)] + ([] if args.no_deepseek else [(t, h_ds, 64, 8), (t, h_ds, 256, 8)])
    if args.part == "permute_unpermute":
        return main_permute(args, shapes, dtype)
    main_all(args, shapes, dtype, t)


def _conventions() -> dict:
    return {
        "bytes": "activation rows only, each element once per read and once per write; "
                 "permute+unpermute fwd 2(TH+TkH)e, fwd+bwd (4TH+5TkH)e; copy_d2d read+write",
        "flops": "fwd 3 matmuls x 2 x T x k x H x F; fwd+bwd 3x fwd",
        "ep_bytes": "the (Tk, H) row buffer there and back: 2 TkH e (fwd), 4 TkH e (fwd+bwd)",
        "timing": "per call (median_ms, fwd_bwd_ms): CUDA events around one eager call, warm-up then median, "
                  "host launch gaps included; host_us: host time per call with the GPU busy ahead; kernel_ms: "
                  "sum of CUDA kernel durations per call (torch.profiler); graph_ms: a CUDA graph of graph_reps "
                  "calls replayed, time / graph_reps (GPU-side, no host gaps). See moe_permute_bench.py",
    }


def main_permute(args, shapes, dtype) -> None:
    """Part 1 alone, one device, no process group."""
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    bench = Bench(cuda, args.warmup, args.iters)
    rows: list[dict] = []
    t_start = time.perf_counter()

    def emit(row: dict) -> None:
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    part_permute(shapes, dtype, device, bench, emit, graph_reps=args.graph_reps if cuda else 0)
    targets = permute_targets(rows, [shape_name(t, h, e, k, dtype) for t, h, e, k in shapes])
    path = write_results("moe_permute" + ("_smoke" if args.smoke else ""), rows, targets, world_size=1,
                         smoke=args.smoke, triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
                         wall_s=time.perf_counter() - t_start, pinned_configs=pinned_configs(shapes),
                         conventions=_conventions())
    for tg in targets:
        print(tg, flush=True)
    print(f"wrote {path} ({time.perf_counter() - t_start:.1f} s)", flush=True)


def main_all(args, shapes, dtype, t: int) -> None:
    """Every part: rank 0 runs parts 1-2 while the others wait; all run parts 3-4."""
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and not args.smoke
    timeout = datetime.timedelta(minutes=15)  # rank 1 waits out parts 1-2 at a barrier
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    tight = tuple(float(b) for b in args.tight_bounds.split(",") if b.strip())
    overlaps = tuple((*(int(v) for v in part.split(":")), 0)[:3] for part in args.overlaps.split(",") if part.strip())
    h = shapes[0][1]
    dim, ffn = (64, 128) if args.smoke else (4096, 14336)
    bench = Bench(cuda, args.warmup, args.iters)
    rows: list[dict] = []
    t_start = time.perf_counter()

    def emit(row: dict) -> None:
        rows.append(row)
        if rank == 0:
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    if rank == 0 and not args.layer_ep_only:  # single-GPU parts; the other ranks wait at the barrier below
        try:
            part_permute(shapes, dtype, device, bench, emit, graph_reps=args.graph_reps if cuda else 0)
        except Exception as e:  # noqa: BLE001
            emit({"part": "permute_unpermute", "impl": "part", "error": err_text(e)})
            traceback.print_exc()
        try:
            if not args.no_layer:
                part_moe_layer(t, dim, ffn, 8, 2, dtype, device, bench, emit)
        except Exception as e:  # noqa: BLE001
            emit({"part": "moe_layer", "impl": "part", "error": err_text(e)})
            traceback.print_exc()
        print(f"single-GPU parts done in {time.perf_counter() - t_start:.1f} s", flush=True)
    dist.barrier()
    ep_shapes = [tuple(int(v) for v in part.split(",")) for part in args.ep_shape.split(";") if part]
    if args.smoke:
        ep_shapes = [(h, ee, ek) for _, ee, ek in ep_shapes]
    for eh, ee, ek in [] if args.layer_ep_only else ep_shapes:
        part_ep(t, eh, ee, ek, dtype, device, bench, emit, args.recv_bound, tight)
    layer_shape = None
    if not args.no_layer:
        part_moe_layer_ep(t, dim, ffn, 8, 2, dtype, device, bench, emit, args.recv_bound, tight, overlaps,
                          args.profile_layer)
        layer_shape = f"{t} tokens/GPU H{dim} F{ffn} E8 top2 {str(dtype).removeprefix('torch.')}, ep{world}"

    if rank == 0:
        e_str = str(dtype).removeprefix("torch.")
        targets = targets_of(rows, [shape_name(tt, hh, e, k, dtype) for tt, hh, e, k in shapes],
                             f"T{t} H{dim} F{ffn} E8 top2 {e_str}",
                             [f"{t} tokens/GPU H{eh} E{ee} top{ek} {e_str}, ep{world}" for eh, ee, ek in ep_shapes],
                             layer_shape, tight, overlaps)
        if args.layer_ep_only:
            targets = [tg for tg in targets if layer_shape and tg["name"].startswith(layer_shape)]
        path = write_results(
            NAME + ("_layer_ep" if args.layer_ep_only else "") + ("_smoke" if args.smoke else ""), rows, targets, world_size=world, smoke=args.smoke,
            grouped_mm=hasattr(torch, "_grouped_mm"), triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
            wall_s=time.perf_counter() - t_start, pinned_configs=pinned_configs(shapes), conventions=_conventions())
        for tg in targets:
            print(tg, flush=True)
        print(f"wrote {path} ({time.perf_counter() - t_start:.1f} s)", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
