"""The train loop: process group -> mesh -> meta Llama -> parallelize -> AdamW -> steps.

One optimizer step::

    x, y = data.batch(step)                 # this dp rank's global_batch / dp sequences
    loss = pm.forward_backward(x, y)        # micro-batched; global mean token loss
    gn = pm.clip_grad_norm_(grad_clip)      # global L2 norm over every placement
    opt.step(); sched.step(); opt.zero_grad()

Everything that can be wrong with a config is checked before the first collective, so a
bad recipe fails the same way on every rank instead of hanging.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import Checkpointer, choose_resume_checkpoint, import_hf, load_checkpoint
from ..mesh import ParallelDims, build_mesh
from ..models.llama import Llama
from ..parallelize import parallelize
from ..validation import check_degrees
from .config import TrainConfig
from .data import build_batch_source
from .metrics import (MetricsWriter, ProgressPrinter, flops_per_token, mfu, peak_memory_gib)
from .schedule import build_optimizer, build_scheduler

PROFILE_FIRST_STEP = 2  # skip the first steps (allocator warm-up, lazy init)
PROFILE_NUM_STEPS = 3


def resolve_device(device: str, nproc_per_node: int | None = None) -> str:
    """``[cluster] device`` -> "cuda" or "cpu"; a CUDA run needs a GPU for each local rank.

    ``nproc_per_node``: the local ranks about to be launched (checked before they spawn)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ValueError("[cluster] device='cuda' (--device cuda) but no GPU is visible: "
                             "run with --device cpu (gloo ranks on this CPU)")
        if nproc_per_node is not None and nproc_per_node > gpus:
            raise ValueError(f"--nproc-per-node {nproc_per_node} with device 'cuda' needs {nproc_per_node} GPUs "
                             f"on this host, but {gpus} are visible: launch at most {gpus} ranks per node, or "
                             f"run on the CPU with --device cpu")
    return device


def init_distributed(device: str = "auto") -> bool:
    """Init the default group (nccl for device "cuda", gloo for "cpu") from torchrun's
    environment, or a world of one without it. Returns whether this call created the group."""
    if dist.is_initialized():
        return False
    local_ranks = int(os.environ["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in os.environ else None
    cuda = resolve_device(device, local_ranks) == "cuda"
    backend = "nccl" if cuda else "gloo"
    kwargs = {}
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, **kwargs)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return True


def parallel_dims(cfg: TrainConfig, world_size: int) -> ParallelDims:
    """The degrees for this world, with a hint when the launch size does not fit."""
    try:
        return cfg.parallel.dims(world_size)
    except ValueError as e:
        n = cfg.cluster.nproc_per_node
        hint = f" (the recipe targets {n} ranks: pass --nproc-per-node {n})" if n and n != world_size else ""
        raise ValueError(f"{e}{hint}") from None


def preflight(cfg: TrainConfig, world_size: int) -> ParallelDims:
    """Every check that needs only the config and the world size: degrees vs world size, batch sizes vs dp. Same result on every rank, no collective."""
    dims = parallel_dims(cfg, world_size)
    check_degrees(dims, cfg.parallel_plan(), has_moe=cfg.model.args().moe is not None)  # the API's own checks
    if cfg.checkpoint.init_from_hf:  # the folder's headers and config against the recipe's model
        from ..checkpoint.hf_llama_config import check_config
        from ..checkpoint.safetensors_dir import CONFIG_FILE, HFCheckpoint

        ckpt = HFCheckpoint(cfg.checkpoint.init_from_hf)
        check_config(ckpt.config, cfg.model.args(), ckpt.path / CONFIG_FILE)
    return dims


class StepProfiler:
    """torch.profiler around a few steps on the listed ranks; writes a Chrome trace."""

    def __init__(self, enabled: bool, first: int, num: int, path: Path):
        self.enabled, self.first, self.last, self.path = enabled, first, first + num - 1, path
        self._prof: torch.profiler.profile | None = None

    def before(self, step: int) -> None:
        if self.enabled and step == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts, acc_events=True)  # one window, keep all
            self._prof.__enter__()

    def after(self, step: int) -> None:
        if self._prof is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._prof.export_chrome_trace(str(self.path))
            print(f"[rank {dist.get_rank()}] wrote profiler trace {self.path}", flush=True)
            self._prof = None


