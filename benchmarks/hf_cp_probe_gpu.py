"""Probe: why a transformers Llama barely learns under CP2 on GPUs (issue 18's anomaly).

Run on 2 ranks: ``torchrun --nproc-per-node 2 benchmarks/hf_cp_probe_gpu.py --out probe.json``
(NCCL on GPUs; gloo on CPU, where ``TRITON_INTERPRET=1`` runs the Triton ring).

For each configuration (model, mesh, plan) it builds the model from one seed, keeps a
single-device copy, and

1. compares the first step's loss and every gradient of the parallel model with the
   single-device model in fp32 (the "truth"): cosine, norm ratio, relative error per
   parameter; the single-device model under ``torch.autocast(bf16)`` gives the noise floor
   of bf16 against the same truth;
2. trains ``--steps`` steps on one fixed batch (AdamW, clipping at 1.0, as
   ``throughput_worker.py`` does) and prints the losses next to the single-device model's
   (autocast bf16 when the plan is bf16, as the benchmark's 1-GPU row runs it);
3. counts the ring-attention calls per step (the ring is installed by module hooks; a
   count of 0 would mean each rank attends only to its own chunk).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

RING_CALLS = [0]


def count_ring_calls() -> None:
    import dtensor_parallel.context_parallel.attention as attn

    inner = attn.ring_attention

    def counted(*args, **kwargs):
        RING_CALLS[0] += 1
        return inner(*args, **kwargs)

    attn.ring_attention = counted


def build(kind: str, a, device):
    torch.manual_seed(0)
    if kind == "hf":
        import transformers

        cfg = transformers.LlamaConfig(
            vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
            num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=a.seq,
            rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg).float()
    else:
        from dtensor_parallel.models import Llama, ModelArgs

        args = ModelArgs(dim=a.hidden, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, vocab_size=a.vocab,
                         ffn_hidden=a.ffn, max_seq_len=a.seq)
        with torch.device(device):
            model = Llama(args)
        model.init_weights(buffer_device=device, seed=0)
    with torch.no_grad():  # the same weights on every rank, whatever the init did
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t, src=0)
    return model


def ref_forward(model, kind: str, x):
    out = model(input_ids=x) if kind == "hf" else model(x)
    return out.logits if hasattr(out, "logits") else out


def ref_step(model, kind, x, y, bf16: bool):
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(x.device.type, enabled=False)
    with ctx:
        logits = ref_forward(model, kind, x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    return loss.detach()


def compare(grads: dict, ref_model) -> dict:
    rows, dot, n1, n2 = {}, 0.0, 0.0, 0.0
    for name, p in ref_model.named_parameters():
        g = grads.get(name)
        if g is None or p.grad is None:
            rows[name] = {"missing": True}
            continue
        g, r = g.detach().double().cpu(), p.grad.detach().double().cpu()  # (fp64: no cosine above 1)
        cos = float(F.cosine_similarity(g.flatten(), r.flatten(), dim=0))
        rows[name] = {"cos": round(cos, 5), "norm_ratio": round(float(g.norm() / r.norm().clamp_min(1e-30)), 4),
                      "rel": round(float((g - r).norm() / r.norm().clamp_min(1e-30)), 5)}
        dot += float((g * r).sum())
        n1 += float(g.norm() ** 2)
        n2 += float(r.norm() ** 2)
    worst = sorted((v["cos"], k) for k, v in rows.items() if "cos" in v)[:6]
    return {"global_cos": round(dot / max((n1 * n2) ** 0.5, 1e-30), 5), "global_norm_ratio": round((n1 / n2) ** 0.5, 4),
            "worst": worst, "per_param": rows}


def train(step_fn, steps: int) -> list[float]:
    return [round(float(step_fn()), 4) for _ in range(steps)]


def make_opt(params, device):
    return torch.optim.AdamW(params, lr=8e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                             fused=device.type == "cuda")


_REF_CACHE: dict = {}


def reference(kind: str, a, device, x, y, bf16: bool):
    """Truth (fp32) gradients, the autocast-bf16 gradients, and the single-device losses."""
    key = (kind, bf16)
    if key in _REF_CACHE:
        return _REF_CACHE[key]
    from dtensor_parallel.plans.hf import prepare_hf_model

    model = build(kind, a, device)
    if kind == "hf":
        prepare_hf_model(model)  # the same causal SDPA entry the parallel copy uses
    truth_model = copy.deepcopy(model)
    truth_loss = ref_step(truth_model, kind, x, y, bf16=False)
    bf_model = copy.deepcopy(model)
    bf_loss = ref_step(bf_model, kind, x, y, bf16=True)
    floor = compare({n: p.grad for n, p in bf_model.named_parameters()}, truth_model)
    del bf_model
    opt = make_opt(model.parameters(), device)

    def step():
        loss = ref_step(model, kind, x, y, bf16)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    losses = train(step, a.steps)
    _REF_CACHE[key] = (truth_model, float(truth_loss), float(bf_loss), floor, losses)
    return _REF_CACHE[key]


CONFIGS = {  # name: (model, mesh kwargs, plan kwargs); the benchmark's plan first
    "hf/cp2/triton/bf16/selective": ("hf", {"cp": 2}, {"kernels": {"attention": "triton"}, "mixed_precision": "bf16",
                                                        "recompute": "selective"}),
    "hf/cp2/triton/bf16": ("hf", {"cp": 2}, {"kernels": {"attention": "triton"}, "mixed_precision": "bf16"}),
    "hf/cp2/torch/bf16/selective": ("hf", {"cp": 2}, {"mixed_precision": "bf16", "recompute": "selective"}),
    "hf/cp2/triton/fp32/selective": ("hf", {"cp": 2}, {"kernels": {"attention": "triton"}, "recompute": "selective"}),
    "hf/cp2/torch/fp32": ("hf", {"cp": 2}, {}),
    "hf/cp2/triton/bf16/selective/compile": ("hf", {"cp": 2}, {"kernels": {"attention": "triton"},
                                                                "mixed_precision": "bf16", "recompute": "selective",
                                                                "compile": True}),
    "ours/cp2/triton/bf16/selective": ("ours", {"cp": 2}, {"kernels": {"attention": "triton"},
                                                            "mixed_precision": "bf16", "recompute": "selective"}),
    "hf/fsdp2/bf16/selective": ("hf", {"dp_shard": 2}, {"mixed_precision": "bf16", "recompute": "selective"}),
}


def run_config(name: str, a, device, x, y) -> dict:
    from dtensor_parallel import ParallelPlan, build_mesh, parallelize

    kind, mesh_kwargs, plan_kwargs = CONFIGS[name]
    bf16 = plan_kwargs.get("mixed_precision") == "bf16"
    t0 = time.perf_counter()
    truth, truth_loss, bf_loss, floor, ref_losses = reference(kind, a, device, x, y, bf16)
    model = build(kind, a, device)
    pm = parallelize(model, build_mesh(**mesh_kwargs), ParallelPlan(**plan_kwargs))
    RING_CALLS[0] = 0
    loss0 = float(pm.forward_backward(pm.shard_batch(x), pm.shard_batch(y)))
    ring_calls_step0 = RING_CALLS[0]
    cmp = compare(pm.full_grads(), truth)
    pm.zero_grad()
    opt = make_opt(pm.parameters(), device)

    def step():
        loss = pm.forward_backward(pm.shard_batch(x), pm.shard_batch(y))
        pm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    losses = train(step, a.steps)
    row = {"config": name, "loss0": round(loss0, 5), "truth_loss0": round(truth_loss, 5),
           "bf16_ref_loss0": round(bf_loss, 5), "ring_calls_step0": ring_calls_step0,
           "grads_vs_fp32_truth": {k: v for k, v in cmp.items() if k != "per_param"},
           "bf16_floor_vs_truth": {k: v for k, v in floor.items() if k != "per_param"},
           "losses": losses, "one_device_losses": ref_losses, "seconds": round(time.perf_counter() - t0, 1),
           "per_param": cmp["per_param"]}
    return row


def targets(rows: list[dict]) -> list[dict]:
    """Per configuration, the worst parameter's gradient cosine against the fp32 one-device
    truth, judged against the same run's one-device bf16 model (the bf16 noise floor), less
    2e-4: a CP2 gradient no further from the truth than bf16 itself."""
    out = []
    for row in rows:
        if "error" in row:
            continue
        floor = row["bf16_floor_vs_truth"]["worst"][0][0]
        out.append({"name": f"{row['config']}: worst per-parameter gradient cosine vs fp32 one device",
                    "value": row["grads_vs_fp32_truth"]["worst"][0][0], "goal": round(floor - 2e-4, 5),
                    "higher_is_better": True})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default=None)
    a = p.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is fp32 (the truth)
        torch.backends.cudnn.allow_tf32 = False
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    count_ring_calls()
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1234)  # the benchmark's fixed random batch
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
    x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
    rows = []
    for name in a.configs.split(","):
        try:
            row = run_config(name, a, device, x, y)
        except Exception:  # noqa: BLE001 - report and go on to the next configuration
            import traceback
            row = {"config": name, "error": traceback.format_exc()[-3000:]}
        rows.append(row)
        if rank == 0:
            if "error" in row:
                print(name, "ERROR", row["error"][-1500:], flush=True)
            else:
                gc_, fl = row["grads_vs_fp32_truth"], row["bf16_floor_vs_truth"]
                print(f"{name}: loss0 {row['loss0']} (fp32 one device {row['truth_loss0']}), "
                      f"ring calls {row['ring_calls_step0']}, grads vs fp32: cos {gc_['global_cos']} "
                      f"norm x{gc_['global_norm_ratio']}"
                      f" (one-device bf16: cos {fl['global_cos']}), worst {gc_['worst'][:3]}\n  losses     "
                      f"{row['losses']}\n  one device {row['one_device_losses']} ({row['seconds']} s)", flush=True)
            if a.out:
                with open(a.out, "w") as f:
                    json.dump({"args": vars(a), "torch": torch.__version__,
                               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                               "date": time.strftime("%Y-%m-%d"), "rows": rows, "targets": targets(rows)},
                              f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
