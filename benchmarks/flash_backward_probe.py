"""Where the split flash-attention backward spends its time, and three ways to spend less
(issue 21, item 1). One GPU.

    python3 benchmarks/flash_backward_probe.py [--tokens 8192 32768] [--head-dims 128 64]

b1, 32 query heads / 8 kv heads, causal, bf16, the library's pinned tile configs. Rows, ms
(medians of CUDA-event timings, each call long enough that host time does not count):

- ``cudnn_bwd``: SDPA's cuDNN backward alone (the target: ours within 1/0.9 of it with the
  forward);
- ``split_bwd``: the library's backward (delta preprocess, dK/dV kernel, dQ kernel);
- ``preprocess``, ``dkdv``, ``dq``: each kernel alone, launched as ``_backward`` does;
- ``dkdv_ws``, ``dq_ws``: the same kernels with Triton's automatic warp specialization on
  their unmasked walk (``tl.range(..., warp_specialize=True)``);
- ``two_streams``: dK/dV and dQ launched on two streams at once (they read the same inputs
  and write disjoint outputs): how much of each kernel's causal tail the other can fill;
- ``dkdv_per_qhead``: the dK/dV kernel with one program per query head (GQA's K/V repeated,
  GROUP = 1), four times the programs and a quarter of each one's walk: whether the kernel
  is limited by its longest programs (the repeat and the group sum it would need are not
  timed).

The per-kernel rows also give each kernel's matmul rate: dK/dV does 4 matmuls of the
causal half, dQ 3, each 2·hq·S²·d/2 FLOPs. On an H200 one kernel's time moved by up to 15%
from one call to the next (benchmarks/RESULTS.md): compare rows of one run, and repeat.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import median_ms, write_results
from triton_kernels import flash_attention_bwd_kernels as bwdk
from triton_kernels.flash_attention import _backward, _flags, flash_attention

HQ, HKV = 32, 8


def timed(fn, iters: int = 10) -> float:
    return median_ms(fn, cuda=True, warmup=3, iters=iters)


def kernels(q, k, v, o, lse, do, scale, ws: bool = False, hkv: int = HKV):
    """Launchers of the three backward kernels as ``_backward`` runs them (no TMA, no docs)."""
    b, hq, s, d = q.shape
    delta = torch.empty((b, hq, s), device=q.device, dtype=torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    flags = _flags(q.dtype)
    flags["TMA"] = False
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    extra = {"WARP_SPECIALIZE": True} if ws else {}

    def pre():
        bwdk._bwd_preprocess[(triton.cdiv(s, 64), b * hq)](
            o, do, delta, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
            hq, s, HEAD_DIM=d, HAS_DLSE=False, BLOCK_M=64)

    def dkdv():
        bwdk._attn_bwd_dkdv[lambda meta: (b * hkv, triton.cdiv(s, meta["BLOCK_N"]))](
            q, k, v, do, lse, delta, dk, dv, lse, lse, lse, lse, scale, *common,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            hq, hkv, hq // hkv, s, s, HEAD_DIM=d, IS_CAUSAL=True, HAS_DOCS=False, **flags, **extra)

    def dqk():
        bwdk._attn_bwd_dq[lambda meta: (b * hq, triton.cdiv(s, meta["BLOCK_M"]))](
            q, k, v, do, lse, delta, dq, lse, lse, lse, lse, scale, *common,
            dq.stride(0), dq.stride(1), dq.stride(2),
            hq, hq // hkv, s, s, HEAD_DIM=d, IS_CAUSAL=True, HAS_DOCS=False, **flags, **extra)
    return pre, dkdv, dqk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--name", default="flash_backward_probe")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows: list[dict] = []
    for S in args.tokens:
        for D in args.head_dims:
            torch.manual_seed(0)
            q = torch.randn(1, HQ, S, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, HKV, S, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn(1, HKV, S, D, device=dev, dtype=torch.bfloat16)
            scale = D ** -0.5
            matmul_flops = 2 * HQ * S * S * D / 2  # one causal-half matmul
            its = 10 if S <= 8192 else 4

            def row(name, ms, n_matmuls=None, **extra):
                r = {"name": name, "tokens": S, "head_dim": D, "ms": ms, **extra}
                if n_matmuls:
                    r["matmul_tflops"] = n_matmuls * matmul_flops / ms / 1e9
                rows.append(r)
                print(r, flush=True)

            kr, vr = (t.repeat_interleave(HQ // HKV, 1).requires_grad_() for t in (k, v))
            qg = q.detach().requires_grad_()
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                ref = F.scaled_dot_product_attention(qg, kr, vr, is_causal=True)
            g = torch.randn_like(ref)
            row("cudnn_bwd", timed(lambda: torch.autograd.grad(ref, (qg, kr, vr), g, retain_graph=True), its), 5)
            o, lse = flash_attention(q, k, v, causal=True)
            row("split_bwd", timed(lambda: _backward(q, k, v, o, lse, g, None, True, scale), its), 7)
            pre, dkdv, dq = kernels(q, k, v, o, lse, g, scale)
            pre()
            row("preprocess", timed(pre, its))
            row("dkdv", timed(dkdv, its), 4)
            row("dq", timed(dq, its), 3)
            side = torch.cuda.Stream()

            def two_streams():
                pre()
                side.wait_stream(torch.cuda.current_stream())
                dkdv()
                with torch.cuda.stream(side):
                    dq()
                torch.cuda.current_stream().wait_stream(side)
            row("two_streams", timed(two_streams, its), 7)
            for name, fn in (("dkdv_ws", 1), ("dq_ws", 2)):
                try:
                    pre_ws, *launchers = kernels(q, k, v, o, lse, g, scale, ws=True)
                    pre_ws()
                    launcher = launchers[fn - 1]
                    row(name, timed(launcher, its), 4 if fn == 1 else 3)
                except Exception as e:  # noqa: BLE001  (a loop Triton cannot specialize)
                    print(f"{name}: {type(e).__name__} {str(e)[:300]}", flush=True)
                    rows.append({"name": name, "tokens": S, "head_dim": D, "error": f"{type(e).__name__}"})
            kq = k.repeat_interleave(HQ // HKV, 1)
            vq = v.repeat_interleave(HQ // HKV, 1)
            pre_q, dkdv_q, _ = kernels(q, kq, vq, o, lse, g, scale, hkv=HQ)
            pre_q()
            row("dkdv_per_qhead", timed(dkdv_q, its), 4)
            q = k = v = kr = vr = qg = ref = g = o = lse = kq = vq = None
            torch.cuda.empty_cache()
    targets = []
    for S in args.tokens:
        for D in args.head_dims:
            ms = {r["name"]: r.get("ms") for r in rows if r["tokens"] == S and r["head_dim"] == D}
            if ms.get("split_bwd") and ms.get("cudnn_bwd"):
                targets.append({"name": f"S={S} d{D}: cudnn bwd ms / split bwd ms",
                                "value": ms["cudnn_bwd"] / ms["split_bwd"], "goal": None,
                                "higher_is_better": True})
    print(write_results(args.name, rows, targets))


if __name__ == "__main__":
    main()