def start_from_checkpoint(cfg: TrainConfig, pm, opt, sched, global_batch: int) -> int:
    """Load the checkpoint the config asks for (collective); returns the step to start at.

    ``resume = "auto"``: the newest *complete* checkpoint under ``save``, else under
    ``load`` (interrupted saves are ignored), else none. Otherwise ``load`` if given. The
    weights, optimizer state, LR schedule and (same layout) RNG states are restored; the
    data position is the step itself, as the batch sources are functions of the step."""
    c = cfg.checkpoint
    path = None
    if c.resume == "auto":
        path = choose_resume_checkpoint((c.save, c.load), target_step=cfg.training.steps,
                                        log=lambda msg: print(f"[{cfg.name}] {msg}", flush=True))
    if path is None and c.load:
        path = c.load
    if path is None:
        return 0
    meta = load_checkpoint(path, pm, opt, sched)
    data = meta.get("data") or {}
    if dist.get_rank() == 0:
        print(f"[{cfg.name}] resumed from {meta['path']} at step {meta['step']}", flush=True)
        seed = cfg.training.seed
        if data.get("global_batch_size") not in (None, global_batch) or data.get("seed") not in (None, seed):
            warnings.warn(f"the checkpoint was trained with global batch {data.get('global_batch_size')} and seed "
                          f"{data.get('seed')}, this run uses {global_batch} and {cfg.training.seed}: the data "
                          f"stream continues from step {meta['step']} but is not the one it would have seen")
    return int(meta["step"])


