"""Ring attention at CP=2 against PyTorch's context_parallel and single-GPU kernels.

    torchrun --standalone --nproc-per-node 2 benchmarks/ring_attention.py [--tokens 8192 32768]

bf16, causal, batch 1, 32 query heads / 8 kv heads, head dim 128; ``--tokens`` per GPU
(the global sequence is 2x). Rows, each with forward and forward+backward TFLOP/s per GPU:

- ``ours_triton_ring_cp{N}`` / ``ours_sdpa_ring_cp{N}`` / ``ours_torch_ring_cp{N}``: our ring,
  zigzag-sharded (N = world size), with each block kernel;
- ``ours_triton_ring_cp{N}_documents_2k``: the same sequence as packed documents of mean 2K
  tokens, sharded per document, masked by document and position (TFLOP/s counted as causal:
  its time against the causal ring's is the number);
- ``torch_context_parallel_cp{N}`` / ``..._alltoall``: ``torch.distributed.tensor.experimental.
  context_parallel`` around SDPA (its k/v repeated to 32 heads: it takes no grouped-query
  k/v), with its default K/V rotation (all-gather) and with its ring ("alltoall");
- ``sdpa_1gpu`` / ``ours_triton_1gpu``: one GPU, causal attention over the per-GPU tokens;
- ``ours_triton_1gpu_global_S``: one GPU, the whole global sequence (strong scaling: the
  ring's per-GPU TFLOP/s over this one is its efficiency on the same problem; the ratio to
  ``ours_triton_1gpu`` compares equal tokens per GPU, where the ring does twice the work).

FLOPs: causal forward 2 * 2 * b * hq * S^2 * d / 2 over the global S, divided by the GPUs;
forward+backward counts 3.5x the forward (FlashAttention-2's convention). ``--queue-ms M``
queues M ms of GPU work (a sleep kernel) ahead of each timed call, so the host has issued the
call's work before the GPU reaches it, as in a training step; the default (0) times each call
from an idle GPU, its host latency to the first kernel included. ``--skip REGEX`` leaves rows out. Errors of the
forward output against a float64 reference (first config only): max abs difference (bf16
output rounding dominates it) and the relative Frobenius norm of the difference.
"""

from __future__ import annotations

import argparse
import os
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dtensor_parallel.context_parallel import zigzag_indices
from dtensor_parallel.context_parallel.sharding import document_zigzag_indices
from dtensor_parallel.context_parallel.ring import ring_attention
import triton_kernels.flash_attention as flash_attention_module
from triton_kernels.flash_attention import flash_attention

from common import median, write_results

HQ, HKV, D = 32, 8, 128


QUEUE_MS = 0.0  # --queue-ms: GPU time queued ahead of each timed call (see ``bench``)


def _sleep_cycles_per_ms() -> float:
    """``torch.cuda._sleep`` cycles per ms on this GPU, timed once."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def bench(fn, backward: bool, warmup: int = 3, iters: int = 10) -> float:
    """Median ms of fn (and its backward) with CUDA events. With ``QUEUE_MS`` > 0 a sleep kernel
    of that length runs first, so the host issues the call's work while the GPU is still busy,
    as in a training step, and the time excludes the host's latency to the first kernel."""
    times = []
    cycles = int(QUEUE_MS * _sleep_cycles_per_ms()) if QUEUE_MS > 0 else 0
    for i in range(warmup + iters):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if cycles:
            torch.cuda._sleep(cycles)
        start.record()
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return median(times)


def ref_out(q, k, v, rows: int = 512) -> torch.Tensor:
    """float64 causal attention, query rows in chunks."""
    rep = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(rep, 1)
    v64 = v.double().repeat_interleave(rep, 1)
    outs = []
    s = q.shape[2]
    for i in range(0, s, rows):
        sc = q[:, :, i:i + rows].double() @ k64.transpose(-1, -2) * D ** -0.5
        mask = torch.arange(s, device=q.device)[None, :] > torch.arange(i, min(i + rows, s), device=q.device)[:, None]
        outs.append(torch.softmax(sc.masked_fill(mask, float("-inf")), -1) @ v64)
    return torch.cat(outs, 2)


