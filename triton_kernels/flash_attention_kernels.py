"""Flash attention forward kernel with log-sum-exp, the shared tiles and the math (launched
by ``flash_attention.py``; the backward kernels are in ``flash_attention_bwd_kernels.py``).

Papers:

- FlashAttention (Dao, Fu, Ermon, Rudra, Ré, 2022, arXiv:2205.14135): tile Q, K, V so the
  (s_q, s_k) score matrix never reaches HBM; an online softmax keeps a running row max ``m``
  and row sum ``l`` per query; the backward recomputes P from Q, K and the saved row
  log-sum-exp ``lse = m + log(l)``.
- FlashAttention-2 (Dao, 2023, arXiv:2307.08691): the loop order used here. Forward: one
  program per (query block, batch·head) walking the key blocks, rescaling the accumulator by
  ``exp(m_old - m_new)`` and dividing by ``l`` once at the end. Backward: a preprocess kernel
  computes ``delta = rowsum(dO * O)``; a dK/dV kernel walks the query blocks of a key block;
  a dQ kernel walks the key blocks of a query block. No atomics, so it is deterministic.
- Ring Attention (Liu, Zaharia, Abbeel, 2023, arXiv:2310.01889): each context-parallel rank
  keeps its query block and sees the K/V blocks of every rank in turn; the partial results
  merge by log-sum-exp. :func:`flash_attention_ring_step` does that merge *inside* the
  kernel, in fp32, into an fp32 accumulator: no bf16 rounding between ring steps (the known
  weakness of rings built on SDPA, which return a bf16 output per step).

Math, per query row i (natural log; the kernels work in base 2 with ``log2(e)`` folded into
the scale so they can use ``exp2``)::

    s_ij = scale * q_i . k_j           P_ij = exp(s_ij - lse_i)     lse_i = log sum_j exp(s_ij)
    o_i  = sum_j P_ij v_j
    dv_j = sum_i P_ij do_i             dp_ij = do_i . v_j           delta_i = do_i . o_i - dlse_i
    ds_ij = P_ij (dp_ij - delta_i)     dq_i = scale sum_j ds_ij k_j  dk_j = scale sum_i ds_ij q_i

Layout: q (b, hq, s_q, d), k/v (b, hkv, s_k, d), any strides with a unit last stride (so a
(b, s, h, d) tensor seen through ``.transpose(1, 2)`` needs no copy). Grouped-query
attention: query head h reads kv head ``h // (hq // hkv)``; K/V are never repeated, and
dK/dV sum over the query heads of a group inside the dK/dV program (no atomics).

Causal mask: top-left aligned, query i sees keys j <= i, i.e. ``tril(ones(s_q, s_k))`` —
the same convention as ``F.scaled_dot_product_attention(is_causal=True)``. With s_q == s_k
this is the usual mask. With s_q > s_k, rows i >= s_k see every key; with s_q < s_k, keys
j > s_q - 1 are seen by nobody (their dK/dV are zero). Without documents key 0 is always
visible, so no row is ever fully masked. Ring attention only passes equal-length blocks:
the diagonal block is causal, blocks of earlier ranks are fully visible (``causal=False``)
and later ones are skipped by the caller.

Document mask (packed sequences, ``HAS_DOCS``; ``flash_attention_documents.py``): query i
sees key j only if ``doc_q[i] == doc_k[j]`` (and, with global positions, ``pos_k[j] <=
pos_q[i]``), on top of the causal mask. The kernels take no ids, only each query's key
range ``[kv_lo[i], kv_hi[i])`` and each key's query range ``[q_lo[j], q_hi[j])``: each query
block walks only the keys its rows' ranges span (each key block of the dK/dV kernel only
the queries), loads only the keys (queries) that some row (key) of the block sees, and
keeps the elements inside the row's range. A row may see no key: then ``l_i = 0`` and its block lse is
``m + log2(0) = -inf`` with output 0, which the ring merge below leaves unchanged
(``w_blk = 0``; if both are -inf, ``m`` is clamped to 0 and the result is 0, -inf). The
backward reads such an lse as +inf, so ``P = exp2(s - lse) = 0`` instead of NaN. Without
``HAS_DOCS`` the branches compile away: the kernels are the plain ones.

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): one small config per kernel, and bf16
loads are upcast to fp32 before ``tl.dot`` (``UPCAST``), since the interpreter's bf16 dot
is wrong. fp32 inputs use ``input_precision="ieee"`` on the GPU (no TF32), so fp32 stays
an fp32-accurate path.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .flash_attention_documents import _doc_span, _row_ranges, _seen_by_block

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = tl.constexpr(1.4426950408889634)  # 1 / ln(2)
_LN2 = tl.constexpr(0.6931471805599453)
_M_INIT = tl.constexpr(-1.0e30)  # finite "-inf" for the running max: exp2(-inf - -inf) would be NaN
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------


@triton.jit
def _query_block(IS_CAUSAL: tl.constexpr):
    """The query block of this program. Grids are (batch * heads, blocks): programs launch
    heads-fastest, so each wave holds the same blocks of many heads. Under a causal mask
    block i costs i + 1 key blocks; launching the costliest first (longest-processing-time
    order) leaves the cheap ones to fill the last wave instead of a long tail."""
    if IS_CAUSAL:
        return tl.num_programs(1) - 1 - tl.program_id(1)
    return tl.program_id(1)


@triton.jit
def _key_block_bounds(S_K, start_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(full, hi) for the query block at start_m: key blocks [0, full) need no mask, [full, hi)
    hold the key tail and the causal diagonal."""
    full = (S_K // BLOCK_N) * BLOCK_N
    hi = tl.cdiv(S_K, BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        full = tl.minimum(full, start_m)
        hi = tl.minimum(hi, start_m + BLOCK_M)
    return full, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, S_K, qk_scale, lo, hi,
               row_lo, row_hi, Q_LO, Q_HI, m0, m1,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
               HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi). MASK: apply the key bound (and causal) mask.
    HAS_DOCS (``flash_attention_documents.py``): row i keeps keys [row_lo[i], row_hi[i]);
    only keys that some row of [m0, m1) sees (their query ranges Q_LO/Q_HI) are loaded."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K + offs_n[:, None] * stride_kn + offs_d[None, :]  # (BN, D)
        v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :]  # (BN, D)
        if HAS_DOCS:
            seen = _seen_by_block(Q_LO, Q_HI, offs_n, hi, m0, m1, IS_CAUSAL, True)  # (BN,), within S_K
            k = tl.load(k_ptrs, mask=seen[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=seen[:, None], other=0.0)
        elif MASK:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < S_K, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < S_K, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BM, BN), unscaled
        if HAS_DOCS or MASK:
            qk = qk * qk_scale  # log2 units
        if HAS_DOCS:
            keep = (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < row_hi[:, None])
            if IS_CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        elif MASK:
            keep = offs_n[None, :] < S_K
            if IS_CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        if HAS_DOCS or MASK:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp2(qk - m_new[:, None])
        else:  # max(qk) * scale == max(qk * scale) (scale > 0); the exp2 argument is one FMA
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


