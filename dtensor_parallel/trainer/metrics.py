"""Training metrics: FLOPs per token, MFU, peak memory, a JSONL writer and a progress line.

Only rank 0 writes and prints (every rank holds the same global loss and grad norm).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

import torch

from ..models.llama import ModelArgs

# Dense bf16 tensor-core peak of one H100 SXM (NVIDIA's datasheet: 989.4 TFLOP/s without
# sparsity). The convention of Megatron-Core's and the PaLM paper's MFU numbers.
H100_BF16_PEAK_FLOPS: float = 989e12


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of a Llama, PaLM/Megatron convention.

    ``6 N + 12 n_layers dim seq_len``:

    - ``6 N``: each weight does one multiply-add (2 FLOPs) per token in the forward and
      two in the backward (input and weight gradients). ``N`` counts the non-embedding
      parameters plus the output head (the embedding is a lookup, the head a matmul).
    - ``12 L d s``: attention scores ``Q K^T`` and the weighted sum ``A V``, each
      ``2 s d`` FLOPs per token per layer in the forward, times 3 for forward + backward.
      Not halved for causal masking (PaLM, Appendix B; Megatron's MFU formula), so
      numbers compare with published MFU.
    """
    n = args.num_params() - args.vocab_size * args.dim  # drop the input embedding only
    return 6.0 * n + 12.0 * args.n_layers * args.dim * seq_len


def mfu(tokens_per_s_per_gpu: float, flops_per_tok: float, peak: float = H100_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs utilization: achieved model FLOP/s of one GPU over its peak."""
    return tokens_per_s_per_gpu * flops_per_tok / peak


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file, surviving a crash mid-write.

    A process killed while appending leaves a torn last line (no newline, half an object):
    it is dropped with a warning, as is any other line that is not a JSON object. Raising
    instead made every resume of such a run fail."""
    records, bad = [], []
    lines = Path(path).read_text(errors="replace").split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad.append(i)
    if bad:
        torn = bad == [len(lines)]  # only the last line, which has no newline after it
        what = f"a torn last line ({len(lines)})" if torn else f"unreadable lines {bad[:5]}"
        warnings.warn(f"{path}: dropped {what}: written when the run was interrupted")
    return records


class MetricsWriter:
    """One JSON object per line; a no-op on ranks other than 0."""

    def __init__(self, path: str | Path | None, enabled: bool = True, resume_step: int = 0):
        """``resume_step`` > 0 (a resumed run): keep the records of steps up to it and append
        after them; records of later steps (written after the checkpoint, before a crash)
        are dropped, since the resumed run writes those steps again, and so is a torn last
        line (:func:`read_metrics`). The kept records are written to a temporary file that
        replaces the old one in one rename, so a crash here loses nothing."""
        self._file: TextIO | None = None
        if enabled and path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume_step > 0 and path.exists():
                kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self._file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record. Only rank 0 writes, so a failure here must not raise: the
        other ranks would wait for it in the next collective (a hang). A full disk or a
        vanished directory is warned about once and stops the log; training goes on (and a
        checkpoint save on the same disk then fails on every rank, naming it)."""
        if self._file is not None:
            try:
                self._file.write(json.dumps(record) + "\n")  # one write of a whole line
                self._file.flush()
            except OSError as e:
                what = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or type(e).__name__)
                warnings.warn(f"metrics are no longer written ({what} at {self._file.name}): training goes on")
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_progress(rec: dict[str, Any], total_steps: int, on_gpu: bool) -> str:
    """``step 10/150 | loss 6.1234 | lr 1.00e-03 | gnorm 1.23 | tok/s 12,345 (3,086/gpu) | ...``"""
    width = len(str(total_steps))
    if rec.get("skipped"):  # a non-finite step (trainer/nonfinite.py): no loss to show
        return f"step {rec['step']:>{width}}/{total_steps} | {rec['skipped']}"
    per = "gpu" if on_gpu else "rank"
    num = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731 - None: not finite
    parts = [f"step {rec['step']:>{width}}/{total_steps}",
             f"loss {num(rec['loss'], '.4f')}",
             f"lr {rec['lr']:.2e}",
             f"gnorm {num(rec['grad_norm'], '.3f')}",
             f"tok/s {rec['tokens_per_s']:,.0f} ({rec['tokens_per_s_per_gpu']:,.0f}/{per})"]
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    if rec.get("moe_aux_loss") is not None:
        parts.append(f"aux {rec['moe_aux_loss']:.4f} load {rec['moe_min_load']:.2f}-{rec['moe_max_load']:.2f}")
    if rec.get("bubble_s") is not None:
        parts.append(f"bubble {1000 * rec['bubble_s']:.0f} ms ({100 * rec['bubble_frac']:.0f}%)")
    parts.append(f"mem {rec['peak_mem_gib']:.2f} GiB{'' if on_gpu else ' rss'}")
    parts.append(f"{1000 * rec['step_time_s']:.0f} ms")
    return " | ".join(parts)


class ProgressPrinter:
    """Prints every ``interval`` steps, the first and last, and every skipped one, on rank 0."""

    def __init__(self, total_steps: int, interval: int, *, enabled: bool, on_gpu: bool,
                 stream: TextIO | None = None):
        self.total, self.interval, self.enabled, self.on_gpu = total_steps, interval, enabled, on_gpu
        self.stream = stream

    def __call__(self, rec: dict[str, Any]) -> None:
        step = rec["step"]
        if self.enabled and (step == 1 or step % self.interval == 0 or step == self.total or rec.get("skipped")):
            print(format_progress(rec, self.total, self.on_gpu), file=self.stream or sys.stdout, flush=True)
