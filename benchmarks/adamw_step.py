"""One optimizer step over a model's parameters: torch's fused and foreach AdamW against ours
(``dtensor_parallel/adamw.py``) with bf16 and with fp32 moments, in the same run.

The parameters are the local shards of the 8B-shaped Llama of ``train_throughput.py`` on one
GPU (fp32 master weights, fp32 gradients). Reported per implementation: milliseconds a step
(median, CUDA events), the bytes its update must read and write (weight, gradient and both
moments, read and written; the gradient only read) over that time, the optimizer state's
bytes and the step's peak memory above the state (torch's temporaries).

    python3 benchmarks/adamw_step.py                   # GPU: 8B shape, 8 layers
    python3 benchmarks/adamw_step.py --layers 1 --dim 256 --vocab 1024   # CPU smoke run
"""

from __future__ import annotations

import argparse

import torch

from common import median_ms, write_results


def shapes(dim: int, ffn: int, vocab: int, heads: int, kv_heads: int, layers: int) -> list[tuple[int, ...]]:
    hd = dim // heads
    block = [(dim, dim), (kv_heads * hd, dim), (kv_heads * hd, dim), (dim, dim), (ffn, dim), (dim, ffn), (ffn, dim),
             (dim,), (dim,)]
    return [(vocab, dim)] + block * layers + [(dim,), (vocab, dim)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--name", default="adamw_step")
    args = p.parse_args()
    from dtensor_parallel.adamw import AdamW

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    sh = shapes(args.dim, args.ffn, args.vocab, args.heads, args.kv_heads, args.layers)
    n = sum(torch.Size(s).numel() for s in sh)
    params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in sh]
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    kw = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    impls = {"torch_fused": lambda: torch.optim.AdamW(params, fused=True, **kw) if cuda else None,
             "torch_foreach": lambda: torch.optim.AdamW(params, foreach=True, **kw),
             "ours_bf16_moments": lambda: AdamW(params, state_dtype="bf16", **kw),
             "ours_fp32_moments": lambda: AdamW(params, state_dtype="fp32", **kw)}
    rows = []
    for name, make in impls.items():
        opt = make()
        if opt is None:
            continue
        opt.step()  # the state exists from here on
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        ms = median_ms(opt.step, cuda=cuda, warmup=2, iters=args.iters)
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())
        m_bytes = opt.state[params[0]]["exp_avg"].element_size()
        moved = n * (4 + 4 + 4 + 2 * 2 * m_bytes)  # p read+write, g read, m and v read+write
        row = {"impl": name, "ms": ms, "params": n, "state_gib": state / 2**30,
               "bytes_moved_gb": moved / 1e9, "gb_per_s": moved / 1e9 / (ms / 1e3),
               "step_temporary_gib": ((torch.cuda.max_memory_allocated() - base) / 2**30) if cuda else None}
        print(row, flush=True)
        rows.append(row)
        del opt
        if cuda:
            torch.cuda.empty_cache()
    by = {r["impl"]: r for r in rows}
    targets = []
    if "torch_fused" in by:
        targets.append({"name": "ours (bf16 moments) / torch fused AdamW step time",
                        "value": by["ours_bf16_moments"]["ms"] / by["torch_fused"]["ms"], "goal": 1.0,
                        "higher_is_better": False})
        targets.append({"name": "ours (bf16 moments) / torch fused AdamW state bytes",
                        "value": by["ours_bf16_moments"]["state_gib"] / by["torch_fused"]["state_gib"], "goal": 0.5,
                        "higher_is_better": False})
    for t in targets:
        print(t)
    print("wrote", write_results(args.name, rows, targets, shape=vars(args)))


if __name__ == "__main__":
    main()
