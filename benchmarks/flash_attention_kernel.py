"""Our Triton flash attention on one GPU against SDPA's cuDNN and flash backends, and a
sweep of the kernels' tile configs (the autotuner's candidate lists come from it).

    python3 benchmarks/flash_attention_kernel.py [--tokens 8192 32768] [--head-dims 128 64] [--sweep]

b1, 32 query heads / 8 kv heads, causal, bf16. Rows (forward and forward+backward TFLOP/s;
causal forward FLOPs 4 * b * hq * S^2 * d / 2, forward+backward 3.5x that):

- ``sdpa_cudnn`` / ``sdpa_flash``: ``F.scaled_dot_product_attention`` pinned to one backend,
  k/v repeated to 32 heads (compute-bound: the repeat costs bandwidth only);
- ``ours``: ``flash_attention`` as the library calls it (the TMA forward on Hopper, the
  pointer-based one elsewhere; the backward kernels autotuned);
- ``ours_pointer_fwd``: the pointer-based forward alone (what runs without TMA).

Backward variants (rows ``ours_bwd_<variant>``, forward+backward and the backward alone,
``bwd_ms``, beside SDPA's backward alone): ``split`` (two kernels, the library's default),
``split_tma`` (their TMA loads), ``fused`` (one pass, dQ by per-element fp32 atomics),
``fused_tma`` (with TMA loads) and ``fused_tma_reduce`` (and bulk TMA reductions for dQ).
``--tma-backward`` runs the library's own backward with its TMA loads.

``--sweep fwd,dkdv,dq,fused`` (all four when given bare) adds one row per tile config of
those kernels (with ``--sweep-pointer`` the pointer-based forward too), each timed alone (a
split backward kernel inside the whole backward, the other one autotuned; the fused one
with the fastest fused variant's flags), so the config lists come from measurements.
Accuracy (first shape): our output and SDPA's against a float64 reference on 1024 query rows.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import median_ms, write_results
from triton_kernels import flash_attention_bwd_fused as fusedk
from triton_kernels import flash_attention_bwd_kernels as bwdk
from triton_kernels import flash_attention_hopper as hopper
from triton_kernels import flash_attention_kernels as fwdk
from triton_kernels import flash_attention as fa
from triton_kernels.flash_attention import _backward, _flags, flash_attention

HQ, HKV = 32, 8


def timed(fn, iters: int) -> float:
    return median_ms(fn, cuda=True, warmup=3, iters=iters)


# flash_attention.py flags per backward variant: (_BACKWARD, _TMA_BACKWARD, _TMA_REDUCE_DQ)
BACKWARD_VARIANTS = {"split": ("split", False, False), "split_tma": ("split", True, False),
                     "fused": ("fused", False, False), "fused_tma": ("fused", True, False),
                     "fused_tma_reduce": ("fused", True, True)}


def set_backward(variant: str) -> None:
    fa._BACKWARD, fa._TMA_BACKWARD, fa._TMA_REDUCE_DQ = BACKWARD_VARIANTS[variant]


def sweep_configs():
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the TMA forward, dK/dV, dQ and fused kernels."""
    fwd = [(128, 64, 4, 2), (128, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 4, 3),
           (128, 128, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2)]
    dkdv = [(32, 128, 4, 3), (64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (64, 64, 4, 2),
            (32, 128, 8, 3)]
    dq = [(128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 2),
          (128, 32, 8, 3)]
    fused = [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 2), (32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2),
             (64, 128, 4, 2), (128, 128, 8, 2)]
    return fwd, dkdv, dq, fused


def host_profile(fn, calls: int = 200) -> dict:
    """Host microseconds per call of ``fn`` (launch only: the GPU queue is kept from filling by
    one synchronize per 20 calls, outside the clock) and the top functions by own time."""
    import cProfile
    import pstats
    import time

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    spent = 0.0
    for i in range(calls):
        if i % 20 == 0:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        spent += time.perf_counter() - t0
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for i in range(50):
        fn()
        if i % 20 == 0:
            torch.cuda.synchronize()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]  # by own (total) time
    return {"host_us_per_call": 1e6 * spent / calls,
            "top_own_us_per_call": [[f"{f[0].split('/')[-1]}:{f[1]}:{f[2]}", round(1e6 * v[2] / 50, 1)]
                                    for f, v in top]}