def train(cfg: TrainConfig) -> list[float]:
    """Run ``cfg.training.steps`` optimizer steps; returns the loss of each step (from the
    resumed step on, when resuming)."""
    owns_group = init_distributed(cfg.cluster.device)
    try:
        return _train(cfg)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig) -> list[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    t, lg = cfg.training, cfg.logging
    dims = preflight(cfg, world)
    global_batch = t.global_batch_size or t.micro_batch_size * dims.dp
    args = cfg.model.args()
    plan = cfg.parallel_plan(global_batch)

    mesh = build_mesh(pp=dims.pp, dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard,
                      cp=dims.cp, tp=dims.tp)
    with torch.device("meta"):
        model = Llama(args)
    pm = parallelize(model, mesh, plan)
    pm.init_weights(t.seed)
    opt = build_optimizer(pm.named_parameters(), lr=t.lr, weight_decay=t.weight_decay,
                          betas=(t.beta1, t.beta2), eps=t.eps)
    sched = build_scheduler(opt, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                            total_steps=t.steps, style=t.lr_decay_style)
    dp_rank = pm.dp_rank
    data = build_batch_source(path=cfg.data.path, dtype=cfg.data.dtype, mock=cfg.data.mock,
                              seq_len=t.seq_len, vocab_size=args.vocab_size,
                              global_batch_size=global_batch, dp_rank=dp_rank, dp_size=dims.dp,
                              seed=t.seed)
    start = start_from_checkpoint(cfg, pm, opt, sched, global_batch)
    if start == 0 and cfg.checkpoint.init_from_hf:  # (a resumed checkpoint supersedes it)
        import_hf(pm, cfg.checkpoint.init_from_hf)
        if rank == 0:
            print(f"[{cfg.name}] weights from the Hugging Face folder {cfg.checkpoint.init_from_hf}", flush=True)
    ck = cfg.checkpoint
    saver = Checkpointer(ck.save, interval=ck.save_interval, async_save=ck.async_save) if ck.save else None
    source = "synthetic" if cfg.data.synthetic else cfg.data.path
    data_state = lambda s: {"step": s, "consumed_samples": s * global_batch,  # noqa: E731 - the data position
                            "global_batch_size": global_batch, "seq_len": t.seq_len, "seed": t.seed, "source": source}

    on_gpu = pm.device.type == "cuda"
    tokens_per_step = global_batch * t.seq_len
    flops_tok = flops_per_token(args, t.seq_len)
    run_dir = cfg.run_dir
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        source = "synthetic Markov stream" if cfg.data.synthetic else f"token file {cfg.data.path}"
        print(f"[{cfg.name}] world {world} | mesh {dict(zip(mesh.mesh_dim_names, mesh.shape))} | "
              f"Llama {args.num_params() / 1e6:.1f}M params | {flops_tok / 1e6:.1f} MFLOP/token | "
              f"{global_batch} seqs x {t.seq_len} tokens/step, {global_batch // dims.dp // t.micro_batch_size} "
              f"micro-batches/rank | data: {source} | metrics: {lg.metrics_path}", flush=True)
    bad_ranks = [r for r in lg.profile_ranks if not 0 <= r < world]
    if lg.profile and bad_ranks and rank == 0:
        warnings.warn(f"--profile-ranks {bad_ranks} not in world of {world}: not profiled")
    profiler = StepProfiler(lg.profile and rank in lg.profile_ranks,
                            first=min(PROFILE_FIRST_STEP, t.steps - 1), num=PROFILE_NUM_STEPS,
                            path=run_dir / "profile" / f"rank{rank}.trace.json")
    printer = ProgressPrinter(t.steps, lg.log_interval, enabled=rank == 0, on_gpu=on_gpu)

    losses: list[float] = []
    n_tokens = start * tokens_per_step
    with MetricsWriter(lg.metrics_path, enabled=rank == 0, resume_step=start) as writer:
        try:
            for step in range(start, t.steps):
                profiler.before(step)
                t0 = time.perf_counter()
                with torch.profiler.record_function("train_step"):
                    x, y = data.batch(step)
                    loss = pm.forward_backward(x, y)
                    grad_norm = pm.clip_grad_norm_(t.grad_clip if t.grad_clip > 0 else math.inf)
                    lr = sched.get_last_lr()[0]
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    pm.update_expert_biases()  # aux-loss-free balancing, if the model uses it
                    balance = pm.moe_stats()  # MoE models: aux loss and expert load (host sync)
                loss_v = loss.item()  # host sync: the step's time is complete
                dt = time.perf_counter() - t0
                profiler.after(step)
                if not math.isfinite(loss_v):
                    raise FloatingPointError(f"loss is {loss_v} at step {step + 1}: lower --lr or "
                                             f"raise --lr-warmup-iters")
                losses.append(loss_v)
                n_tokens += tokens_per_step
                tps = tokens_per_step / dt
                rec = {"step": step + 1, "loss": loss_v, "lr": lr, "grad_norm": float(grad_norm),
                       "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / world,
                       "mfu": mfu(tps / world, flops_tok) if on_gpu else None,
                       "peak_mem_gib": peak_memory_gib(pm.device), "step_time_s": dt,
                       "tokens": n_tokens}
                rec.update(balance)
                if pm.pipeline is not None:  # this rank's idle time inside the schedule
                    pipe = pm.pipeline
                    rec.update(bubble_s=pipe.bubble_s, bubble_frac=pipe.bubble_s / max(pipe.step_s, 1e-9))
                writer.write(rec)
                printer(rec)
                if saver is not None and (saver.due(step + 1) or step + 1 == t.steps):
                    where = saver.save(step + 1, pm, opt, sched, data=data_state(step + 1))
                    if rank == 0:
                        verb = "saving" if saver.async_save else "saved"
                        print(f"[{cfg.name}] {verb} checkpoint {where}", flush=True)
        finally:
            profiler.close()
    if saver is not None:
        saver.close()  # publishes a pending asynchronous save
    return losses
