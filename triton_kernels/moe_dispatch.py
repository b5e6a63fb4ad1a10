"""MoE token dispatch for expert parallelism: routing histogram, permute, unpermute + combine.

Papers:

- GShard (Lepikhin et al., 2020, arXiv:2006.16668) and Switch Transformer (Fedus, Zoph,
  Shazeer, 2021, arXiv:2101.03961): a router picks k experts per token; each token is sent
  to its experts (all-to-all under expert parallelism) and the expert outputs are combined
  with the router weights.
- MegaBlocks (Gale, Narayanan, Young, Zaharia, 2022, arXiv:2211.15841): "dropless" MoE: no
  capacity factor; the token copies are *permuted* into expert-contiguous order so each
  expert is one dense block of rows (one grouped GEMM with per-expert offsets), and
  *unpermuted* afterwards. The histogram of tokens per expert gives the all-to-all split
  sizes and the grouped-GEMM offsets.
- DeepSeek-V3 (DeepSeek-AI, 2024, arXiv:2412.19437): fine-grained experts with top-8
  routing, the sizes the GPU test uses (8 of 64 experts, hidden 7168).

Math. ``expert_ids`` (T, k) is flattened to N = T*k entries ``i = t*k + j`` (token t, slot j).
The sorted order is a *stable counting sort* of the entries by expert: expert 0's entries
first, and within an expert by flat index, i.e. by token then slot (the same order as
``torch.argsort(expert_ids.flatten(), stable=True)``)::

    counts[e]   = #{i : ids[i] == e}                 offsets = [0, cumsum(counts)]  (E + 1)
    pos[i]      = offsets[ids[i]] + #{i' < i : ids[i'] == ids[i]}   (flat entry -> sorted row)
    row_map[r]  = i  with pos[i] == r                                (sorted row -> flat entry)
    permute:    x_sorted[pos[t*k + j]] = x[t]            grad: dx[t] = sum_j dxs[pos[t*k + j]]
    unpermute:  out[t] = sum_j w[t, j] * y[pos[t*k + j]]
                grad:   dy[pos[t*k + j]] = w[t, j] * dout[t]    dw[t, j] = <y[pos[t*k + j]], dout[t]>

Kernels. Routing and the permute copy are two launches (``moe_dispatch_route.py``: a
per-chunk histogram whose last program scans, then ranks + copy); no sort, no float
atomics: the result is deterministic and equal to the argsort reference bit for bit.
The row kernels here work token-major on (tokens, k slots, hidden) tiles: ``_combine_kernel``
(unpermute forward, and permute backward with unit weights) gathers a token's k rows and
sums them in fp32 in one program per output tile (no atomics, so deterministic);
``_unpermute_bwd_kernel`` walks the hidden dim of a token block once, writing ``dy`` rows and
reducing ``dw`` in fp32. ``unpermute`` needs the inverse map ``pos`` (flat entry -> sorted
row): from a row_map it costs one more launch (``_invert_kernel``); ``permute(...,
routing=True)`` returns ``pos`` and ``unpermute(..., pos=pos)`` skips it (the MoE layer's
path: permute forward 2 launches, unpermute forward 1, each backward 1).

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): one small config per kernel, with tiles
smaller than the test shapes so tails in tokens, hidden and slots are all exercised. There is
no ``tl.dot`` here, so the interpreter's bf16 dot problem does not apply; the tests still run
bf16 on the GPU only. Preconditions: ``0 <= expert_ids < n_experts``; checked eagerly for CPU
tensors, not on the GPU (the check would synchronize the stream).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .moe_dispatch_route import route_and_permute, route_counts

__all__ = [
    "moe_dispatch",
    "moe_dispatch_ref",
    "permute",
    "permute_ref",
    "routing_histogram",
    "routing_histogram_ref",
    "unpermute",
    "unpermute_ref",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_TILE = 16384  # elements of one (BLOCK_T, K_PAD, BLOCK_H) tile


# ----------------------------------------------------------------------------------------
# Routing: histogram and stable positions
# ----------------------------------------------------------------------------------------


@triton.jit
def _invert_kernel(ROW_MAP, POS, N, BLOCK_N: tl.constexpr):
    """POS[ROW_MAP[r]] = r: the inverse permutation (unpermute gets only row_map)."""
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    src = tl.load(ROW_MAP + offs, mask=ok, other=0)
    tl.store(POS + src, offs, mask=ok)


# ----------------------------------------------------------------------------------------
# Row kernels: permute, combine (unpermute forward / permute backward), unpermute backward
# ----------------------------------------------------------------------------------------


def _configs(blocks: list[tuple[int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_T": bt, "BLOCK_H": bh}, num_warps=w) for bt, bh, w in blocks]


# (BLOCK_T tokens, BLOCK_H hidden columns, num_warps). A program moves a (BLOCK_T, K_PAD,
# BLOCK_H) tile. Under the interpreter: one config, smaller than the test shapes (tails).
if _INTERPRET:
    _ROW_CONFIGS = _configs([(4, 32, 1)])
    _BWD_CONFIGS = _configs([(4, 32, 1)])
else:
    _ROW_CONFIGS = _configs([(1, 1024, 4), (2, 512, 4), (4, 256, 4), (1, 2048, 8), (4, 512, 8), (8, 128, 4)])
    _BWD_CONFIGS = _configs([(1, 512, 4), (2, 256, 4), (1, 1024, 8), (4, 256, 8), (8, 64, 4)])


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Pruning filter: drop tiles over _MAX_TILE elements once the slot dim is padded to K_PAD,
    and hidden blocks far wider than H (they would mostly be masked)."""
    args = {**named_args, **kwargs}
    k_pad, h = args["K_PAD"], args["H"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_T"] * k_pad * c.kwargs["BLOCK_H"] <= _MAX_TILE
            and c.kwargs["BLOCK_H"] <= max(64, triton.next_power_of_2(h))]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_H"])]


