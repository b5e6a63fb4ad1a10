"""Training metrics: FLOPs per token, MFU, peak memory, a JSONL writer and a progress line.

Only rank 0 writes and prints (every rank holds the same global loss and grad norm).
"""

from __future__ import annotations

import json
import resource
import sys
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


class MetricsWriter:
    """One JSON object per line; a no-op on ranks other than 0."""

    def __init__(self, path: str | Path | None, enabled: bool = True, resume_step: int = 0):
        """``resume_step`` > 0 (a resumed run): keep the records of steps up to it and append
        after them; records of later steps (written after the checkpoint, before a crash)
        are dropped, since the resumed run writes those steps again."""
        self._file: TextIO | None = None
        if enabled and path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume_step > 0 and path.exists():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self._file = open(path, "w")
            for line in kept:
                self._file.write(line + "\n")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

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
    per = "gpu" if on_gpu else "rank"
    parts = [f"step {rec['step']:>{width}}/{total_steps}",
             f"loss {rec['loss']:.4f}",
             f"lr {rec['lr']:.2e}",
             f"gnorm {rec['grad_norm']:.3f}",
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
    """Prints every ``interval`` steps, and the first and last, on rank 0."""

    def __init__(self, total_steps: int, interval: int, *, enabled: bool, on_gpu: bool,
                 stream: TextIO | None = None):
        self.total, self.interval, self.enabled, self.on_gpu = total_steps, interval, enabled, on_gpu
        self.stream = stream

    def __call__(self, rec: dict[str, Any]) -> None:
        step = rec["step"]
        if self.enabled and (step == 1 or step % self.interval == 0 or step == self.total):
            print(format_progress(rec, self.total, self.on_gpu), file=self.stream or sys.stdout, flush=True)
