"""MoE row kernels: the weighted combine (unpermute forward, permute backward), the
unpermute backward, and the inversion of a row map. The math is in ``moe_dispatch.py``'s
docstring; these work token-major on (tokens, k slots, hidden) tiles:

- ``_combine_kernel``: ``OUT[t] = sum_j W[t, j] * Y[POS[t*k + j]]`` (W = 1 for permute's
  backward), a token's k rows gathered and summed in fp32 in one program per output tile (no
  atomics, so deterministic);
- ``_unpermute_bwd_kernel``: walks the hidden dim of a token block once, writing ``dy`` rows
  and reducing ``dw`` in fp32;
- ``_invert_kernel``: ``pos`` from a ``row_map`` (only for callers that kept no ``pos``).

Configs are pinned, not autotuned: the autotuner's per-call key (a string per tensor
argument's dtype, a dict lookup) is host time on every launch, and at H4096 top-2 the host
is the bottleneck (issue 22 item 3). The tiles are those the autotuner picked on H100 and
H200 at H4096 top-2 and H7168 top-8 (``benchmarks/results/moe_dispatch*.json``, key
``autotuned``): one token a program, 1024 hidden columns a program for the combine and 512
a step for the backward, 4 warps (the picks differed only between equivalent tiles, e.g.
(2 tokens, 512) on H200 against (1, 1024) on H100). Small H gets more tokens a program.
Under the interpreter: tiles smaller than the test shapes, so tails are exercised.

Host cost per call: one ``torch.empty`` per output and one ``kernel[grid]`` launch with a
grid tuple and constexprs from a per-shape cache (no lambda grid, no autotuner).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["combine", "invert", "unpermute_backward", "row_config"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_TILE = 16384  # elements of one (BLOCK_T, K_PAD, BLOCK_H) tile


@triton.jit
def _invert_kernel(ROW_MAP, POS, N, BLOCK_N: tl.constexpr):
    """POS[ROW_MAP[r]] = r: the inverse permutation (unpermute gets only row_map)."""
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    src = tl.load(ROW_MAP + offs, mask=ok, other=0)
    tl.store(POS + src, offs, mask=ok)


@triton.jit
def _combine_kernel(Y, POS, W, OUT, T, H, K, stride_yr, stride_ot,
                    HAS_W: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """OUT[t] = sum_j W[t, j] * Y[POS[t*K + j]] (W = 1 without HAS_W), in fp32. One program per
    (token block, hidden block) reads its tokens' k rows: no atomics. W (T, K) contiguous."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, K_PAD)
    t_ok = offs_t < T
    h_ok = offs_h < H
    tk_ok = t_ok[:, None] & (offs_k[None, :] < K)  # (BT, KP)
    flat = offs_t[:, None] * K + offs_k[None, :]  # (BT, KP) = token * k + slot
    pos = tl.load(POS + flat, mask=tk_ok, other=0).to(tl.int64)
    y = tl.load(Y + pos[:, :, None] * stride_yr + offs_h[None, None, :],
                mask=tk_ok[:, :, None] & h_ok[None, None, :], other=0.0).to(tl.float32)  # (BT, KP, BH)
    if HAS_W:
        w = tl.load(W + flat, mask=tk_ok, other=0.0).to(tl.float32)  # (BT, KP)
        y = y * w[:, :, None]
    out = tl.sum(y, axis=1)  # (BT, BH)
    tl.store(OUT + offs_t[:, None].to(tl.int64) * stride_ot + offs_h[None, :], out.to(OUT.dtype.element_ty),
             mask=t_ok[:, None] & h_ok[None, :])


