"""The ring's block kernels against each other on one device: what ``kernels["attention"] =
"auto"`` picks from (``dtensor_parallel/context_parallel/backend_choice.py``).

    python benchmarks/attention_backends.py [--device cuda|cpu] [--tokens 8192] [--out DIR]

Per backend ("triton", "sdpa", and on the CPU "torch"): one ring step's block functions as
the ring calls them, the own (causal) block ``forward_step`` then ``backward_block`` with
the final out/lse, timed forward and forward+backward (median of CUDA events or wall
clock). Shape: batch 1, 32 query heads on 8 kv heads, head dim 128, bf16 on CUDA (fp32,
8 on 2 heads, head dim 64 on the CPU). Packed documents: the same block with documents of
``--doc-len`` tokens against plain causal, per backend that masks them.
FLOPs: causal forward 2 * 2 * b * hq * s^2 * d / 2; forward+backward 3.5x that.
"""

from __future__ import annotations

import argparse

import torch

from dtensor_parallel.context_parallel.blocks import get_backend

from common import median_ms, write_results


def block_case(backend: str, q, k, v, dout, docs, device: str, warmup: int, iters: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of the own causal block through ``backend``."""
    blocks = get_backend(backend)
    b, hq, s, d = q.shape
    scale = d ** -0.5
    out = torch.empty(b, hq, s, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, hq, s, device=q.device, dtype=torch.float32)
    kw = {} if docs is None else {"doc_q": docs, "doc_k": docs}

    def fwd():
        blocks.forward_step(q, k, v, out, lse, True, scale, accumulate=False, **kw)

    def fwd_bwd():
        fwd()
        blocks.backward_block(dout, q, k, v, out, lse, True, scale, **kw)

    cuda = device == "cuda"
    return (median_ms(fwd, cuda=cuda, warmup=warmup, iters=iters),
            median_ms(fwd_bwd, cuda=cuda, warmup=warmup, iters=iters))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--doc-len", type=int, default=None)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    s = args.tokens or (8192 if cuda else 1024)
    doc_len = args.doc_len or s // 8
    hq, hkv, d, dtype = (32, 8, 128, torch.bfloat16) if cuda else (8, 2, 64, torch.float32)
    backends = ("triton", "sdpa") if cuda else ("torch", "sdpa")
    g = torch.Generator(device=args.device).manual_seed(0)
    q, k, v, dout = (torch.randn(1, h, s, d, device=args.device, dtype=dtype, generator=g) for h in (hq, hkv, hkv, hq))
    docs = (torch.arange(s, device=args.device) // doc_len)[None].to(torch.int32)
    flops = 2 * 2 * hq * s * s * d / 2
    rows, warmup = {}, 2
    for backend in backends:
        f_ms, fb_ms = block_case(backend, q, k, v, dout, None, args.device, warmup, args.iters)
        rows[backend] = {"fwd_ms": f_ms, "fwd_bwd_ms": fb_ms, "fwd_tflops": flops / f_ms / 1e9,
                         "fwd_bwd_tflops": 3.5 * flops / fb_ms / 1e9}
        df_ms, dfb_ms = block_case(backend, q, k, v, dout, docs, args.device, warmup, args.iters)
        rows[f"{backend}_documents_{doc_len}"] = {"fwd_ms": df_ms, "fwd_bwd_ms": dfb_ms,
                                                  "time_vs_causal_fwd_bwd": dfb_ms / fb_ms}
        print(backend, rows[backend], rows[f"{backend}_documents_{doc_len}"], flush=True)
    a, b = backends
    # the "auto" table's evidence: the second backend is picked where it is faster (> 1)
    targets = [{"name": f"{b} fwd+bwd speed over {a} (auto picks {b} above 1)",
                "value": rows[a]["fwd_bwd_ms"] / rows[b]["fwd_bwd_ms"], "goal": 1.0, "higher_is_better": True},
               {"name": f"{b} fwd+bwd speed over {a} with documents of {doc_len}",
                "value": rows[f"{a}_documents_{doc_len}"]["fwd_bwd_ms"] / rows[f"{b}_documents_{doc_len}"]["fwd_bwd_ms"],
                "goal": 1.0, "higher_is_better": True}]
    if "triton" in backends:  # the kernel that skips other documents' blocks: about 2 doc_len / s of causal
        targets.append({"name": f"triton documents of {doc_len} / causal time (fwd+bwd)",
                        "value": rows[f"triton_documents_{doc_len}"]["time_vs_causal_fwd_bwd"],
                        "goal": 2 * doc_len / s, "higher_is_better": False})
    rows_list = [{"name": name, **row} for name, row in rows.items()]
    path = write_results(f"attention_backends_{args.device}", rows_list, targets, out_dir=args.out,
                         shape={"b": 1, "hq": hq, "hkv": hkv, "d": d, "tokens": s, "dtype": str(dtype),
                                "doc_len": doc_len})
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
