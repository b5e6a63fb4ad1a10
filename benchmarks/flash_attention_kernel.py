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

``--tma-backward`` runs the backward kernels with their TMA loads (off in the library until
this measures them). ``--sweep`` adds one row per tile config of each kernel (forward TMA, dK/dV, dQ; with
``--sweep-pointer`` the pointer-based forward too), each timed alone (a backward kernel inside
the whole backward, the other one autotuned), so the config lists come from measurements.
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
from triton_kernels import flash_attention_bwd_kernels as bwdk
from triton_kernels import flash_attention_hopper as hopper
from triton_kernels import flash_attention_kernels as fwdk
from triton_kernels import flash_attention as fa
from triton_kernels.flash_attention import _backward, _flags, flash_attention

HQ, HKV = 32, 8


def timed(fn, iters: int) -> float:
    return median_ms(fn, cuda=True, warmup=3, iters=iters)


def sweep_configs():
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the TMA forward, dK/dV and dQ kernels."""
    fwd = [(128, 64, 4, 2), (128, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 4, 3),
           (128, 128, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2)]
    dkdv = [(32, 128, 4, 3), (64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (64, 64, 4, 2),
            (32, 128, 8, 3)]
    dq = [(128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 2),
          (128, 32, 8, 3)]
    return fwd, dkdv, dq


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--sweep", action="store_true", help="time each tile config of the TMA forward and the backward")
    p.add_argument("--sweep-pointer", action="store_true", help="with --sweep: the pointer-based forward's too")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tma-backward", action="store_true",
                   help="the backward kernels with their TMA loads (rows and JSON named ..._tma_backward)")
    args = p.parse_args()
    if args.tma_backward:
        fa._TMA_BACKWARD = True
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

        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    fn = lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True)  # noqa: E731
                    row(name, timed(fn, its), timed(fwd_bwd(fn), its))
            except RuntimeError as e:  # a backend that does not take this shape
                print(f"{name}: {str(e)[:200]}")
        ours = lambda: flash_attention(q, k, v, causal=True)[0]  # noqa: E731
        row("ours", timed(ours, its), timed(fwd_bwd(ours), its))

        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], device=dev, dtype=torch.float32)
        scale = D ** -0.5

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

        if args.sweep:
            fwd_cfgs, dkdv_cfgs, dq_cfgs = sweep_configs()
            for bm, bn, w, s in fwd_cfgs:
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
                kinds = [("tma", lambda: hopper.forward_tma(q, k, v, out, lse, True, scale, False,
                                                            kernel=hopper._attn_fwd_tma.fn, **cfg))]
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
            for name, kern, cfgs in (("dkdv", bwdk._attn_bwd_dkdv, dkdv_cfgs), ("dq", bwdk._attn_bwd_dq, dq_cfgs)):
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
                            note="the whole backward with this kernel pinned, the other autotuned")
                    except Exception as e:  # noqa: BLE001
                        print(f"sweep_bwd_{name} {cfg}: {type(e).__name__} {str(e)[:160]}")
                    finally:
                        kern.configs = saved
                        kern.cache.clear()
            fwdk._DKDV_MEASURED.update(measured["dkdv"])
            fwdk._DQ_MEASURED.update(measured["dq"])
            bwdk._attn_bwd_dkdv.cache.clear()
            bwdk._attn_bwd_dq.cache.clear()

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
        q = k = v = kr = vr = None  # free before the next shape
        torch.cuda.empty_cache()
    name = "flash_attention_kernel" + ("_tma_backward" if args.tma_backward else "")
    print(write_results(name, rows, targets, errors=errors, tma_backward=args.tma_backward))


if __name__ == "__main__":
    main()
