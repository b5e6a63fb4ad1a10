"""The train loop: process group -> mesh -> meta Llama -> parallelize -> AdamW -> steps.

One optimizer step::

    collector.before(step)                  # Python's GC, at the same steps on every rank
    x, y = data.batch(step)                 # this dp rank's global_batch / dp sequences
    loss = pm.forward_backward(x, y)        # micro-batched; global mean token loss
    gn = pm.clip_grad_norm_(grad_clip)      # global L2 norm over every placement
    if guard.check(step + 1, loss, gn):     # all ranks agree; non-finite: skipped (nonfinite.py)
        opt.step(); sched.step()
    opt.zero_grad()

Everything that can be wrong with a config is checked before the first collective, so a
bad recipe fails the same way on every rank instead of hanging; ``--save`` is checked
writable then too, and a save that fills the disk says "disk full at PATH" (storage.py).
Resuming, and what changed flags do then: resume.py.
"""

from __future__ import annotations

import gc
import json
import math
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import Checkpointer, import_hf
from ..mesh import ParallelDims, build_mesh
from ..models.llama import Llama
from ..parallelize import parallelize
from ..validation import check_degrees
from .config import TrainConfig
from .data import build_batch_source, window_offsets
from .documents import build_document_masking
from .launch import init_distributed, process_group, resolve_device  # noqa: F401 - (also imported from here)
from .metrics import (MetricsWriter, ProgressPrinter, flops_per_token, mfu, peak_memory_gib)
from .nonfinite import NonFiniteError, NonFiniteGuard, state_is_finite
from .resume import nothing_to_do, start_from_checkpoint, training_record
from .schedule import build_optimizer, build_scheduler
from .storage import check_writable_dir, disk_full_error

PROFILE_FIRST_STEP = 2  # skip the first steps (allocator warm-up, lazy init)
PROFILE_NUM_STEPS = 3


def parallel_dims(cfg: TrainConfig, world_size: int) -> ParallelDims:
    """The degrees for this world, with a hint when the launch size does not fit."""
    try:
        return cfg.parallel.dims(world_size)
    except ValueError as e:
        n = cfg.cluster.nproc_per_node
        hint = f" (the recipe targets {n} ranks: pass --nproc-per-node {n})" if n and n != world_size else ""
        raise ValueError(f"{e}{hint}") from None


def preflight(cfg: TrainConfig, world_size: int, *, check_paths: bool = True) -> ParallelDims:
    """Every check that needs only the config and the world size: degrees vs world size, batch sizes vs dp,
    and (``check_paths``; not in a dry run) that ``--save`` and the metrics directory are writable. Same
    result on every rank, no collective."""
    dims = parallel_dims(cfg, world_size)
    check_degrees(dims, cfg.parallel_plan(), has_moe=cfg.model.args().moe is not None)  # the API's own checks
    if cfg.checkpoint.init_from_hf:  # the folder's headers and config against the recipe's model
        from ..checkpoint.hf_llama_config import check_config
        from ..checkpoint.safetensors_dir import CONFIG_FILE, HFCheckpoint

        ckpt = HFCheckpoint(cfg.checkpoint.init_from_hf)
        check_config(ckpt.config, cfg.model.args(), ckpt.path / CONFIG_FILE)
    if check_paths:  # last: a config error is reported before any directory is created
        check_output_paths(cfg)
    return dims


def check_output_paths(cfg: TrainConfig) -> None:
    """``--save`` and the metrics directory are directories this process can write."""
    if cfg.checkpoint.save:
        check_writable_dir(cfg.checkpoint.save, "--save")
    check_writable_dir(Path(cfg.logging.metrics_path).parent, "the metrics directory (--metrics)")


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


class ManualGC:
    """``[training] gc_interval`` (config.py): Python's automatic garbage collection is off
    during the run, and every rank collects the young generations at the start of every
    ``interval``-th step. An automatic collection starts whenever a rank's allocation count
    says so, at a different moment on each rank; in a synchronous step the others wait for it.
    (The throughput benchmark turns it off for both libraries, as TorchTitan's trainer does, so
    the trainer runs the way it was measured.) One full collection before the first step.
    ``interval`` 0: the automatic collection, untouched."""

    def __init__(self, interval: int):
        self.interval = interval
        self._was_enabled = True

    def __enter__(self) -> "ManualGC":
        self._was_enabled = gc.isenabled()
        if self.interval:
            gc.collect()
            gc.disable()
        return self

    def before(self, step: int) -> None:
        if self.interval and step > 0 and step % self.interval == 0:
            gc.collect(1)

    def __exit__(self, *exc) -> None:
        if self.interval and self._was_enabled:
            gc.enable()


