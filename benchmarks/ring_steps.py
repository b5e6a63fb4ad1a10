"""The ring's compute without the wire, on one GPU: each CP2 rank's steps (issue 21, ring efficiency).

    python benchmarks/ring_steps.py [--tokens 8192 32768] [--label after] [--name ring_steps]

bf16, causal, batch 1, 32 query heads / 8 kv heads, head dim 128; ``--tokens`` per rank (the
global sequence is 2x, zigzag-sharded as the ring shards it). For rank 0 and rank 1 of CP2 it
runs the ring's own forward and backward (``ring._forward`` / ``ring._backward``, with the
casts the custom ops add around them) on one GPU. A stand-in for the ring's communication
hands step 1 the other rank's K/V (held on this GPU) and copies each dK/dV accumulator that
the ring sends on, as a receive would write it. So the rows hold everything the ring does on
a GPU but NCCL: the block kernels, the merges, the fp32 accumulations, allocations and casts.

Rows (per backend, "triton" and "sdpa"): ``ring_rank{r}_{backend}``, forward and
forward+backward ms; and in the same process the one-GPU kernels on the per-rank tokens:
``triton_1gpu`` (``flash_attention`` with autograd) and ``sdpa_1gpu`` (SDPA, cuDNN, k/v
repeated to 32 heads). A rank does twice the causal work of its tokens, so its compute
efficiency is ``2 x one-GPU time / rank time`` (the ring benchmark's "ring efficiency"
without the communication). ``--label`` tags the rows: a before/after comparison runs the
script twice in one call, once with an older tree first on ``PYTHONPATH``; the JSON records
which tree ran (``dtensor_parallel`` and ``triton_kernels`` paths).

Times: CUDA events around each call, median of ``--iters`` after 3 warm-ups.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.nn.functional as F

import dtensor_parallel
import triton_kernels
from dtensor_parallel.context_parallel import ring, zigzag_indices
from dtensor_parallel.context_parallel.blocks import get_backend
from triton_kernels.flash_attention import flash_attention

from common import median_ms, write_results

HQ, HKV, D = 32, 8, 128


class _PeerComm:
    """The ring's communication for one emulated rank of CP2, on one GPU: K/V rotations hand over
    the other rank's tensors; any other tensor sent (the dK/dV accumulators) comes back copied."""

    size = 2

    def __init__(self, rank: int, own: tuple, peer: tuple):
        self.rank = rank
        self.swap = {t.data_ptr(): p for t, p in zip(own, peer)}

    def start(self, tensors: list) -> tuple[list, list]:
        return [self.swap.get(t.data_ptr()) if t.data_ptr() in self.swap else t.clone() for t in tensors], []

    @staticmethod
    def wait(works: list) -> None:
        pass


def _timed(fn, iters: int) -> float:
    """Median ms per call after 3 warm-ups: CUDA events on a GPU, the wall clock on a CPU
    (``--device cpu``: a smoke run of the script under ``TRITON_INTERPRET=1``, not a measurement)."""
    return median_ms(fn, cuda=torch.cuda.is_available(), warmup=3, iters=iters)


def _ring_rank(rank: int, shards: dict, backend: str, scale: float, iters: int) -> dict:
    q, k, v = shards[rank]
    comm = _PeerComm(rank, (k, v), shards[1 - rank][1:])
    blocks = get_backend(backend)
    dout = torch.randn_like(q)

    def forward():
        out, lse = ring._forward(q, k, v, None, None, True, scale, comm, blocks)
        return out.to(q.dtype), lse  # as ring_attention_op returns them

    def both():
        out, lse = forward()
        grads = ring._backward(dout, q, k, v, out, lse, None, None, True, scale, comm, blocks)
        return [g.to(q.dtype) for g in grads]  # as ring_attention_backward_op returns them

    return {"fwd_ms": _timed(forward, iters), "fwd_bwd_ms": _timed(both, iters)}


def _one_gpu(q, k, v, iters: int) -> dict:
    rows = {}
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    rep = [leaves[0]] + [t.detach().repeat_interleave(HQ // HKV, 1).requires_grad_() for t in leaves[1:]]
    for name, fn, args in (("triton_1gpu", lambda a, b, c: flash_attention(a, b, c, causal=True)[0], leaves),
                           ("sdpa_1gpu", lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), rep)):
        def both(fn=fn, args=args):
            out = fn(*args)
            out.backward(torch.ones_like(out))
        cudnn = torch.nn.attention.SDPBackend.CUDNN_ATTENTION
        with torch.nn.attention.sdpa_kernel(cudnn) if q.is_cuda else contextlib.nullcontext():
            rows[name] = {"fwd_ms": _timed(lambda fn=fn, args=args: fn(*args), iters), "fwd_bwd_ms": _timed(both, iters)}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--label", default="after")
    p.add_argument("--name", default="ring_steps")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    dev = torch.device(args.device)
    rows, targets = [], []
    for tokens in args.tokens:
        s = 2 * tokens
        g = torch.Generator(device=dev).manual_seed(0)
        qg, kg, vg = (torch.randn(1, h, s, D, device=dev, dtype=torch.bfloat16, generator=g) for h in (HQ, HKV, HKV))
        shards = {r: tuple(t[:, :, zigzag_indices(s, 2, r, dev)].contiguous() for t in (qg, kg, vg)) for r in (0, 1)}
        shape = f"b1 hq{HQ} hkv{HKV} d{D} causal bf16, {tokens} tokens/rank, CP2 emulated on one GPU"
        base = _one_gpu(*(t[:, :, :tokens].contiguous() for t in (qg, kg, vg)), args.iters)
        for name, r in base.items():
            rows.append({"impl": name, "label": args.label, "tokens": tokens, "shape": shape, **r})
        for backend in ("triton", "sdpa"):
            one = base[f"{backend}_1gpu"]["fwd_bwd_ms"]
            for rank in (0, 1):
                r = _ring_rank(rank, shards, backend, D ** -0.5, args.iters)
                eff = 2 * one / r["fwd_bwd_ms"]
                rows.append({"impl": f"ring_rank{rank}_{backend}", "label": args.label, "tokens": tokens,
                             "shape": shape, **r, "compute_efficiency_fwd_bwd": eff})
                print(rows[-1], flush=True)
            worst = min(x["compute_efficiency_fwd_bwd"] for x in rows[-2:])
            targets.append({"name": f"{args.label} {tokens}: {backend} ring compute without NCCL, 2 x one-GPU "
                            f"{backend} / slower rank (fwd+bwd)", "value": worst, "goal": 0.93,
                            "higher_is_better": True})
        del shards, qg, kg, vg
        torch.cuda.empty_cache()
    trees = {"dtensor_parallel": os.path.dirname(dtensor_parallel.__file__),
             "triton_kernels": os.path.dirname(triton_kernels.__file__)}
    print(write_results(f"{args.name}_{args.label}", rows, targets, trees=trees))


if __name__ == "__main__":
    main()
