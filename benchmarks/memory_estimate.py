"""Predicted peak memory (dtensor_parallel.planning.memory) against torch.cuda.max_memory_allocated.

Run on 2 and on 4 GPUs (each configuration is a few real training steps of a
Llama-3-8B-shaped model with fewer layers, bf16; a run takes the configurations of its
world size):

    torchrun --standalone --nproc-per-node 2 benchmarks/memory_estimate.py
    torchrun --standalone --nproc-per-node 4 benchmarks/memory_estimate.py

Each row: the estimator's peak for rank 0 and the measured peak of the steady-state steps
(2 and 3: AdamW state exists, gradients are set to None between steps), the largest over
the ranks; plus the memory right after initialization (fp32 weights + buffers) against the
estimator's weight bytes. Target: |predicted / measured - 1| <= 0.10 on every row. A
configuration that fails becomes a row with its error; the script never crashes.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, without PYTHONPATH
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from dtensor_parallel import ParallelPlan, build_mesh, parallelize  # noqa: E402
from dtensor_parallel.planning.memory import GIB, estimate_memory  # noqa: E402
from dtensor_parallel.mesh import ParallelDims  # noqa: E402
from dtensor_parallel.models.llama import Llama, llama3_args  # noqa: E402
from dtensor_parallel.trainer.schedule import build_optimizer  # noqa: E402

SEQ = int(os.environ.get("MEMORY_ESTIMATE_SEQ", 4096))
LAYERS = 4
FLAVOUR = os.environ.get("MEMORY_ESTIMATE_FLAVOUR", "8B")  # "debug": a CPU smoke run of the script (gloo)
CUDA = torch.cuda.is_available()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()
STEPS = 3
TARGET = 0.10

# name, degrees (their product is the world size it runs at), plan fields, micro-batch
# size, micro-batches a step[, (flavour, layers, sequence) instead of FLAVOUR x LAYERS, SEQ]
CONFIGS = [
    ("fsdp2", dict(dp_shard=2), dict(), 1, 1),
    ("fsdp2_selective", dict(dp_shard=2), dict(recompute="selective"), 1, 1),
    ("fsdp2_full_mbs2x2", dict(dp_shard=2), dict(recompute="full"), 2, 2),
    ("tp2_sp", dict(dp_shard=1, tp=2), dict(sequence_parallel=True), 1, 1),
    ("tp2_sp_full", dict(dp_shard=1, tp=2), dict(sequence_parallel=True, recompute="full"), 1, 1),
    # four ranks (run under --nproc-per-node 4): layouts the estimator was not adjusted on
    ("fsdp4_selective", dict(dp_shard=4), dict(recompute="selective"), 1, 1),
    ("tp2_sp_fsdp2", dict(dp_shard=2, tp=2), dict(sequence_parallel=True), 1, 1),
    ("tp4_sp_selective", dict(dp_shard=1, tp=4), dict(sequence_parallel=True, recompute="selective"), 2, 1),
    ("pp2_fsdp2_1f1b_m4", dict(pp=2, dp_shard=2), dict(pipeline_schedule="1f1b"), 1, 4),
    # eight ranks (issue 11): the 70B and 405B recipes' layers at their real sizes and TP
    # degrees, cut to fit one node (flavour, layers, sequence)
    ("llama3_70b_tp8_sp_selective_x4", dict(dp_shard=1, tp=8), dict(sequence_parallel=True, recompute="selective"),
     1, 1, ("70B", 4, 8192)),
    ("llama3_70b_tp4_sp_fsdp2_full_x4", dict(dp_shard=2, tp=4), dict(sequence_parallel=True, recompute="full"),
     1, 1, ("70B", 4, 8192)),
    ("llama3_405b_tp8_sp_selective_x2", dict(dp_shard=1, tp=8), dict(sequence_parallel=True, recompute="selective"),
     1, 1, ("405B", 2, 8192)),
]


class PhaseProbe:
    """Where the memory of one step goes, to check the estimator term by term: the bytes
    allocated when the head's logits appear (static state + saved activations + gathered
    weights + logits), the peak before that (forward) and after it (loss and backward),
    and the bytes of the tensors autograd saves for backward (unique storages, parameters
    excluded: FSDP's gathered weights and autocast's weight copies are counted apart)."""

    def __init__(self, model: torch.nn.Module, device) -> None:
        self.device, self.head = device, model.output
        self.saved: dict[int, int] = {}
        self.saved_params = 0
        self.at_logits = self.peak_forward = self.logits_bytes = 0

    def _pack(self, t: torch.Tensor):
        if t.device.type != "cpu":
            if isinstance(t, torch.nn.Parameter):
                self.saved_params += t.numel() * t.element_size()
            else:
                local = t._local_tensor if isinstance(t, DTensor) else t  # a DTensor has no storage
                try:
                    st = local.untyped_storage()
                    self.saved[st.data_ptr()] = st.nbytes()
                except RuntimeError:  # a tensor subclass without storage: its own size
                    self.saved[id(local)] = local.numel() * local.element_size()
        return t

    def _head_hook(self, module, args, out) -> None:
        local = out.to_local() if hasattr(out, "to_local") else out
        self.logits_bytes = local.numel() * local.element_size()
        self.at_logits = torch.cuda.memory_allocated(self.device)
        self.peak_forward = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def run(self, fn):
        handle = self.head.register_forward_hook(self._head_hook)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                out = fn()
            torch.cuda.synchronize()
        finally:
            handle.remove()
        return out, {"at_logits_gib": self.at_logits / GIB, "peak_forward_gib": self.peak_forward / GIB,
                     "peak_loss_backward_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
                     "saved_activations_gib": sum(self.saved.values()) / GIB,
                     "saved_parameters_gib": self.saved_params / GIB, "logits_gib": self.logits_bytes / GIB}


def run_config(name, degrees, plan_fields, mbs, n_micro, device, shape=None) -> dict:
    world = dist.get_world_size()
    flavour, layers, seq = shape or (FLAVOUR, LAYERS, SEQ)
    args = llama3_args(flavour, n_layers=layers, max_seq_len=seq)
    dims = ParallelDims(**degrees, world_size=world)
    plan = ParallelPlan(mixed_precision="bf16", micro_batch_size=mbs, global_batch_size=mbs * n_micro * dims.dp,
                        **plan_fields)
    # the measurement is the largest over the ranks, so the estimate is the largest over pp ranks
    est = max((estimate_memory(args, dims, plan, seq_len=seq, micro_batch_size=mbs, n_micro=n_micro, pp_rank=r)
               for r in range(dims.pp)), key=lambda e: e.peak_bytes)
    row = {"impl": name, "shape": f"{flavour}-shaped x{layers} layers, seq {seq}, mbs {mbs} x {n_micro}",
           "degrees": degrees, "plan": plan_fields, "predicted_gib": est.peak_bytes / GIB,
           "predicted_phase": est.peak_phase, "predicted_weights_gib": (est.param_bytes + est.buffer_bytes) / GIB,
           "predicted_breakdown_gib": {k: v / GIB for k, v in est.breakdown().items()},
           "predicted_terms_gib": {"activations": est.activation_bytes / GIB, "logits": est.logits_bytes / GIB,
                                   **{k: v / GIB for k, v in est.detail.items() if k != "in_flight"}}}
    mesh = build_mesh(**degrees)
    with torch.device("meta"):
        model = Llama(args)
    pm = parallelize(model, mesh, plan)
    pm.init_weights(seed=0)
    _sync()
    after_init = torch.cuda.memory_allocated(device) if CUDA else 0
    opt = build_optimizer(pm.named_parameters(), lr=1e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(pm.dp_rank)
    x = torch.randint(0, args.vocab_size, (mbs * n_micro, seq + 1), generator=g)
    times = []
    peak, phases = 0, {}
    for step in range(STEPS):
        if step == 1 and CUDA:  # steady state: AdamW state exists from here on
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        if step == STEPS - 1 and CUDA and n_micro == 1:  # the phases of the last step, same peak
            peak = torch.cuda.max_memory_allocated(device)
            loss, phases = PhaseProbe(model, device).run(lambda: pm.forward_backward(x[:, :-1], x[:, 1:]))
            peak = max(peak, int(phases["peak_forward_gib"] * GIB), torch.cuda.max_memory_allocated(device))
            phases["after_backward_gib"] = torch.cuda.memory_allocated(device) / GIB
            torch.cuda.reset_peak_memory_stats(device)  # from here: clipping and the optimizer step
        else:
            loss = pm.forward_backward(x[:, :-1], x[:, 1:])
        pm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t0)
        peak = max(peak, torch.cuda.max_memory_allocated(device)) if CUDA else 1
        if phases and "peak_optimizer_gib" not in phases:
            phases["peak_optimizer_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    stats = torch.tensor([peak, after_init], dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    measured, init = stats.tolist()
    row.update(measured_gib=measured / GIB, measured_after_init_gib=init / GIB,
               ratio=est.peak_bytes / measured, loss=float(loss), step_s=times[-1], measured_phases_rank0=phases)
    del pm, model, opt, loss
    return row


def main() -> int:
    if not CUDA and FLAVOUR != "debug":
        print("memory_estimate: needs CUDA GPUs (torchrun --nproc-per-node 2); MEMORY_ESTIMATE_FLAVOUR=debug "
              "smoke-tests the script on CPU")
        return 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if CUDA:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if CUDA else torch.device("cpu")
    backend, extra = ("nccl", {"device_id": device}) if CUDA else ("gloo", {})
    if "RANK" in os.environ:
        dist.init_process_group(backend, **extra)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **extra)
    world = dist.get_world_size()
    rows = []
    for name, degrees, plan_fields, mbs, n_micro, *shape in CONFIGS:
        need = 1
        for v in degrees.values():
            need *= v
        if need != world:
            rows.append({"impl": name, "error": f"needs {need} ranks, world is {world}: run under "
                                                f"torchrun --nproc-per-node {need}"})
            if dist.get_rank() == 0:
                print(f"{name}: {rows[-1]['error']}", flush=True)
            continue
        try:
            row = run_config(name, degrees, plan_fields, mbs, n_micro, device, *shape)
        except Exception as e:  # a row, not a crash
            row = {"impl": name, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=4)}
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        rows.append(row)
        if dist.get_rank() == 0:
            msg = (f"{name}: predicted {row['predicted_gib']:.2f} GiB ({row['predicted_phase']}), measured "
                   f"{row['measured_gib']:.2f} GiB, ratio {row['ratio']:.3f}; after init {row['measured_after_init_gib']:.2f}"
                   f" vs {row['predicted_weights_gib']:.2f} GiB") if "error" not in row else f"{name}: {row['error']}"
            print(msg, flush=True)
    rows = [r for r in rows if not r.get("error", "").startswith("needs ")]  # other world sizes' rows
    errs = [abs(r["ratio"] - 1) for r in rows if "ratio" in r]
    targets = [{"name": "max |predicted / measured - 1| of peak memory", "value": max(errs) if errs else None,
                "goal": TARGET, "higher_is_better": False}]
    if dist.get_rank() == 0:
        path = write_results("memory_estimate" if world == 2 else f"memory_estimate_{world}gpu", rows, targets,
                             world_size=world)
        print(f"wrote {path}; max error {targets[0]['value']}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