def _configs(blocks: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in blocks]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). The interpreter gets one config: BLOCK_M != BLOCK_N
# so the CPU tests cover a diagonal spanning several blocks.
if _INTERPRET:
    _FWD_CONFIGS = _configs([(64, 32, 4, 1)])
    _DKDV_CONFIGS = _configs([(32, 64, 4, 1)])
    _DQ_CONFIGS = _configs([(64, 32, 4, 1)])
else:  # kept small: every config is compiled once per (IS_CAUSAL, HAS_ACC, HEAD_DIM, dtype)
    _FWD_CONFIGS = _configs([(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 32, 4, 2)])
    _DKDV_CONFIGS = _configs([(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 2)])
    _DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2)])
# Measured on an H200 (triton 3.6, bf16, 32 query / 8 kv heads, causal, 8K and 32K tokens;
# benchmarks/results/flash_attention_kernel.json and flash_backward_d*.json, the whole backward
# timed with one kernel's config pinned, two runs): per kernel and head dim the fastest of seven
# or within 2% of it at both lengths. dQ at d64 was (64, 64, 4, 2) after the first run (fastest
# at 8K there, 5% behind at 32K); (128, 64, 8, 3) won both lengths in the second. Hopper GPUs
# run these alone.
_DKDV_MEASURED = {128: (64, 128, 8, 3), 64: (32, 128, 4, 3)}
_DQ_MEASURED = {128: (128, 64, 8, 3), 64: (128, 64, 8, 3)}
# fp32 inputs use IEEE dots, which lower to FMA loops, not tensor cores: big tiles unroll into
# huge kernels that compile for minutes. fp32 gets only these small tiles (and 16-bit never).
_FP32_TILES = {(64, 32, 4, 2), (32, 64, 4, 2)}


