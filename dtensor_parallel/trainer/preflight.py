"""Preflight: everything a recipe can get wrong that is checkable without the ranks, checked
in the launching process before any rank spawns, one line a problem.

``dtensor-parallel train`` runs :func:`preflight_errors` before it launches (exit 2 with one
``error:`` line a problem, instead of a traceback per rank after the spawn), and each rank
runs it again before its first collective (a torchrun launch has no launcher of ours). The
``plan`` command's dry run runs the same checks less the data file and the device, which
belong to the cluster it simulates.

=================  ===============================================================
check              what
=================  ===============================================================
degrees            the world size, the plan's degrees (``loop.preflight``: SP needs tp,
                   EP's fold, batch vs dp), a Hugging Face folder's config
device             a GPU a local rank when the device is cuda
optimizer          AdamW's betas in [0, 1), eps > 0, lr, weight decay, clipping finite
layout             the built-in Llama on the meta device through the library's own
                   validation (``validation.validate_layout``: tp vs heads, kv heads,
                   hidden and vocab sizes, experts vs ep, the pipeline split), the
                   kernels vs the device
sequence           the sequence length vs cp (zigzag) and SP
data               the token file: exists, states its dtype, holds one step, ids < vocab
paths              ``--save`` and the metrics directory writable (a probe file), last
=================  ===============================================================

The model's own shapes (dim vs heads, RoPE's even head dim, kv heads dividing heads) are
checked by :func:`check_model_args`, which the config's validation calls, so that a bad
shape never reaches a constructor. Only what needs the ranks is left for after the spawn:
rendezvous, device memory, collectives.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..mesh import ParallelDims
    from ..models.llama import ModelArgs
    from .config import TrainConfig, TrainingConfig

ERRORS = (ValueError, FileNotFoundError, NotImplementedError)


def check_model_args(args: ModelArgs) -> None:
    """The Llama's shapes: positive sizes, a whole head dim (dim / heads), an even one (RoPE
    rotates pairs of features), kv heads dividing heads (each kv head serves a group)."""
    for key, flag in (("dim", "--hidden-size"), ("n_layers", "--num-layers"), ("n_heads", "--num-attention-heads"),
                      ("n_kv_heads", "--num-query-groups"), ("vocab_size", "--vocab-size")):
        if getattr(args, key) < 1:
            raise ValueError(f"[model] {key}={getattr(args, key)} ({flag}) must be >= 1")
    d, h, kv = args.dim, args.n_heads, args.n_kv_heads
    if d % h:
        fits = [n for n in range(max(1, h // 2), 2 * h + 1) if d % n == 0 and (d // n) % 2 == 0]
        raise ValueError(f"[model] dim={d} (--hidden-size) is not divisible by n_heads={h} (--num-attention-heads): "
                         f"{d} / {h} = {d / h:.2f} is no head dim; choose heads dividing {d}"
                         + (f", e.g. {', '.join(map(str, fits[:4]))}" if fits else ""))
    if (d // h) % 2:
        raise ValueError(f"[model] head dim = dim / n_heads = {d} / {h} = {d // h} is odd: rotary embeddings rotate "
                         f"pairs of features, so it must be even; change --hidden-size or --num-attention-heads")
    if h % kv:
        raise ValueError(f"[model] n_kv_heads={kv} (--num-query-groups) does not divide n_heads={h}: each kv head "
                         f"serves a group of n_heads / n_kv_heads query heads; choose a divisor of {h}")


def optimizer_errors(t: TrainingConfig) -> list[str]:
    """AdamW's settings, one message a bad one (torch would raise on every rank after the spawn)."""
    errors = []
    for key, flag in (("beta1", "--adam-beta1"), ("beta2", "--adam-beta2")):
        v = getattr(t, key)
        if not 0.0 <= v < 1.0:
            errors.append(f"[training] {key}={v} ({flag}) must be in [0, 1): it is the decay of Adam's moment "
                          f"average (typical: beta1 0.9, beta2 0.95)")
    if not (t.eps > 0 and math.isfinite(t.eps)):
        errors.append(f"[training] eps={t.eps} (--adam-eps) must be a small positive number (typical 1e-8): "
                      f"it keeps Adam's update finite where the second moment is 0")
    if t.optimizer_state_dtype not in ("fp32", "bf16"):
        errors.append(f"[training] optimizer_state_dtype={t.optimizer_state_dtype!r} (--exp-avg-dtype / "
                      f"--exp-avg-sq-dtype): choose 'fp32' (torch's AdamW) or 'bf16' (the moments in bf16, "
                      f"stochastically rounded)")
    for key, flag in (("lr", "--lr"), ("weight_decay", "--weight-decay"), ("grad_clip", "--clip-grad")):
        v = getattr(t, key)
        if not (v >= 0 and math.isfinite(v)):
            errors.append(f"[training] {key}={v} ({flag}) must be a finite number >= 0")
    return errors


