"""Resuming: which checkpoint, and what a resumed run does with flags that differ from it.

A checkpoint restores the weights, the optimizer moments, the position in the LR schedule
(optimizer steps taken), the data position (the step; batch sources are functions of it)
and, in the same layout, the RNG states. Everything the flags set is this run's: the
learning-rate schedule (peak ``--lr``, ``--min-lr``, ``--lr-warmup-iters``,
``--lr-decay-style``, its length ``--train-iters``) is recomputed at the checkpoint's
position, and AdamW's betas, eps and weight decay are the flags' (the saved param groups
no longer win: a new ``--lr`` used to change only the schedule's factor). Each value that
differs from the checkpoint's is printed on one line, saying what it changes from here on.

``--train-iters`` at or below the checkpoint's step is "nothing to do", said in one line.

What a checkpoint records of its run (``checkpoint.json``'s ``extra.training``,
:func:`training_record`) is what the comparison reads; checkpoints written before it
existed give what their param groups, scheduler and data position hold (lr, betas, eps,
weight decay, global batch, sequence length, seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..checkpoint import choose_resume_checkpoint, load_checkpoint
from .config import TrainConfig, TrainingConfig
from .schedule import hyperparameters, reapply_hyperparameters

#: (training record key, flag, what a new value changes from the resumed step on)
TRACKED: tuple[tuple[str, str, str], ...] = (
    ("lr", "--lr", "the LR schedule's peak"),
    ("min_lr", "--min-lr", "the LR schedule's floor"),
    ("warmup_steps", "--lr-warmup-iters", "the LR warmup (the schedule is recomputed at the resumed step)"),
    ("lr_decay_style", "--lr-decay-style", "the LR decay's shape"),
    ("steps", "--train-iters", "the run's length: the LR decays to --min-lr at the new last step"),
    ("global_batch_size", "--global-batch-size", "sequences per step; the data stream is indexed by step, "
     "so the new batches do not continue the old ones sample for sample"),
    ("seq_len", "--seq-length", "tokens per sequence (the data windows change with it)"),
    ("seed", "--seed", "the data order (synthetic data: another Markov chain); weights, moments and RNG "
     "states come from the checkpoint"),
    ("weight_decay", "--weight-decay", "AdamW's decoupled weight decay of the matrices"),
    ("beta1", "--adam-beta1", "AdamW's first-moment decay"),
    ("beta2", "--adam-beta2", "AdamW's second-moment decay"),
    ("eps", "--adam-eps", "AdamW's epsilon"),
    ("optimizer_state_dtype", "--exp-avg-dtype", "the dtype AdamW keeps its moments in (the loaded ones are cast)"),
    ("grad_clip", "--clip-grad", "the gradient-norm clip"),
)


@dataclass
class ResumePoint:
    """Where a run starts: ``step`` optimizer-loop steps done (0: a fresh run)."""

    step: int = 0
    path: str | None = None
    consumed_samples: int = 0
    tokens: int = 0
    skipped_steps: int = 0  # non-finite steps skipped before the checkpoint


def training_record(t: TrainingConfig, global_batch: int) -> dict[str, Any]:
    """What a checkpoint records of the run that wrote it (``extra.training``)."""
    rec = {key: getattr(t, key) for key, _, _ in TRACKED if key != "global_batch_size"}
    rec["global_batch_size"] = global_batch
    return rec


def saved_training(meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's training settings: its record, or what older checkpoints hold."""
    rec = dict(((meta.get("extra") or {}).get("training")) or {})
    if rec:
        return rec
    groups = meta.get("optimizer_param_groups") or []
    if groups:
        g = groups[0]  # the decayed matrices' group (schedule.param_groups puts it first)
        rec.update(lr=g.get("initial_lr"), weight_decay=g.get("weight_decay"), eps=g.get("eps"))
        if g.get("betas"):
            rec.update(beta1=g["betas"][0], beta2=g["betas"][1])
    base = (meta.get("scheduler") or {}).get("base_lrs")
    if base:
        rec["lr"] = base[0]
    data = meta.get("data") or {}
    for key in ("global_batch_size", "seq_len", "seed"):
        if data.get(key) is not None:
            rec[key] = data[key]
    return {k: v for k, v in rec.items() if v is not None}


def changes(saved: dict[str, Any], now: dict[str, Any], step: int) -> list[str]:
    """One line per setting whose value differs from the checkpoint's."""
    out = []
    for key, flag, what in TRACKED:
        if key in saved and key in now and saved[key] != now[key]:
            out.append(f"{flag} {now[key]} (the checkpoint's: {saved[key]}): {what}, from step {step + 1} on")
    return out


def checkpoint_to_resume(cfg: TrainConfig) -> str | Path | None:
    """``resume = "auto"``: the newest published checkpoint under ``save``, else under
    ``load``, that verifies against its content hashes (collective; each one skipped is
    logged with the reason: ``checkpoint.resume.choose_resume_checkpoint``), else none.
    Otherwise ``load`` if given. (Its "nothing to do" is said by :func:`nothing_to_do`,
    after the load.)"""
    c = cfg.checkpoint
    path = None
    if c.resume == "auto":
        path = choose_resume_checkpoint((c.save, c.load), log=lambda msg: print(f"[{cfg.name}] {msg}", flush=True))
    if path is None and c.load:
        path = c.load
    return path


def start_from_checkpoint(cfg: TrainConfig, pm, opt, sched, global_batch: int) -> ResumePoint:
    """Load the checkpoint the config asks for (collective), then put this run's settings
    back over the saved ones (:func:`~.schedule.reapply_hyperparameters`); rank 0 prints
    the resumed step, the next step's lr, and one line per changed setting."""
    path = checkpoint_to_resume(cfg)
    if path is None:
        return ResumePoint()
    ours = hyperparameters(opt)
    meta = load_checkpoint(path, pm, opt, sched)
    reapply_hyperparameters(opt, sched, ours)
    step = int(meta["step"])
    data = meta.get("data") or {}
    saved = saved_training(meta)
    consumed = int(data.get("consumed_samples", step * saved.get("global_batch_size", global_batch)))
    tokens = int(data.get("tokens", consumed * saved.get("seq_len", cfg.training.seq_len)))
    extra = meta.get("extra") or {}
    point = ResumePoint(step=step, path=str(meta["path"]), consumed_samples=consumed, tokens=tokens,
                        skipped_steps=int(extra.get("skipped_steps", 0)))
    if dist.get_rank() == 0:
        print(f"[{cfg.name}] resumed from {meta['path']} at step {step}; the next step's lr is "
              f"{opt.param_groups[0]['lr']:.3e}", flush=True)
        for line in changes(saved, training_record(cfg.training, global_batch), step):
            print(f"[{cfg.name}] resumed with {line}", flush=True)
    return point


def nothing_to_do(cfg: TrainConfig, point: ResumePoint) -> str | None:
    """The one line for a resumed run whose ``--train-iters`` is already reached, else None."""
    if point.path is None or point.step < cfg.training.steps:
        return None
    return (f"[{cfg.name}] nothing to do: {point.path} is at step {point.step} and --train-iters is "
            f"{cfg.training.steps}; raise --train-iters to train further")


__all__ = ["ResumePoint", "TRACKED", "changes", "checkpoint_to_resume", "nothing_to_do", "saved_training",
           "start_from_checkpoint", "training_record"]