def train(cfg: TrainConfig) -> list[float]:
    """Run ``cfg.training.steps`` optimizer steps; returns the loss of each step (from the
    resumed step on, when resuming)."""
    with process_group(cfg.cluster.device, cfg.cluster.distributed_timeout_minutes):  # timeout, heartbeat
        return _train(cfg)


def _train(cfg: TrainConfig) -> list[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    t, lg = cfg.training, cfg.logging
    dims = preflight(cfg, world)
    global_batch = t.global_batch_size or t.micro_batch_size * dims.dp
    args = cfg.model.args()
    plan = cfg.parallel_plan(global_batch)

    # plan.pipeline_sm_carveout leaves SMs to the pp communicator's P2P kernels: hold them to as many
    nccl = dist.get_backend() == "nccl"
    caps = {"pp": plan.pipeline_sm_carveout} if plan.pipeline_sm_carveout and dims.pp > 1 and nccl else None
    mesh = build_mesh(pp=dims.pp, dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard,
                      cp=dims.cp, tp=dims.tp, nccl_max_ctas=caps)
    with torch.device("meta"):
        model = Llama(args)
    pm = parallelize(model, mesh, plan)
    pm.init_weights(t.seed)
    opt = build_optimizer(pm.named_parameters(), lr=t.lr, weight_decay=t.weight_decay,
                          betas=(t.beta1, t.beta2), eps=t.eps, state_dtype=t.optimizer_state_dtype)
    sched = build_scheduler(opt, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                            total_steps=t.steps, style=t.lr_decay_style)
    dp_rank = pm.dp_rank
    data = build_batch_source(path=cfg.data.path, dtype=cfg.data.dtype, mock=cfg.data.mock,
                              seq_len=t.seq_len, vocab_size=args.vocab_size,
                              global_batch_size=global_batch, dp_rank=dp_rank, dp_size=dims.dp,
                              seed=t.seed)
    documents = build_document_masking(cfg.data, data)  # packed documents: masked attention
    resumed = start_from_checkpoint(cfg, pm, opt, sched, global_batch)
    start = resumed.step
    done = nothing_to_do(cfg, resumed)
    if done is not None:
        if rank == 0:
            print(done, flush=True)
        return []
    if start == 0 and cfg.checkpoint.init_from_hf:  # (a resumed checkpoint supersedes it)
        import_hf(pm, cfg.checkpoint.init_from_hf)
        if rank == 0:
            print(f"[{cfg.name}] weights from the Hugging Face folder {cfg.checkpoint.init_from_hf}", flush=True)
    tokens_per_step = global_batch * t.seq_len
    ck = cfg.checkpoint
    saver = Checkpointer(ck.save, interval=ck.save_interval, async_save=ck.async_save) if ck.save else None
    source = "synthetic" if cfg.data.synthetic else cfg.data.path

    def data_state(s: int) -> dict:  # the data position (samples and tokens add up across resumes)
        return {"step": s, "consumed_samples": resumed.consumed_samples + (s - start) * global_batch,
                "tokens": resumed.tokens + (s - start) * tokens_per_step, "global_batch_size": global_batch,
                "seq_len": t.seq_len, "seed": t.seed, "source": source}

    guard = NonFiniteGuard(t.max_nonfinite_steps, pm.device, skipped=resumed.skipped_steps)

    on_gpu = pm.device.type == "cuda"
    flops_tok = flops_per_token(args, t.seq_len)
    run_dir = cfg.run_dir
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        source = "synthetic Markov stream" if cfg.data.synthetic else f"token file {cfg.data.path}"
        if documents is not None:
            source += (f", documents masked after token {cfg.data.eod_token_id}" if cfg.data.eod_token_id is not None
                       else f", documents masked at the starts in {cfg.data.document_starts}")
        print(f"[{cfg.name}] world {world} | mesh {dict(zip(mesh.mesh_dim_names, mesh.shape))} | "
              f"Llama {args.num_params() / 1e6:.1f}M params | {flops_tok / 1e6:.1f} MFLOP/token | "
              f"{global_batch} seqs x {t.seq_len} tokens/step, {global_batch // dims.dp // t.micro_batch_size} "
              f"micro-batches/rank | AdamW moments {t.optimizer_state_dtype} | data: {source} | "
              f"metrics: {lg.metrics_path}", flush=True)
    bad_ranks = [r for r in lg.profile_ranks if not 0 <= r < world]
    if lg.profile and bad_ranks and rank == 0:
        warnings.warn(f"--profile-ranks {bad_ranks} not in world of {world}: not profiled")
    profiler = StepProfiler(lg.profile and rank in lg.profile_ranks,
                            first=min(PROFILE_FIRST_STEP, t.steps - 1), num=PROFILE_NUM_STEPS,
                            path=run_dir / "profile" / f"rank{rank}.trace.json")
    printer = ProgressPrinter(t.steps, lg.log_interval, enabled=rank == 0, on_gpu=on_gpu)

    losses: list[float] = []
    stop: NonFiniteError | None = None
    n_tokens = resumed.tokens
    with MetricsWriter(lg.metrics_path, enabled=rank == 0, resume_step=start) as writer, \
            ManualGC(t.gc_interval) as collector:
        try:
            for step in range(start, t.steps):
                profiler.before(step)
                t0 = time.perf_counter()
                collector.before(step)  # (inside the step's time: it is the run's time too)
                with torch.profiler.record_function("train_step"):
                    x, y = data.batch(step)
                    docs = None if documents is None else documents.ids(x, window_offsets(data, step))
                    loss = pm.forward_backward(x, y, document_ids=docs)
                    grad_norm = pm.clip_grad_norm_(t.grad_clip if t.grad_clip > 0 else math.inf)
                    lr = opt.param_groups[0]["lr"]  # the lr this step applies
                    try:
                        applied = guard.check(step + 1, loss, grad_norm)  # collective, same on every rank
                    except NonFiniteError as e:
                        stop = e
                        break
                    if applied:
                        opt.step()
                        sched.step()
                    opt.zero_grad(set_to_none=True)
                    if applied:
                        pm.update_expert_biases()  # aux-loss-free balancing, if the model uses it
                    balance = pm.moe_stats()  # MoE models: aux loss and expert load (host sync)
                loss_v = loss.item()  # host sync: the step's time is complete
                dt = time.perf_counter() - t0
                profiler.after(step)
                losses.append(loss_v)
                n_tokens += tokens_per_step
                tps = tokens_per_step / dt
                finite = lambda v: v if math.isfinite(v) else None  # noqa: E731 - JSON has no NaN
                rec = {"step": step + 1, "loss": finite(loss_v), "lr": lr, "grad_norm": finite(float(grad_norm)),
                       "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / world,
                       "mfu": mfu(tps / world, flops_tok) if on_gpu else None,
                       "peak_mem_gib": peak_memory_gib(pm.device), "step_time_s": dt,
                       "tokens": n_tokens, "skipped_steps": guard.skipped}
                if not applied:
                    rec["skipped"] = guard.describe_skip()
                rec.update(balance)
                if pm.pipeline is not None:  # this rank's idle time inside the schedule
                    pipe = pm.pipeline
                    rec.update(bubble_s=pipe.bubble_s, bubble_frac=pipe.bubble_s / max(pipe.step_s, 1e-9))
                writer.write(rec)
                printer(rec)
                if saver is not None and (saver.due(step + 1) or step + 1 == t.steps):
                    if not state_is_finite(pm.parameters(), opt, pm.device):  # collective
                        stop = NonFiniteError(
                            f"the weights or optimizer moments hold non-finite values after step {step + 1} "
                            f"(a finite gradient overflowed them): not saving it; resume from the last "
                            f"checkpoint with a lower --lr")
                        break
                    where = _save(saver, step + 1, pm, opt, sched, data=data_state(step + 1),
                                  extra={"training": training_record(t, global_batch),
                                         "skipped_steps": guard.skipped})
                    if rank == 0:
                        verb = "saving" if saver.async_save else "saved"
                        print(f"[{cfg.name}] {verb} checkpoint {where}", flush=True)
        finally:
            profiler.close()
    if saver is not None:
        _save(saver, None)  # publishes a pending asynchronous save (finite: checked before it was taken)
    if stop is not None:
        if rank == 0:
            print(f"[{cfg.name}] {stop}", flush=True)
        raise stop
    return losses


def _save(saver: Checkpointer, step: int | None, *args, **kwargs):
    """``saver.save(step, ...)``, or ``saver.close()`` for ``step=None``; a full disk is
    raised as ``DiskFullError("disk full at PATH ...")`` on every rank (DCP raises a failed
    write on every rank)."""
    try:
        return saver.close() if step is None else saver.save(step, *args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is one; only a full disk is translated
        full = disk_full_error(e, saver.root)
        if full is None:
            raise
        raise full from e