def profile_ring(q, k, v, group, rank: int, tokens: int) -> None:
    """One forward+backward of the Triton ring under torch.profiler: the CUDA time per
    kernel (rank 0's table goes to $OUT/ring_attention_profile.txt), to see what besides
    the attention kernels the ring spends its time on."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            out = ring_attention(q, k, v, causal=True, scale=None, group=group, backend="triton")
            out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
    if rank == 0:
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60)
        path = os.path.join(os.environ.get("OUT", "."), "ring_attention_profile.txt")
        with open(path, "w") as f:
            f.write(f"Triton ring, CP=2, {tokens} tokens/GPU, 2 x (forward + backward), rank 0\n{table}\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--name", default="ring_attention", help="results file name")
    p.add_argument("--queue-ms", type=float, default=0.0, help="GPU time queued ahead of each timed call "
                   "(0: the call starts on an idle GPU, its host latency to the first kernel included)")
    p.add_argument("--skip", metavar="REGEX", help="leave out the rows whose name matches (e.g. the slow "
                   "fp32 reference ring: 'torch_ring')")
    args = p.parse_args()
    global QUEUE_MS
    QUEUE_MS = args.queue_ms
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=dev)
    cp, group = dist.get_world_size(), dist.group.WORLD
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard, set_rotate_method
    from torch.distributed.tensor.experimental._attention import _cp_options
    default_rotate = "alltoall" if _cp_options.rotate_method.name == "ALL_TO_ALL" else "allgather"
    mesh = init_device_mesh("cuda", (cp,), mesh_dim_names=("cp",))
    rows, errors = [], {}
    for t_idx, tokens in enumerate(args.tokens):
        S = tokens * cp
        g = torch.Generator(device=dev).manual_seed(0)
        qg, kg, vg = (torch.randn(1, h, S, D, device=dev, dtype=torch.bfloat16, generator=g) for h in (HQ, HKV, HKV))
        idx = zigzag_indices(S, cp, rank, dev)
        q, k, v = (t[:, :, idx].contiguous().requires_grad_() for t in (qg, kg, vg))
        flops_fwd = 4 * HQ * S * S * D / 2 / cp  # per GPU
        shape = f"b1 hq{HQ} hkv{HKV} d{D} causal bf16, {tokens} tokens/GPU, S={S}"

        def timed(fn, iters: int = 10):
            return bench(fn, backward=False, iters=iters), bench(fn, backward=True, iters=iters)

        def ours(backend, iters: int = 10):
            # the torch backend is the fp32 reference (no TF32): slow, so fewer iterations
            return lambda: timed(lambda: ring_attention(q, k, v, causal=True, scale=None, group=group,
                                                        backend=backend), iters)

        def torch_cp(rotate: str | None):
            # k/v repeated to 32 heads (it takes no grouped-query k/v); the buffers are
            # sharded once on entering the context (resized in place, so they must not
            # require grad: the leaves are detached views), then SDPA inside it is timed.
            # rotate None: its default (all-gather of K/V); "alltoall": its ring rotation.
            def run():
                qr, kr, vr = (t.clone() for t in (qg, kg.repeat_interleave(4, 1), vg.repeat_interleave(4, 1)))
                if rotate is not None:
                    set_rotate_method(rotate)
                try:
                    with context_parallel(mesh, buffers=[qr, kr, vr], buffer_seq_dims=[2, 2, 2]):
                        qs, ks, vs = (t.detach().requires_grad_() for t in (qr, kr, vr))
                        return timed(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
                finally:
                    set_rotate_method(default_rotate)
            return run

        # packed documents of mean 2K tokens (uniform 1..4K), sharded per document as
        # ParallelModel shards them, the ring masking by document and global position
        lengths = torch.randint(1, 4096, (S // 1024,), generator=torch.Generator().manual_seed(1))
        docs_g = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)[:S][None]
        didx = document_zigzag_indices(docs_g, cp, rank).to(dev)  # (1, S/cp)
        qd, kd, vd = (t[:, :, didx[0]].contiguous().requires_grad_() for t in (qg, kg, vg))
        docs_local = docs_g.to(dev).gather(1, didx).to(torch.int32)

        def ours_documents(backend):
            return lambda: timed(lambda: ring_attention(qd, kd, vd, causal=True, scale=None, group=group,
                                                        backend=backend, document_ids=docs_local, positions=didx))

        q1, k1, v1 = (t[:, :, :tokens].contiguous().requires_grad_() for t in (qg, kg, vg))
        k1r, v1r = (t.detach().repeat_interleave(4, 1).requires_grad_() for t in (k1, v1))
        qf, kf, vf = (t.detach().clone().requires_grad_() for t in (qg, kg, vg))
        one_gpu = 4 * HQ * tokens * tokens * D / 2
        impls = {
            f"ours_triton_ring_cp{cp}": (ours("triton"), flops_fwd),
            f"ours_sdpa_ring_cp{cp}": (ours("sdpa"), flops_fwd),
            f"ours_triton_ring_cp{cp}_documents_2k": (ours_documents("triton"), flops_fwd),
            f"ours_torch_ring_cp{cp}": (ours("torch", iters=3), flops_fwd),
            f"torch_context_parallel_cp{cp}": (torch_cp(None), flops_fwd),
            f"torch_context_parallel_cp{cp}_alltoall": (torch_cp("alltoall"), flops_fwd),
            "sdpa_1gpu": (lambda: timed(lambda: F.scaled_dot_product_attention(q1, k1r, v1r, is_causal=True)),
                          one_gpu),
            "ours_triton_1gpu": (lambda: timed(lambda: flash_attention(q1, k1, v1, causal=True)[0]), one_gpu),
            # the whole global sequence on one GPU: the strong-scaling baseline of the ring
            "ours_triton_1gpu_global_S": (lambda: timed(lambda: flash_attention(qf, kf, vf, causal=True)[0]),
                                          flops_fwd * cp),
        }
        for name, (run, flops) in impls.items():
            if args.skip and re.search(args.skip, name):
                continue
            row = {"impl": name, "shape": shape, "queue_ms": QUEUE_MS}
            try:
                fwd, both = run()
                row.update(median_ms=fwd, fwd_bwd_ms=both, fwd_tflops=flops / fwd / 1e9,
                           fwd_bwd_tflops=3.5 * flops / both / 1e9)
            except Exception as e:  # noqa: BLE001 - an impl that cannot run is a row that says why
                row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
            torch.cuda.empty_cache()
            rows.append(row)
            if rank == 0:
                print(row, flush=True)
        if t_idx == 0:  # accuracy against float64, on the gathered outputs
            ref = ref_out(qg, kg, vg)

            def err(x: torch.Tensor) -> dict:
                diff = x.double() - ref
                return {"max_abs": diff.abs().max().item(), "rel_fro": (diff.norm() / ref.norm()).item()}
            with torch.no_grad():
                for name, backend in ((f"ours_triton_ring_cp{cp}", "triton"), (f"ours_torch_ring_cp{cp}", "torch")):
                    local = ring_attention(q, k, v, causal=True, scale=None, group=group, backend=backend)
                    parts = [torch.empty_like(local) for _ in range(cp)]
                    dist.all_gather(parts, local.contiguous())
                    full = torch.empty_like(qg)
                    for r in range(cp):
                        full[:, :, zigzag_indices(S, cp, r, dev)] = parts[r]
                    errors[name] = err(full)
                errors["sdpa_1gpu_bf16_same_S"] = err(F.scaled_dot_product_attention(
                    qg, kg.repeat_interleave(4, 1), vg.repeat_interleave(4, 1), is_causal=True))
                try:
                    qr, kr, vr = (t.clone() for t in (qg, kg.repeat_interleave(4, 1), vg.repeat_interleave(4, 1)))
                    with context_parallel(mesh, buffers=[qr, kr, vr], buffer_seq_dims=[2, 2, 2]):
                        local = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)
                    (full,) = context_parallel_unshard(mesh, [local], [2])
                    errors[f"torch_context_parallel_cp{cp}"] = err(full)
                except Exception as e:  # noqa: BLE001
                    errors[f"torch_context_parallel_cp{cp}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if rank == 0:
                print("max abs error vs float64:", errors, flush=True)
            profile_ring(q, k, v, group, rank, tokens)
    if rank == 0:
        by = {(r["impl"], r["shape"]): r for r in rows}
        targets = []
        for tokens in args.tokens:
            shape = f"b1 hq{HQ} hkv{HKV} d{D} causal bf16, {tokens} tokens/GPU, S={tokens * cp}"
            get = lambda n, key: by.get((n, shape), {}).get(key, float("nan"))  # noqa: E731 (--skip: nan)
            targets += [
                {"name": f"{tokens}: triton 1gpu fwd / sdpa fwd", "value": get("ours_triton_1gpu", "fwd_tflops") / get("sdpa_1gpu", "fwd_tflops"), "goal": 0.9, "higher_is_better": True},
                {"name": f"{tokens}: triton 1gpu fwd+bwd / sdpa", "value": get("ours_triton_1gpu", "fwd_bwd_tflops") / get("sdpa_1gpu", "fwd_bwd_tflops"), "goal": 0.9, "higher_is_better": True},
                {"name": f"{tokens}: our faster ring cp{cp} / torch context_parallel, its faster rotation (fwd+bwd)", "value": max(get(f"ours_triton_ring_cp{cp}", "fwd_bwd_tflops"), get(f"ours_sdpa_ring_cp{cp}", "fwd_bwd_tflops")) / max(get(f"torch_context_parallel_cp{cp}", "fwd_bwd_tflops"), get(f"torch_context_parallel_cp{cp}_alltoall", "fwd_bwd_tflops")), "goal": 1.15, "higher_is_better": True},
                {"name": f"{tokens}: documents of mean 2K, ring time / causal ring time (fwd+bwd)", "value": get(f"ours_triton_ring_cp{cp}_documents_2k", "fwd_bwd_ms") / get(f"ours_triton_ring_cp{cp}", "fwd_bwd_ms"), "goal": 0.15, "higher_is_better": False},
                {"name": f"{tokens}: ring efficiency cp{cp} / triton 1gpu, same tokens per GPU (fwd+bwd)", "value": get(f"ours_triton_ring_cp{cp}", "fwd_bwd_tflops") / get("ours_triton_1gpu", "fwd_bwd_tflops"), "goal": 0.93, "higher_is_better": True},
                {"name": f"{tokens}: ring strong-scaling efficiency cp{cp} / triton 1gpu on the global sequence (fwd+bwd)", "value": get(f"ours_triton_ring_cp{cp}", "fwd_bwd_tflops") / get("ours_triton_1gpu_global_S", "fwd_bwd_tflops"), "goal": 0.9, "higher_is_better": True},
            ]
        if f"torch_context_parallel_cp{cp}" in errors:
            targets.append({"name": "triton ring error / torch context_parallel error (relative Frobenius)",
                            "value": errors[f"ours_triton_ring_cp{cp}"]["rel_fro"]
                            / max(errors[f"torch_context_parallel_cp{cp}"]["rel_fro"], 1e-12),
                            "goal": 1.0, "higher_is_better": False})
        from triton_kernels import flash_attention_bwd_kernels as fa_bwd
        from triton_kernels import flash_attention_kernels as fa
        tuned = {kern: {str(key): str(cfg) for key, cfg in getattr(mod, kern).cache.items()}
                 for mod, kern in ((fa, "_attn_fwd"), (fa_bwd, "_attn_bwd_dkdv"), (fa_bwd, "_attn_bwd_dq"))}
        print(write_results(args.name, rows, targets, errors=errors, cp=cp, autotuned=tuned,
                            flash_backward=flash_attention_module._BACKWARD))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