def get_ms(rows: list[dict], name: str, S: int, D: int) -> float:
    return next(r["fwd_ms"] for r in rows if r["name"] == name and r["tokens"] == S and r["head_dim"] == D)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--sweep", nargs="?", const="fwd,dkdv,dq,fused", default="",
                   help="time each tile config of these kernels (fwd: the TMA forward; dkdv, dq, fused)")
    p.add_argument("--variants", default=",".join(BACKWARD_VARIANTS), help="backward variants to time")
    p.add_argument("--name", default="flash_attention_kernel", help="results file name")
    p.add_argument("--host", action="store_true", help="host time per call of ours and SDPA, with a profile")
    p.add_argument("--sweep-pointer", action="store_true", help="with --sweep: the pointer-based forward's too")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tma-backward", action="store_true",
                   help="the backward kernels with their TMA loads (rows and JSON named ..._tma_backward)")
    args = p.parse_args()
    if args.tma_backward:
        fa._TMA_BACKWARD = True
    sweep = set(filter(None, args.sweep.split(",")))
    dev = torch.device("cuda")
    rows, targets, errors = [], [], {}
    for (S, D) in itertools.product(args.tokens, args.head_dims):
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, h, S, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
                   for h in (HQ, HKV, HKV))
        kr, vr = (t.detach().repeat_interleave(HQ // HKV, 1).requires_grad_() for t in (k, v))
        fwd_flops = 4 * HQ * S * S * D / 2
        shape = {"tokens": S, "head_dim": D, "shape": f"b1 hq{HQ} hkv{HKV} d{D} causal bf16 S={S}"}
        its = args.iters if S <= 8192 else max(3, args.iters // 2)

        def row(name, fwd_ms, fb_ms=None, **extra):
            r = {"name": name, **shape, "fwd_ms": fwd_ms, "fwd_tflops": fwd_flops / fwd_ms / 1e9, **extra}
            if fb_ms is not None:
                r.update(fwd_bwd_ms=fb_ms, fwd_bwd_tflops=3.5 * fwd_flops / fb_ms / 1e9)
            rows.append(r)
            print(r, flush=True)
            return r

        def fwd_bwd(fn):
            def run():
                out = fn()
                out.backward(torch.ones_like(out))
            return run

        def bwd_alone(fn, leaves):
            """The backward alone: one forward graph, its gradient taken again each call."""
            out_ = fn()
            do_ = torch.ones_like(out_)
            return lambda: torch.autograd.grad(out_, leaves, do_, retain_graph=True)

        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    fn = lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True)  # noqa: E731
                    row(name, timed(fn, its), timed(fwd_bwd(fn), its), bwd_ms=timed(bwd_alone(fn, (q, kr, vr)), its))
            except RuntimeError as e:  # a backend that does not take this shape
                print(f"{name}: {str(e)[:200]}")
        ours = lambda: flash_attention(q, k, v, causal=True)[0]  # noqa: E731
        row("ours", timed(ours, its), timed(fwd_bwd(ours), its), bwd_ms=timed(bwd_alone(ours, (q, k, v)), its))
        library_flags = (fa._BACKWARD, fa._TMA_BACKWARD, fa._TMA_REDUCE_DQ)
        for variant in filter(None, args.variants.split(",")):
            set_backward(variant)
            try:
                row(f"ours_bwd_{variant}", timed(ours, its), timed(fwd_bwd(ours), its),
                    bwd_ms=timed(bwd_alone(ours, (q, k, v)), its))
            except Exception as e:  # noqa: BLE001  (a variant that does not compile here)
                print(f"ours_bwd_{variant}: {type(e).__name__} {str(e)[:300]}")
        fa._BACKWARD, fa._TMA_BACKWARD, fa._TMA_REDUCE_DQ = library_flags

        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], device=dev, dtype=torch.float32)
        scale = D ** -0.5
        if args.host:
            with torch.no_grad():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    host_sdpa = host_profile(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
                row("host_sdpa_cudnn_fwd", get_ms(rows, "sdpa_cudnn", S, D), **host_sdpa)
                row("host_ours_fwd", get_ms(rows, "ours", S, D), **host_profile(ours))
                if hopper.hopper_eligible(q, k, v, False):
                    row("host_tma_fwd_launch", get_ms(rows, "ours", S, D), **host_profile(
                        lambda: hopper.forward_tma(q, k, v, out, lse, True, scale, False)))

        def pointer_fwd(**cfg):
            grid = lambda meta: (HQ, triton.cdiv(S, meta["BLOCK_M"]))  # noqa: E731
            kernel = fwdk._attn_fwd.fn if cfg else fwdk._attn_fwd
            return lambda: kernel[grid](q, k, v, out, lse, lse, lse, lse, lse, scale,
                                        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                                        *lse.stride()[:2], HQ, HQ // HKV, S, S, HEAD_DIM=D, IS_CAUSAL=True,
                                        HAS_ACC=False, HAS_DOCS=False, **_flags(q.dtype), **cfg)
        row("ours_pointer_fwd", timed(pointer_fwd(), its))
        if hopper.hopper_eligible(q, k, v, False):
            tma = lambda: hopper.forward_tma(q, k, v, out, lse, True, scale, False)  # noqa: E731
            row("ours_tma_fwd", timed(tma, its))

        if S == args.tokens[0]:  # accuracy against float64 on the first 1024 rows (and the last 1024)
            rows_idx = torch.cat([torch.arange(1024), torch.arange(S - 1024, S)]).to(dev)
            with torch.no_grad():
                k64, v64 = kr.double(), vr.double()
                sc = (q[:, :, rows_idx].double() @ k64.transpose(-1, -2)) * scale
                sc = sc.masked_fill(torch.arange(S, device=dev)[None, :] > rows_idx[:, None], float("-inf"))
                ref = torch.softmax(sc, -1) @ v64
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    cudnn = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)[:, :, rows_idx]
                mine = flash_attention(q, k, v, causal=True)[0][:, :, rows_idx]
                errors[f"d{D}"] = {n: {"max_abs": (o.double() - ref).abs().max().item(),
                                       "rel_fro": ((o.double() - ref).norm() / ref.norm()).item()}
                                   for n, o in (("ours", mine), ("sdpa_cudnn", cudnn))}
                print(errors, flush=True)

        if sweep:
            fwd_cfgs, dkdv_cfgs, dq_cfgs, fused_cfgs = sweep_configs()
            for bm, bn, w, s in (fwd_cfgs if "fwd" in sweep else []):
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
                kinds = [("tma", lambda: hopper.forward_tma(q, k, v, out, lse, True, scale, False,
                                                            kernel=hopper._attn_fwd_tma.fn, **cfg)),
                         ("tma_ws", lambda: hopper.forward_tma(q, k, v, out, lse, True, scale, False,
                                                               kernel=hopper._attn_fwd_tma.fn,
                                                               WARP_SPECIALIZE=True, **cfg))]
                if args.sweep_pointer:
                    kinds.append(("pointer", pointer_fwd(**cfg)))
                for kind, fn in kinds:
                    try:
                        row(f"sweep_fwd_{kind}", timed(fn, its), config=[bm, bn, w, s])
                    except Exception as e:  # noqa: BLE001  (a config that does not compile or fit)
                        print(f"sweep_fwd_{kind} {cfg}: {type(e).__name__} {str(e)[:160]}")
            o, l_ = flash_attention(q, k, v, causal=True)
            do = torch.ones_like(o)
            # the measured tables pin one config on Hopper: empty them (in place: the pruning
            # filters hold these dicts) so each pinned sweep config runs
            measured = {"dkdv": dict(fwdk._DKDV_MEASURED), "dq": dict(fwdk._DQ_MEASURED)}
            fwdk._DKDV_MEASURED.clear()
            fwdk._DQ_MEASURED.clear()
            fused_variants = [r for r in rows if r["name"].startswith("ours_bwd_fused") and r["tokens"] == S
                              and r["head_dim"] == D]
            for name, kern, cfgs in (("dkdv", bwdk._attn_bwd_dkdv, dkdv_cfgs), ("dq", bwdk._attn_bwd_dq, dq_cfgs),
                                     ("fused", fusedk._attn_bwd_fused, fused_cfgs)):
                if name not in sweep or (name == "fused" and not fused_variants):
                    continue
                fa._BACKWARD, fa._TMA_BACKWARD, fa._TMA_REDUCE_DQ = library_flags
                fa._BACKWARD = "split"
                if name == "fused":  # under the fastest fused variant's flags
                    set_backward(min(fused_variants, key=lambda r: r["bwd_ms"])["name"][len("ours_bwd_"):])
                for bm, bn, w, s in cfgs:
                    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
                    saved = kern.configs
                    try:
                        # _backward launches both kernels through their autotuners; pin this one
                        kern.configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)]
                        kern.cache.clear()
                        qd, kd, vd, od, ld = (t.detach() for t in (q, k, v, o, l_))
                        fn = lambda: _backward(qd, kd, vd, od, ld, do, None, True, scale)  # noqa: E731
                        row(f"sweep_bwd_{name}", timed(fn, its), config=[bm, bn, w, s],
                            flags=[fa._BACKWARD, fa._TMA_BACKWARD, fa._TMA_REDUCE_DQ],
                            note="the whole backward with this kernel pinned (split: the other autotuned)")
                    except Exception as e:  # noqa: BLE001
                        print(f"sweep_bwd_{name} {cfg}: {type(e).__name__} {str(e)[:160]}")
                    finally:
                        kern.configs = saved
                        kern.cache.clear()
            fwdk._DKDV_MEASURED.update(measured["dkdv"])
            fwdk._DQ_MEASURED.update(measured["dq"])
            fa._BACKWARD, fa._TMA_BACKWARD, fa._TMA_REDUCE_DQ = library_flags
            for kern in (bwdk._attn_bwd_dkdv, bwdk._attn_bwd_dq, fusedk._attn_bwd_fused):
                kern.cache.clear()

        def get(name, key):
            return next(r[key] for r in rows if r["name"] == name and r["tokens"] == S and r["head_dim"] == D)

        def has(name):
            return any(r["name"] == name and r["tokens"] == S and r["head_dim"] == D for r in rows)

        def target(label: str, mine: str, key: str) -> dict:
            return {"name": f"S={S} d{D}: {label}", "value": get(mine, key) / get("sdpa_cudnn", key),
                    "goal": 0.9, "higher_is_better": True}

        if has("sdpa_cudnn"):
            targets += [target("ours fwd / sdpa cudnn fwd", "ours", "fwd_tflops"),
                        target("ours fwd+bwd / sdpa cudnn fwd+bwd", "ours", "fwd_bwd_tflops"),
                        target("pointer fwd kernel / sdpa cudnn fwd", "ours_pointer_fwd", "fwd_tflops")]
            if has("ours_tma_fwd"):
                targets.append(target("TMA fwd kernel / sdpa cudnn fwd", "ours_tma_fwd", "fwd_tflops"))
            for variant in BACKWARD_VARIANTS:  # candidates for the library's default backward
                if has(f"ours_bwd_{variant}"):
                    targets.append(target(f"candidate: fwd + {variant} bwd / sdpa cudnn fwd+bwd",
                                          f"ours_bwd_{variant}", "fwd_bwd_tflops"))
        q = k = v = kr = vr = None  # free before the next shape
        torch.cuda.empty_cache()
    name = args.name + ("_tma_backward" if args.tma_backward else "")
    print(write_results(name, rows, targets, errors=errors, tma_backward=args.tma_backward,
                        library_backward=list(library_flags)))


if __name__ == "__main__":
    main()
