"""The kernel tolerance rule shared by the kernel tests (DESIGN.md, STYLE.md 7):
err(kernel, high-precision reference) <= 2 * err(PyTorch in the same dtype, reference) + atol,
errors as relative Frobenius norms. (tests/conftest.py turns on Triton's interpreter when
there is no GPU.)"""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_against_torch(name: str, kernel: torch.Tensor, torch_same: torch.Tensor, ref: torch.Tensor,
                        atol: float) -> None:
    assert kernel.shape == ref.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(ref.shape)}"
    err_k, err_t = rel_err(kernel, ref), rel_err(torch_same, ref)
    print(f"{name}: err(kernel)={err_k:.2e} err(torch)={err_t:.2e}")
    assert err_k <= 2 * err_t + atol, f"{name}: err(kernel)={err_k:.3e} > 2*err(torch)={err_t:.3e} + {atol:.0e}"
