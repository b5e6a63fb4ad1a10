"""AdamW's update in one pass over each parameter, with the moments stored in bf16 or fp32.

One program updates ``BLOCK`` elements: it loads the parameter, its gradient and both
moments, does the update in fp32 and stores all three back; nothing else is read or
allocated. Per element, with ``decay = 1 - lr * weight_decay``, ``step_size = lr / (1 -
beta1^t)`` and ``sqrt_bc2 = sqrt(1 - beta2^t)`` (torch's AdamW, in its order)::

    m = m + (1 - beta1) * (g - m)                  # m.lerp_(g, 1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g
    p = p * decay - step_size * m / (sqrt(v) / sqrt_bc2 + eps)

The update uses the fresh fp32 ``m`` and ``v``; only their stored copies are rounded. With
bf16 moments the rounding is stochastic: ``beta2 * v`` moves ``v`` by less than half a bf16
unit when ``beta2 > 0.996``, so rounding to nearest would freeze ``v`` (and small first
moments likewise); rounded up with probability equal to the dropped fraction, each stored
moment is exact in expectation. The random bits are a hash of the value's own bf16 part
(its upper 16 bits) and a per-step key, never of its position: the same value rounds the
same way on every rank and in every layout, so replicated shards stay equal and a sharded
run matches one device (``dtensor_parallel/adamw.py`` has the same hash in torch ops).

Stochastic rounding, on the fp32 bit pattern ``b``: add a uniform 16-bit ``r`` and keep the
upper 16 bits. The low half ``b & 0xFFFF`` carries into the kept half with probability
``(b & 0xFFFF) / 2^16``, the exact fraction between the two neighbouring bf16 values (the
sign is a separate bit, so this rounds the magnitude, for either sign). NaN is kept as it is.

The hash is ``lowbias32`` (C. Wellons, "Prospecting for hash functions", 2018): two
multiply-xorshift rounds, a full avalanche on 32-bit integers.

Sqrt and division are the IEEE-rounded ones (``sqrt_rn``, ``div_rn``) so that fp32 moments
match torch's update to the last bits where the order allows (the interpreter test checks
both dtypes against the torch path)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK = 128 if _INTERPRET else 2048
_WARPS = 8
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_DTYPES = (torch.float32, torch.bfloat16)


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (wrapping multiplies)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _round_bf16(x, key):
    """fp32 -> bf16, stochastically; the random bits hash the value's upper half and ``key``."""
    bits = x.to(tl.uint32, bitcast=True)
    noise = _mix32((bits >> 16) ^ key) & 0xFFFF
    kept = (bits + noise) & 0xFFFF0000
    rounded = kept.to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded).to(tl.bfloat16)


@triton.jit(do_not_specialize=["key_m", "key_v"])
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, decay, step_size, one_minus_beta1, beta2, one_minus_beta2,
                  sqrt_bc2, eps, key_m, key_v, BF16_STATE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
    p = p * decay - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    if BF16_STATE:
        tl.store(m_ptr + offs, _round_bf16(m, key_m.to(tl.uint32)), mask=mask)
        tl.store(v_ptr + offs, _round_bf16(v, key_v.to(tl.uint32)), mask=mask)
    else:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)


def supports(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot update these tensors (None: it can)."""
    if p.device.type != "cuda" and not _INTERPRET:
        return f"the parameter is on {p.device} (the kernel needs CUDA, or TRITON_INTERPRET=1 for CPU tensors)"
    if p.dtype not in _PARAM_DTYPES or g.dtype != p.dtype:
        return f"parameter {p.dtype} with gradient {g.dtype} (the kernel takes fp32/bf16/fp16 and equal dtypes)"
    if m.dtype not in _STATE_DTYPES or v.dtype != m.dtype:
        return f"moments {m.dtype}/{v.dtype} (the kernel takes fp32 or bf16, both the same)"
    shapes = {tuple(t.shape) for t in (p, g, m, v)}
    if len(shapes) != 1:
        return f"shapes differ: {sorted(shapes)}"
    if not all(t.is_contiguous() for t in (p, g, m, v)):
        return "a tensor is not contiguous"
    return None


def adamw_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float, beta1: float,
                beta2: float, eps: float, weight_decay: float, step: int, key_m: int, key_v: int) -> None:
    """One AdamW step of ``p`` in place (``m``, ``v`` too); ``step`` is 1 on the first update.
    ``key_m``/``key_v``: the rounding keys of this step (< 2**31), used with bf16 moments."""
    why = supports(p, g, m, v)
    if why is not None:
        raise ValueError(f"adamw_step_: {why}")
    n = p.numel()
    if n == 0:
        return
    bc1 = 1.0 - beta1 ** step
    sqrt_bc2 = (1.0 - beta2 ** step) ** 0.5
    grid = (triton.cdiv(n, _BLOCK),)
    _adamw_kernel[grid](p, g, m, v, n, 1.0 - lr * weight_decay, lr / bc1, 1.0 - beta1, beta2, 1.0 - beta2,
                        sqrt_bc2, eps, key_m, key_v, BF16_STATE=m.dtype == torch.bfloat16, BLOCK=_BLOCK,
                        num_warps=_WARPS)