def global_batch(cfg: TrainConfig, dims: ParallelDims) -> int:
    t = cfg.training
    return t.global_batch_size or t.micro_batch_size * dims.dp


def check_layout(cfg: TrainConfig, dims: ParallelDims, device_type: str | None = None) -> None:
    """The library's own validation of the plan on the recipe's Llama, built on the meta
    device (no memory, no process group); ``device_type``: check the kernels against it."""
    import torch

    from ..models.llama import Llama
    from ..validation import check_kernels, resolve_plan, validate_layout

    with torch.device("meta"):
        model = Llama(cfg.model.args())
    plan = resolve_plan(model, cfg.parallel_plan(global_batch(cfg, dims)))
    if device_type is not None:
        check_kernels(plan, device_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        validate_layout(model, dims, plan)


def check_sequence_length(cfg: TrainConfig, dims: ParallelDims) -> None:
    """The training sequence length against cp's zigzag chunks and SP's shards."""
    from ..validation import check_sequence

    check_sequence(cfg.training.seq_len, dims, cfg.plan.sequence_parallel)


def check_data(cfg: TrainConfig, dims: ParallelDims) -> None:
    """The token file as the ranks will read it: exists, states its dtype, holds one step
    of distinct windows, ids below the vocabulary (``TokenFileDataset`` checks them); the
    document starts file (``documents.py``)."""
    if cfg.data.synthetic:
        return
    from .data import TokenFileDataset

    from .documents import build_document_masking

    t = cfg.training
    source = TokenFileDataset(cfg.data.path, dtype=cfg.data.dtype, seq_len=t.seq_len,
                              vocab_size=cfg.model.args().vocab_size, global_batch_size=global_batch(cfg, dims),
                              dp_rank=0, dp_size=dims.dp, seed=t.seed)
    build_document_masking(cfg.data, source)  # the document starts file, if any


def preflight_errors(cfg: TrainConfig, world_size: int, *, nproc_per_node: int | None = None,
                     device: bool = True, data: bool = True, layout: bool = True, paths: bool = True) -> list[str]:
    """Every check of the module docstring's table, each independent of the others' errors
    where it can be: one message a problem (empty: all clear).

    ``nproc_per_node``: ranks about to be launched on this host (for the device check);
    ``device``/``data``/``layout``/``paths``: include those checks (the dry run leaves the
    device, the data and the output paths out, and has its own parallelize for the layout).
    The output paths (``--save`` writable) come last: a probe file is made there only when
    everything else is right."""
    from .launch import resolve_device
    from .loop import check_output_paths, preflight

    errors: list[str] = []

    def attempt(check: Callable, *args):
        try:
            return check(*args)
        except ERRORS as e:
            errors.append(str(e))
            return None

    dims = attempt(lambda: preflight(cfg, world_size, check_paths=False))
    device_type = attempt(resolve_device, cfg.cluster.device, nproc_per_node) if device else None
    errors += optimizer_errors(cfg.training)
    if dims is not None:
        attempt(check_sequence_length, cfg, dims)
        if layout:
            attempt(check_layout, cfg, dims, device_type)
        if data:
            attempt(check_data, cfg, dims)
    if paths and not errors:
        attempt(check_output_paths, cfg)
    return errors


def check_recipe(cfg: TrainConfig, world_size: int, **kwargs) -> ParallelDims:
    """:func:`preflight_errors` as one ``ValueError`` (its messages, one a line); the degrees."""
    errors = preflight_errors(cfg, world_size, **kwargs)
    if errors:
        raise ValueError("\n".join(errors))
    return cfg.parallel.dims(world_size)
