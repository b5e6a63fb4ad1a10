"""Which kernel PyTorch's SDPA runs for the ring-attention benchmark's shape (bf16, causal,
32 heads, head dim 128) on this GPU and torch build: the names of the CUDA kernels of one
forward+backward, from torch.profiler. Writes $OUT/sdpa_backend.txt.

    python benchmarks/sdpa_backend.py
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    q, k, v = (torch.randn(1, 32, 8192, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    for _ in range(2):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if e.device_type.name == "CUDA"})
    text = (f"torch {torch.__version__}, {torch.cuda.get_device_name()}\n"
            f"flash={torch.backends.cuda.flash_sdp_enabled()} efficient={torch.backends.cuda.mem_efficient_sdp_enabled()} "
            f"cudnn={torch.backends.cuda.cudnn_sdp_enabled()}\n" + "\n".join(names) + "\n")
    print(text)
    with open(os.path.join(os.environ.get("OUT", "."), "sdpa_backend.txt"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