@triton.autotune(configs=_ROW_CONFIGS, key=["H", "K_PAD", "HAS_W"],
                 prune_configs_by={"early_config_prune": _prune})
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


@triton.autotune(configs=_BWD_CONFIGS, key=["H", "K_PAD", "COMPUTE_DY", "COMPUTE_DW"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _unpermute_bwd_kernel(Y, POS, W, DOUT, DY, DW, T, H: tl.constexpr, K, stride_yr, stride_dot,
                          COMPUTE_DY: tl.constexpr, COMPUTE_DW: tl.constexpr,
                          K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program per token block walks the hidden dim once:
    DY[POS[t*K + j]] = W[t, j] * DOUT[t]  and  DW[t, j] = <Y[POS[t*K + j]], DOUT[t]> (fp32).
    DY (T*K, H) and W, DW (T, K) contiguous. H is a constexpr, the loop's bound: Triton 3.6's
    interpreter cannot take a runtime scalar as a ``range`` bound under NumPy 2 ("only
    0-dimensional arrays can be converted to Python scalars"); H is fixed per model (and
    already an autotuning key), so this costs no extra compiles."""
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
# Launchers and checks
# ----------------------------------------------------------------------------------------


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The row kernels take any row stride but need the hidden dim contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"{name}: tensors are on {t.device}; the Triton kernels need CUDA "
                         "(or TRITON_INTERPRET=1 set before triton is imported, for CPU tensors)")


def _check_ids(name: str, expert_ids: torch.Tensor, n_experts: int | None) -> tuple[torch.Tensor, int]:
    """Validate expert_ids (T, k) integer; return it flattened (int32/int64) and n_experts."""
    if expert_ids.dim() != 2:
        raise ValueError(f"{name}: expert_ids must be 2-D (tokens, k), got shape {tuple(expert_ids.shape)}")
    if expert_ids.dtype.is_floating_point or expert_ids.dtype.is_complex or expert_ids.dtype == torch.bool:
        raise TypeError(f"{name}: expert_ids.dtype is {expert_ids.dtype}; use an integer dtype")
    if expert_ids.shape[1] < 1:
        raise ValueError(f"{name}: expert_ids has k = 0 slots per token")
    _check_device(name, expert_ids)
    flat = expert_ids.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int32)
    flat = flat.contiguous()
    if n_experts is None:  # synchronizes: callers that know E should pass it
        n_experts = int(flat.max().item()) + 1 if flat.numel() else 1
    n_experts = int(n_experts)
    if n_experts < 1:
        raise ValueError(f"{name}: n_experts must be >= 1, got {n_experts}")
    if flat.device.type == "cpu" and flat.numel():  # free on CPU; on the GPU it would synchronize
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"{name}: expert_ids must lie in [0, {n_experts}); found values in [{lo}, {hi}]")
    return flat, n_experts


def _invert(row_map: torch.Tensor) -> torch.Tensor:
    n = row_map.numel()
    pos = torch.empty(n, device=row_map.device, dtype=torch.int32)  # (N,)
    if n:
        block = 128 if _INTERPRET else 1024
        _invert_kernel[(triton.cdiv(n, block),)](row_map, pos, n, BLOCK_N=block)
    return pos


def _k_pad(k: int) -> int:
    return triton.next_power_of_2(k)


def _row_grid(t: int, h: int):
    return lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(h, meta["BLOCK_H"]))


def _combine(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None, t: int, k: int) -> torch.Tensor:
    h = y.shape[1]
    out = torch.empty((t, h), device=y.device, dtype=y.dtype)  # (T, H)
    if out.numel():
        _combine_kernel[_row_grid(t, h)](y, pos, weights if weights is not None else pos, out, t, h, k,
                                         y.stride(0), out.stride(0), HAS_W=weights is not None, K_PAD=_k_pad(k))
    return out


def _check_rows(name: str, t: torch.Tensor, what: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name}: {what} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: {what}.dtype is {t.dtype}; supported: float16, bfloat16, float32")
    _check_device(name, t)


# ----------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------


class _Permute(torch.autograd.Function):
    """x_sorted, row_map, counts, offsets, pos = dispatch(x, expert_ids); differentiable in x only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int | None,
                counts_dtype: torch.dtype = torch.int32):
        _check_rows("permute", x, "x")
        flat, n_experts = _check_ids("permute", expert_ids, n_experts)
        t, k = expert_ids.shape
        if x.shape[0] != t:
            raise ValueError(f"permute: x has {x.shape[0]} tokens but expert_ids has {t} (x is (T, H), "
                             "expert_ids (T, k))")
        if x.device != expert_ids.device:
            raise ValueError(f"permute: x on {x.device}, expert_ids on {expert_ids.device}")
        x_sorted, row_map, pos, counts, offsets = route_and_permute(_unit_last(x), flat, t, k, n_experts,
                                                                     counts_dtype)  # (T*k, H), ...
        ctx.save_for_backward(pos)
        ctx.k = k
        ctx.mark_non_differentiable(row_map, counts, offsets, pos)
        return x_sorted, row_map, counts, offsets, pos

    @staticmethod
    @once_differentiable
    def backward(ctx, dx_sorted: torch.Tensor | None, *_):
        (pos,) = ctx.saved_tensors
        dx = _combine(_unit_last(dx_sorted), pos, None, pos.numel() // ctx.k, ctx.k)  # (T, H)
        return dx, None, None, None


class _Unpermute(torch.autograd.Function):
    """out = combine(y_sorted, pos or the inverse of row_map, weights); differentiable in
    y_sorted and weights."""

    @staticmethod
    def forward(ctx, y_sorted: torch.Tensor, row_map: torch.Tensor | None, weights: torch.Tensor,
                pos: torch.Tensor | None) -> torch.Tensor:
        _check_rows("unpermute", y_sorted, "y_sorted")
        _check_rows("unpermute", weights, "weights")
        t, k = weights.shape
        index = pos if pos is not None else row_map
        if index is None:
            raise ValueError("unpermute: give row_map (from permute) or pos (permute(..., routing=True))")
        if y_sorted.shape[0] != t * k or index.shape != (t * k,):
            raise ValueError(f"unpermute: weights {tuple(weights.shape)} means T*k = {t * k} rows, but y_sorted "
                             f"is {tuple(y_sorted.shape)} and the row map {tuple(index.shape)}")
        if index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"unpermute: the row map's dtype is {index.dtype}; use the int64 map from permute")
        if not (y_sorted.device == index.device == weights.device):
            raise ValueError(f"unpermute: y_sorted, the row map, weights on different devices: "
                             f"{y_sorted.device}, {index.device}, {weights.device}")
        y_sorted, weights = _unit_last(y_sorted), weights.contiguous()
        pos = pos.contiguous() if pos is not None else _invert(row_map.contiguous())
        out = _combine(y_sorted, pos, weights, t, k)  # (T, H)
        ctx.save_for_backward(y_sorted, pos, weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: torch.Tensor):
        y_sorted, pos, weights = ctx.saved_tensors
        need_dy, _, need_dw, _ = ctx.needs_input_grad
        t, k = weights.shape
        h = y_sorted.shape[1]
        dout = _unit_last(dout)
        dy = torch.empty(y_sorted.shape, device=y_sorted.device, dtype=y_sorted.dtype) if need_dy else None
        dw = torch.empty(weights.shape, device=weights.device, dtype=weights.dtype) if need_dw else None
        if (need_dy or need_dw) and t:
            _unpermute_bwd_kernel[lambda meta: (triton.cdiv(t, meta["BLOCK_T"]),)](
                y_sorted, pos, weights, dout, dy if need_dy else y_sorted, dw if need_dw else weights,
                t, h, k, y_sorted.stride(0), dout.stride(0),
                COMPUTE_DY=need_dy, COMPUTE_DW=need_dw, K_PAD=_k_pad(k))
        return dy, None, dw, None


# ----------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------


def routing_histogram(expert_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens per expert and their exclusive prefix sum.

    Args:
        expert_ids: (T, k) integer, each in [0, n_experts).
        n_experts: E.

    Returns:
        counts (E,) int32 (``counts.sum() == T*k``), offsets (E+1,) int32 with
        ``offsets[e]:offsets[e+1]`` the rows of expert e in :func:`permute`'s output.
    """
    flat, n_experts = _check_ids("routing_histogram", expert_ids, n_experts)
    t, k = expert_ids.shape
    return route_counts(flat, t, k, n_experts)


def moe_dispatch(x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`permute` and :func:`routing_histogram` from one routing pass.

    Returns x_sorted (T*k, H), row_map (T*k,) int64, counts (E,) int32, offsets (E+1,) int32:
    everything a grouped GEMM (``offsets``) and the EP all-to-all (``counts``) need.
    Differentiable in x.
    """
    return _Permute.apply(x, expert_ids, n_experts)[:4]


def permute(x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int | None = None, *, routing: bool = False
            ) -> tuple[torch.Tensor, ...]:
    """Copy each token once per chosen expert, into expert-contiguous order.

    Args:
        x: (T, H) fp16/bf16/fp32, hidden dim contiguous.
        expert_ids: (T, k) integer in [0, n_experts) (repeats within a token are allowed).
        n_experts: E; if None it is ``expert_ids.max() + 1``, which synchronizes with the GPU.

    Returns:
        x_sorted (T*k, H) in x's dtype: rows of expert 0, then expert 1, ...; within an expert
        by token, then slot (stable). row_map (T*k,) int64: ``x_sorted[r] = x[row_map[r] // k]``,
        ``row_map[r] = token*k + slot``. Backward: ``dx[t] = sum_j dx_sorted[pos(t, j)]``,
        summed in fp32 per token (deterministic).
        With ``routing=True`` also counts (E,) int64 (as ``torch.bincount``) and pos (T*k,) int32,
        the inverse of row_map (``pos[t*k + j]`` is the sorted row of token t's slot j), for
        ``unpermute(..., pos=pos)``: the whole routing still in the same two launches.
    """
    x_sorted, row_map, counts, _, pos = _Permute.apply(x, expert_ids, n_experts,
                                                       torch.int64 if routing else torch.int32)
    return (x_sorted, row_map, counts, pos) if routing else (x_sorted, row_map)


def unpermute(y_sorted: torch.Tensor, row_map: torch.Tensor | None, weights: torch.Tensor, *,
              pos: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted combine of the expert outputs back into token order.

    ``out[t] = sum_j weights[t, j] * y_sorted[pos(t, j)]`` with ``row_map[pos(t, j)] = t*k + j``,
    accumulated in fp32, returned in y_sorted's dtype. Differentiable in y_sorted
    (``dy[pos(t, j)] = weights[t, j] * dout[t]``) and weights
    (``dweights[t, j] = <y_sorted[pos(t, j)], dout[t]>``, fp32 dot). Weights may be another float
    dtype than y_sorted (e.g. fp32 router probabilities); their gradient has their dtype.

    Args:
        y_sorted: (T*k, H) fp16/bf16/fp32. row_map: (T*k,) from :func:`permute`. weights: (T, k).
        pos: optional (T*k,), the inverse of row_map from ``permute(..., routing=True)``: saves
            the inversion's launch (row_map may then be None).
    """
    return _Unpermute.apply(y_sorted, row_map, weights, pos)


# ----------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------


def routing_histogram_ref(expert_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch :func:`routing_histogram` (bincount and cumsum)."""
    counts = torch.bincount(expert_ids.reshape(-1).long(), minlength=n_experts).to(torch.int32)  # (E,)
    offsets = torch.zeros(n_experts + 1, dtype=torch.int32, device=expert_ids.device)  # (E+1,)
    offsets[1:] = torch.cumsum(counts, 0)
    return counts, offsets


def permute_ref(x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch :func:`permute`: a stable argsort of the flat expert ids and a gather
    (autograd's index backward accumulates in x's dtype)."""
    k = expert_ids.shape[1]
    row_map = torch.argsort(expert_ids.reshape(-1), stable=True)  # (T*k,) int64
    return x[row_map // k], row_map  # (T*k, H)


def unpermute_ref(y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor, *,
                  upcast: bool = True) -> torch.Tensor:
    """Plain-PyTorch :func:`unpermute`. Computes in fp32 (fp64 stays fp64) and returns
    y_sorted's dtype; ``upcast=False`` computes in the input dtype (the tests' measure of
    PyTorch's own rounding)."""
    t, k = weights.shape
    dtype = torch.promote_types(y_sorted.dtype, torch.float32) if upcast else y_sorted.dtype
    pos = torch.argsort(row_map)  # (T*k,) inverse permutation: flat entry -> sorted row
    y_tok = y_sorted[pos].to(dtype).view(t, k, -1)  # (T, k, H)
    out = (weights.to(dtype)[:, :, None] * y_tok).sum(1)  # (T, H)
    return out.to(y_sorted.dtype)


def moe_dispatch_ref(x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch :func:`moe_dispatch`."""
    if n_experts is None:
        n_experts = int(expert_ids.max()) + 1 if expert_ids.numel() else 1
    x_sorted, row_map = permute_ref(x, expert_ids)
    counts, offsets = routing_histogram_ref(expert_ids, n_experts)
    return x_sorted, row_map, counts, offsets