@triton.jit
def _unpermute_bwd_kernel(Y, POS, W, DOUT, DY, DW, T, H: tl.constexpr, K, stride_yr, stride_dot,
                          COMPUTE_DY: tl.constexpr, COMPUTE_DW: tl.constexpr,
                          K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program per token block walks the hidden dim once:
    DY[POS[t*K + j]] = W[t, j] * DOUT[t]  and  DW[t, j] = <Y[POS[t*K + j]], DOUT[t]> (fp32).
    DY (T*K, H) and W, DW (T, K) contiguous. H is a constexpr, the loop's bound: Triton 3.6's
    interpreter cannot take a runtime scalar as a ``range`` bound under NumPy 2 ("only
    0-dimensional arrays can be converted to Python scalars"); H is fixed per model, so this
    costs no extra compiles."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, K_PAD)
    t_ok = offs_t < T
    tk_ok = t_ok[:, None] & (offs_k[None, :] < K)  # (BT, KP)
    flat = offs_t[:, None] * K + offs_k[None, :]
    pos = tl.load(POS + flat, mask=tk_ok, other=0).to(tl.int64)  # (BT, KP)
    w = tl.load(W + flat, mask=tk_ok, other=0.0).to(tl.float32)  # (BT, KP)
    dw = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        g = tl.load(DOUT + offs_t[:, None].to(tl.int64) * stride_dot + offs_h[None, :],
                    mask=t_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)  # (BT, BH)
        m3 = tk_ok[:, :, None] & h_ok[None, None, :]  # (BT, KP, BH)
        if COMPUTE_DY:
            dy = w[:, :, None] * g[:, None, :]
            tl.store(DY + pos[:, :, None] * H + offs_h[None, None, :], dy.to(DY.dtype.element_ty), mask=m3)
        if COMPUTE_DW:
            y = tl.load(Y + pos[:, :, None] * stride_yr + offs_h[None, None, :], mask=m3,
                        other=0.0).to(tl.float32)
            dw += tl.sum(y * g[:, None, :], axis=2)
    if COMPUTE_DW:
        tl.store(DW + flat, dw.to(DW.dtype.element_ty), mask=tk_ok)


# ----------------------------------------------------------------------------------------
# Pinned configs and launchers
# ----------------------------------------------------------------------------------------

_CONFIGS: dict[tuple, tuple[int, int, int]] = {}


def row_config(kind: str, h: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, num_warps) of ``kind`` "combine" or "bwd" at hidden size h, top-k:
    a (BLOCK_T, K_PAD, BLOCK_H) tile of at most _MAX_TILE elements (module docstring)."""
    key = (kind, h, k)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        k_pad = triton.next_power_of_2(k)
        if _INTERPRET:
            cfg = (4, 32, 1)
        else:
            widest = 1024 if kind == "combine" else 512
            block_h = max(16, min(widest, triton.next_power_of_2(h), _MAX_TILE // k_pad))
            block_t = max(1, min(16, widest // block_h, _MAX_TILE // (k_pad * block_h)))
            cfg = (block_t, block_h, 4)
        _CONFIGS[key] = cfg
    return cfg


def invert(row_map: torch.Tensor) -> torch.Tensor:
    """pos (T*k,) int32 with pos[row_map[r]] = r: one launch."""
    n = row_map.numel()
    pos = torch.empty(n, device=row_map.device, dtype=torch.int32)  # (N,)
    if n:
        block = 128 if _INTERPRET else 1024
        _invert_kernel[(triton.cdiv(n, block),)](row_map, pos, n, BLOCK_N=block)
    return pos


def combine(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None, t: int, k: int) -> torch.Tensor:
    """(T, H) = sum_j weights[t, j] * y[pos[t*k + j]] in fp32 (weights None: unit), y's dtype.
    y (T*k, H) with a unit last stride, pos (T*k,), weights (T, k) contiguous: one launch."""
    h = y.shape[1]
    out = torch.empty((t, h), device=y.device, dtype=y.dtype)  # (T, H)
    if t and h:
        bt, bh, warps = row_config("combine", h, k)
        _combine_kernel[(triton.cdiv(t, bt), triton.cdiv(h, bh))](
            y, pos, weights if weights is not None else pos, out, t, h, k, y.stride(0), out.stride(0),
            HAS_W=weights is not None, K_PAD=triton.next_power_of_2(k), BLOCK_T=bt, BLOCK_H=bh, num_warps=warps)
    return out


def unpermute_backward(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, dout: torch.Tensor,
                       need_dy: bool, need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dy (T*k, H) = weights[t, j] * dout[t] at row pos[t*k + j]; dw (T, k) = <y[pos], dout> in
    fp32: one launch for both. y, dout with a unit last stride; pos, weights contiguous."""
    t, k = weights.shape
    h = y.shape[1]
    dy = torch.empty(y.shape, device=y.device, dtype=y.dtype) if need_dy else None
    dw = torch.empty(weights.shape, device=weights.device, dtype=weights.dtype) if need_dw else None
    if (need_dy or need_dw) and t:
        bt, bh, warps = row_config("bwd", h, k)
        _unpermute_bwd_kernel[(triton.cdiv(t, bt),)](
            y, pos, weights, dout, dy if need_dy else y, dw if need_dw else weights, t, h, k, y.stride(0),
            dout.stride(0), COMPUTE_DY=need_dy, COMPUTE_DW=need_dw, K_PAD=triton.next_power_of_2(k), BLOCK_T=bt,
            BLOCK_H=bh, num_warps=warps)
    return dy, dw