def _measured_config(table: dict[int, tuple[int, int, int, int]], args: dict) -> triton.Config | None:
    """The measured config of ``table`` (head dim -> (BLOCK_M, BLOCK_N, warps, stages)) for this
    call, or None: only for 16-bit inputs without documents on a Hopper GPU, where the table
    was measured. A measured config is what every rank runs: no per-process autotuning, which
    times each candidate once on the first call and can pick differently on each rank."""
    if _INTERPRET or args.get("PRECISION") == "ieee" or args.get("HAS_DOCS") or args["HEAD_DIM"] not in table:
        return None
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return None
    bm, bn, w, st = table[args["HEAD_DIM"]]
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)


def _prune(outer: str, inner: str, measured: dict[int, tuple[int, int, int, int]] | None = None):
    """Pruning filter: the OUTER block (one per program) must be a multiple of the INNER block
    (the loop step) so the causal diagonal starts on an inner-block boundary; drop blocks far
    larger than the sequence; fp32 (IEEE) and 16-bit inputs use disjoint tile sets; sequences
    of at most 128 get the smallest tile only (each config compiles once per shape
    specialization, seconds each on a GPU, while the kernel runs for microseconds). Where
    ``measured`` has this call's head dim (see :func:`_measured_config`), that config alone."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        s_outer = args["S_Q"] if outer == "BLOCK_M" else args["S_K"]
        s_inner = args["S_K"] if outer == "BLOCK_M" else args["S_Q"]
        fp32 = args.get("PRECISION") == "ieee"
        candidates = [c for c in configs if fp32 == ((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                      c.num_stages) in _FP32_TILES)] or list(configs)
        if max(s_outer, s_inner) <= 128:  # microseconds of work: tuning buys nothing, compiling costs
            return [min(candidates, key=lambda c: c.kwargs[outer] * c.kwargs[inner])]
        chosen = _measured_config(measured or {}, args)
        if chosen is not None and chosen.kwargs[outer] % chosen.kwargs[inner] == 0:
            return [chosen]
        kept = []
        for c in candidates:
            bo, bi = c.kwargs[outer], c.kwargs[inner]
            if bo % bi:
                continue
            if bo > max(32, triton.next_power_of_2(s_outer)) or bi > max(32, triton.next_power_of_2(s_inner)):
                continue
            kept.append(c)
        return kept or [min(candidates, key=lambda c: c.kwargs[outer] * c.kwargs[inner])]

    return prune


@triton.autotune(
    configs=_FWD_CONFIGS,
    key=["S_Q", "S_K", "HEAD_DIM", "IS_CAUSAL", "HAS_ACC", "HAS_DOCS"],
    prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N")},
    restore_value=["O", "LSE"],  # HAS_ACC updates O/LSE in place: benchmarking must not compound
)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KV_LO, KV_HI, Q_LO, Q_HI, sm_scale,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
              H_Q, GROUP, S_Q, S_K,
              HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_ACC: tl.constexpr,
              HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, query head). Writes O (b, hq, s_q, d) and
    LSE (b, hq, s_q) (natural log), both through their strides (the ring passes views).
    HAS_ACC: O (fp32) and LSE hold the running result of earlier ring steps and the
    block's result is merged into them by log-sum-exp. HAS_DOCS: the key ranges KV_LO/KV_HI
    (b, s_q) and query ranges Q_LO/Q_HI (b, s_k), int32, contiguous; only the keys the rows'
    ranges hold are visited (unused, and compiled out, without HAS_DOCS)."""
    start_m = _query_block(IS_CAUSAL) * BLOCK_M
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // H_Q).to(tl.int64)
    off_h = (pid_bh % H_Q).to(tl.int64)
    off_hk = off_h // GROUP  # GQA: kv head of this query head
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_hk * stride_kh
    V += off_b * stride_vb + off_hk * stride_vh
    O += off_b * stride_ob + off_h * stride_oh
    LSE += off_b * stride_lb + off_h * stride_lh  # (b, hq, s_q), unit stride along s_q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S_Q
    q_ok = row_ok
    row_lo = offs_m
    row_hi = offs_m
    if HAS_DOCS:  # a row that sees no key is never read: out 0, lse -inf
        row_lo, row_hi, q_ok = _row_ranges(KV_LO + off_b * S_Q, KV_HI + off_b * S_Q, offs_m, row_ok, IS_CAUSAL)
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = sm_scale * _LOG2E

    m_i = tl.full([BLOCK_M], _M_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full, hi = _key_block_bounds(S_K, start_m, BLOCK_M, BLOCK_N, IS_CAUSAL)
    if HAS_DOCS:  # one masked walk over the key blocks that the rows' ranges touch
        kv_lo, kv_hi = _doc_span(KV_LO + off_b * S_Q, KV_HI + off_b * S_Q, start_m, S_Q, BLOCK_M)
        if IS_CAUSAL:
            kv_hi = tl.minimum(kv_hi, start_m + BLOCK_M)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, S_K, qk_scale,
                                   (kv_lo // BLOCK_N) * BLOCK_N, kv_hi, row_lo, row_hi,
                                   Q_LO + off_b * S_K, Q_HI + off_b * S_K, start_m, tl.minimum(start_m + BLOCK_M, S_Q),
                                   BLOCK_N, HEAD_DIM, True, IS_CAUSAL, True, UPCAST, PRECISION)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, S_K, qk_scale,
                                   0, full, offs_m, offs_m, Q_LO, Q_HI, 0, 0,
                                   BLOCK_N, HEAD_DIM, False, IS_CAUSAL, False, UPCAST, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, S_K, qk_scale,
                                   full, hi, offs_m, offs_m, Q_LO, Q_HI, 0, 0,
                                   BLOCK_N, HEAD_DIM, True, IS_CAUSAL, False, UPCAST, PRECISION)

    _store_result(O, LSE, acc, l_i, m_i, offs_m, row_ok, stride_om, HEAD_DIM, HAS_ACC)


