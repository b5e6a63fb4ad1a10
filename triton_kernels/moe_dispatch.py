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

Kernels. Routing and the permute copy (``moe_dispatch_route.py``): two launches (a
per-chunk histogram whose last program scans, then ranks + copy); no sort, no float
atomics: the result is deterministic and equal to the argsort reference bit for bit. The
row kernels (``moe_dispatch_rows.py``, pinned configs, no autotuner) work token-major on
(tokens, k slots, hidden) tiles: the combine (unpermute forward, and permute backward with
unit weights) gathers a token's k rows and sums them in fp32 in one program per output tile
(no atomics, so deterministic); the unpermute backward walks the hidden dim of a token block
once, writing ``dy`` rows and reducing ``dw`` in fp32. ``unpermute`` needs the inverse map
``pos`` (flat entry -> sorted row): from a row_map it costs one more launch (an inversion);
``permute(..., routing=True)`` returns ``pos`` and ``unpermute(..., pos=pos)`` skips it.

Launches per call (the MoE layer's path; no torch kernels besides ``torch.empty``
allocations, no host synchronisation when ``n_experts`` is given):

    permute forward      1 (T*k x E_pad <= 2^18) or 2      permute backward     1 (combine)
    unpermute forward    1 (+1 inversion from a row_map)   unpermute backward   1 (dy and dw)

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): one small config per kernel, with tiles
smaller than the test shapes so tails in tokens, hidden and slots are all exercised. There is
no ``tl.dot`` here, so the interpreter's bf16 dot problem does not apply; the tests still run
bf16 on the GPU only. Preconditions: ``0 <= expert_ids < n_experts``; checked eagerly for CPU
tensors, not on the GPU (the check would synchronize the stream).
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from .moe_dispatch_route import route_and_permute, route_counts
from .moe_dispatch_rows import combine, invert, unpermute_backward

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
        # the integer outputs get no gradient: without this autograd would fill 4 zero tensors
        # (4 launches) for them in every backward
        ctx.set_materialize_grads(False)
        return x_sorted, row_map, counts, offsets, pos

    @staticmethod
    @once_differentiable
    def backward(ctx, dx_sorted: torch.Tensor | None, *_):
        (pos,) = ctx.saved_tensors
        if dx_sorted is None:
            return None, None, None, None
        dx = combine(_unit_last(dx_sorted), pos, None, pos.numel() // ctx.k, ctx.k)  # (T, H)
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
        pos = pos.contiguous() if pos is not None else invert(row_map.contiguous())
        out = combine(y_sorted, pos, weights, t, k)  # (T, H)
        ctx.save_for_backward(y_sorted, pos, weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: torch.Tensor):
        y_sorted, pos, weights = ctx.saved_tensors
        need_dy, _, need_dw, _ = ctx.needs_input_grad
        dy, dw = unpermute_backward(y_sorted, pos, weights, _unit_last(dout), need_dy, need_dw)
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
        ``unpermute(..., pos=pos)``: the routing comes from the same launches as the copy.
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
