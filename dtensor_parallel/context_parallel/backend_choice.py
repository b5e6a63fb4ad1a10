"""``kernels["attention"] = "auto"``: the ring's block kernel picked from a table measured
per device, said in one log line.

Each entry is a measurement (``benchmarks/attention_backends.py`` writes the numbers),
keyed by the device: "cpu", or a substring of ``torch.cuda.get_device_name()``. Two picks
per device: for plain causal attention, and for packed documents, where what matters is
skipping the key blocks of other documents (the Triton kernel walks only the key range of a
block's documents; the fused SDPA ops take the documents as a dense additive mask and skip
nothing). A device without an entry gets Triton on CUDA (it merges ring steps in fp32
inside the kernel) and the PyTorch reference elsewhere, and the log line says it was not
measured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionBackends:
    plain: str  # causal attention without documents
    documents: str  # packed documents
    why: str  # what was measured, where, when (or why there was no choice to make)


MEASURED: dict[str, AttentionBackends] = {
    # 2-core x86 CI machine, torch 2.13 CPU, 2026-11-30, benchmarks/results/attention_backends_cpu.json:
    # one causal block forward + backward, 1024 tokens, 8 query heads on 2 kv heads, head dim
    # 64, fp32: torch 291 ms, sdpa 40 ms (7.3x); documents of 128 tokens: 374 vs 66 ms (5.7x)
    "cpu": AttentionBackends("sdpa", "sdpa", "measured: block forward+backward on the CPU: sdpa 7.3x torch, "
                                             "5.7x with documents"),
    # 2 x H200, torch 2.11, triton 3.6, 2026-11-30, benchmarks/results/attention_backends_cuda.json:
    # one causal block forward + backward, 8192 tokens, 32 query heads on 8 kv heads, head dim
    # 128, bf16: triton 5.08 ms, sdpa (cuDNN) 4.41 ms (1.15x); documents of 1024 tokens: triton
    # 1.71 ms, sdpa 33.5 ms (a dense mask through the efficient op: triton 19.5x).
    # 1 x H200, 2026-12-01, benchmarks/results/ring_steps_ab.json, after the sdpa blocks took
    # cuDNN's grouped k/v and the accumulators moved into the backends: each CP2 rank's whole ring
    # compute (both steps, forward + backward), triton 9.70-9.71 ms against sdpa 7.80-7.92 at 8K
    # tokens a rank (1.23x), 143.2-143.7 against 113.5-113.8 at 32K (1.26x)
    "H200": AttentionBackends("sdpa", "triton", "measured on H200: a CP2 rank's ring compute, sdpa (cuDNN) "
                                                "1.23-1.26x triton; with documents triton 19.5x sdpa per block"),
}


def device_key(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    return device_type


def lookup(name: str) -> AttentionBackends | None:
    return next((m for key, m in MEASURED.items() if key == name or (key != "cpu" and key in name)), None)


def choose_attention_backend(device_type: str, *, say: bool = True) -> AttentionBackends:
    """The measured picks for this device (see the module docstring), logged once."""
    name = device_key(device_type)
    pick = lookup(name)
    if pick is None:
        default = "triton" if device_type == "cuda" else "torch"
        pick = AttentionBackends(default, default, "no measurement for this device (run "
                                                   "benchmarks/attention_backends.py)")
    if say:
        log.warning("kernels['attention']='auto' on %s: %r for causal attention, %r for packed documents (%s)",
                    name, pick.plain, pick.documents, pick.why)
    return pick