@triton.jit
def _store_result(O, LSE, acc, l_i, m_i, offs_m, row_ok, stride_om, HEAD_DIM: tl.constexpr, HAS_ACC: tl.constexpr):
    """The forward epilogue (shared with the Hopper kernel): normalize by the row sum and
    store O and the natural-log LSE, or with HAS_ACC merge into the running (O, LSE) of
    earlier ring steps by log-sum-exp, in fp32. O and LSE point at this (batch, head)."""
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse2 = m_i + tl.log2(l_i)  # base-2 lse; -inf for a row that saw no key
    o_ptrs = O + offs_m[:, None] * stride_om + tl.arange(0, HEAD_DIM)[None, :]
    if HAS_ACC:
        # new_lse = logaddexp(lse_prev, lse_blk); out = out_prev e^(lse_prev-new) + out_blk e^(lse_blk-new)
        o_prev = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        lse_prev2 = tl.load(LSE + offs_m, mask=row_ok, other=float("-inf")) * _LOG2E
        m = tl.maximum(lse_prev2, lse2)
        m = tl.where(m == float("-inf"), 0.0, m)
        w_prev = tl.exp2(lse_prev2 - m)
        w_blk = tl.exp2(lse2 - m)
        w_sum = w_prev + w_blk
        lse2 = m + tl.log2(w_sum)
        w_sum = tl.where(w_sum == 0.0, 1.0, w_sum)
        out = o_prev * (w_prev / w_sum)[:, None] + out * (w_blk / w_sum)[:, None]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + offs_m, lse2 * _LN2, mask=row_ok)
