"""The loss on the head's logits, forward+backward, four ways in the same run: eager
``F.cross_entropy`` on the fp32 upcast (the eager loss before 2026-12-01), the chunked eager
loss (``tensor_parallel/loss.py``) in torch chunks and through its Triton kernels (the eager
loss on CUDA now), and the compiled one (the loss under ``plan.compile``). bf16 logits of 8K tokens of Llama 3's 128K vocabulary, as on one GPU of
the throughput benchmark; milliseconds (median, CUDA events) and the peak memory above the
logits and labels.

    python3 benchmarks/cross_entropy.py                       # GPU
    python3 benchmarks/cross_entropy.py --tokens 256 --vocab 4096 --iters 3   # CPU smoke run
"""

from __future__ import annotations

import argparse

import torch

from common import median_ms, write_results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--name", default="cross_entropy")
    args = p.parse_args()
    from dtensor_parallel.tensor_parallel.loss import chunked_cross_entropy_sum, compiled_cross_entropy_sum, \
        cross_entropy_sum

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(1, args.tokens, args.vocab, device=dev, generator=g).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, args.tokens), device=dev, generator=g)
    impls = {"eager_unchunked": cross_entropy_sum,
             "eager_chunked_torch": lambda x, y: chunked_cross_entropy_sum(x, y, kernel="torch")}
    if cuda:
        impls["eager_chunked_triton"] = lambda x, y: chunked_cross_entropy_sum(x, y, kernel="triton")
        impls["compiled"] = compiled_cross_entropy_sum()
    rows, losses = [], {}

    for name, fn in impls.items():
        def step():
            logits.grad = None
            loss = fn(logits, labels)
            loss.backward()
            return loss

        losses[name] = step().item()  # (compiles the compiled one)
        if cuda:
            torch.cuda.synchronize()
            logits.grad = None
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        ms = median_ms(step, cuda=cuda, warmup=2, iters=args.iters)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
        rows.append({"impl": name, "ms": ms, "peak_above_inputs_gib": peak, "loss": losses[name]})
        print(rows[-1], flush=True)
    by = {r["impl"]: r for r in rows}
    new = "eager_chunked_triton" if cuda else "eager_chunked_torch"
    targets = [{"name": f"{new} / eager_unchunked loss time", "value": by[new]["ms"] / by["eager_unchunked"]["ms"],
                "goal": 1.0, "higher_is_better": False}]
    if cuda:
        targets.append({"name": f"{new} / eager_unchunked loss peak memory",
                        "value": by[new]["peak_above_inputs_gib"] / by["eager_unchunked"]["peak_above_inputs_gib"],
                        "goal": None, "higher_is_better": False})
    for t in targets:
        print(t)
    print("wrote", write_results(args.name, rows, targets, tokens=args.tokens, vocab=args.vocab))


if __name__ == "__main__":
    main()
