"""Flash attention backward kernels (launched by ``flash_attention.py``; the papers, the math
and the masks are in ``flash_attention_kernels.py``'s docstring).

FlashAttention-2's backward: ``_bwd_preprocess`` computes ``delta = rowsum(dO * O) - dlse``;
``_attn_bwd_dkdv`` walks the query blocks of one key block (and the query heads of its GQA
group), ``_attn_bwd_dq`` the key blocks of one query block. No atomics: deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .flash_attention_documents import _doc_span, _row_ranges, _seen_by_block
from .flash_attention_hopper import _row_tiles
from .flash_attention_kernels import (_DKDV_CONFIGS, _DKDV_MEASURED, _DQ_CONFIGS, _DQ_MEASURED, _LOG2E,
                                      _key_block_bounds, _prune, _query_block)


@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA,
                    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                    H_Q, S_Q, HEAD_DIM: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) - dlse, fp32 (b, hq, s_q). The ``- dlse`` term is the gradient
    that flows through the returned lse (d lse_i / d s_ij = P_ij)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H_Q).to(tl.int64)
    off_h = (pid_bh % H_Q).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S_Q
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + pid_bh.to(tl.int64) * S_Q + offs_m, mask=row_ok, other=0.0)
    tl.store(DELTA + pid_bh.to(tl.int64) * S_Q + offs_m, delta, mask=row_ok)


@triton.jit
def _key_block(K, V, stride_kn, stride_vn, offs_n, col_ok, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``offs_n`` of one (batch, kv head)'s K and V (rows past S_K, ``~col_ok``, zero)."""
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _query_walk(start_n, S_Q, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """The query blocks a key block at ``start_n`` walks: [lo, diag_end) straddle the causal
    diagonal (masked), [mid, full_end) need no mask, [full_end, end) hold the query tail
    (masked). Returns (lo, mid, diag_end, full_end, end)."""
    if IS_CAUSAL:
        lo = start_n
        mid = start_n + BLOCK_N
    else:
        lo = 0
        mid = 0
    end = tl.cdiv(S_Q, BLOCK_M) * BLOCK_M
    full_end = tl.maximum(mid, (S_Q // BLOCK_M) * BLOCK_M)
    diag_end = tl.minimum(mid, end)
    return lo, mid, diag_end, full_end, end


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qm, stride_dom, offs_n, S_Q, qk_scale, lo, hi,
                col_lo, col_hi, KV_LO, KV_HI, n0, n1, q_desc, do_desc,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
                HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
                WARP_SPECIALIZE: tl.constexpr = False):
    """Accumulate dK, dV of one key block over query blocks [lo, hi) of one query head.
    HAS_DOCS: key j keeps rows [col_lo[j], col_hi[j]); only rows that see some key of
    [n0, n1) (their key ranges KV_LO/KV_HI) are loaded. TMA (never with HAS_DOCS): q and dO
    tiles come through the descriptors q_desc/do_desc (rows past S_Q read as zeros)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in tl.range(lo, hi, BLOCK_M, warp_specialize=WARP_SPECIALIZE):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = Q + offs_m[:, None] * stride_qm + offs_d[None, :]  # (BM, D)
        do_ptrs = DO + offs_m[:, None] * stride_dom + offs_d[None, :]  # (BM, D)
        if HAS_DOCS:
            row_ok = _seen_by_block(KV_LO, KV_HI, offs_m, hi, n0, n1, IS_CAUSAL, False)  # within S_Q
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a row that saw no key: P = 0, not NaN
            delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        elif MASK:
            row_ok = offs_m < S_Q
            if TMA:
                q = q_desc.load([start_m, 0])
                do = do_desc.load([start_m, 0])
            else:
                q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
                do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        elif TMA:
            q = q_desc.load([start_m, 0])
            do = do_desc.load([start_m, 0])
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        if UPCAST:
            q = q.to(tl.float32)
        do = do.to(q.dtype)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BN, BM)
        pT = tl.exp2(qkT * qk_scale - (lse * _LOG2E)[None, :])
        if HAS_DOCS:
            keep = (offs_m[None, :] >= col_lo[:, None]) & (offs_m[None, :] < col_hi[:, None])
            if IS_CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            pT = tl.where(keep, pT, 0.0)
        elif MASK:
            keep = row_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            pT = tl.where(keep, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)  # (BN, D)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BN, BM)
        dsT = pT * (dpT - delta[None, :])
        if HAS_DOCS:  # the key block is loaded whole: keys nobody here sees must not leak inf/NaN
            dsT = tl.where(keep, dsT, 0.0)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)  # (BN, D)
    return dk, dv


@triton.autotune(
    configs=_DKDV_CONFIGS,
    key=["S_Q", "S_K", "HEAD_DIM", "IS_CAUSAL", "HAS_DOCS", "TMA"],
    prune_configs_by={"early_config_prune": _prune("BLOCK_N", "BLOCK_M", _DKDV_MEASURED)},
)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KV_LO, KV_HI, Q_LO, Q_HI, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   H_Q, H_KV, GROUP, S_Q, S_K,
                   HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr = False):
    """One program: BLOCK_N keys of one (batch, kv head); loops over the GROUP query heads that
    share the kv head and over their query blocks, so GQA's dK/dV sum needs no atomics.
    HAS_DOCS: as ``_attn_fwd``'s KV_LO, KV_HI, Q_LO, Q_HI; only the queries the keys' ranges
    hold are visited. TMA: each query head's Q and dO tiles through device-side descriptors."""
    start_n = tl.program_id(1) * BLOCK_N  # causal: key block 0 has the most queries, runs first
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // H_KV).to(tl.int64)
    off_hk = (pid_bh % H_KV).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < S_K
    k, v = _key_block(K + off_b * stride_kb + off_hk * stride_kh, V + off_b * stride_vb + off_hk * stride_vh,
                      stride_kn, stride_vn, offs_n, col_ok, HEAD_DIM, UPCAST)
    qk_scale = sm_scale * _LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo, mid, diag_end, full_end, end = _query_walk(start_n, S_Q, BLOCK_M, BLOCK_N, IS_CAUSAL)
    col_lo = offs_n
    col_hi = offs_n
    q_lo = 0
    q_hi = 0
    if HAS_DOCS:  # one masked walk over the query blocks that the keys' ranges touch
        col_lo = tl.load(Q_LO + off_b * S_K + offs_n, mask=col_ok, other=0)  # padding keys: empty
        col_hi = tl.load(Q_HI + off_b * S_K + offs_n, mask=col_ok, other=0)
        q_lo, q_hi = _doc_span(Q_LO + off_b * S_K, Q_HI + off_b * S_K, start_n, S_K, BLOCK_N)
        if IS_CAUSAL:
            q_lo = tl.maximum(q_lo, start_n)
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        Qh = Q + off_b * stride_qb + off_h * stride_qh
        DOh = DO + off_b * stride_dob + off_h * stride_doh
        row0 = (off_b * H_Q + off_h) * S_Q
        q_desc = Qh
        do_desc = DOh
        if TMA:
            q_desc = _row_tiles(Qh, S_Q, stride_qm, BLOCK_M, HEAD_DIM)
            do_desc = _row_tiles(DOh, S_Q, stride_dom, BLOCK_M, HEAD_DIM)
        if HAS_DOCS:
            dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSE + row0, DELTA + row0, stride_qm, stride_dom,
                                 offs_n, S_Q, qk_scale, (q_lo // BLOCK_M) * BLOCK_M, q_hi, col_lo, col_hi,
                                 KV_LO + off_b * S_Q, KV_HI + off_b * S_Q, start_n, tl.minimum(start_n + BLOCK_N, S_K),
                                 q_desc, do_desc, BLOCK_M, HEAD_DIM, True, IS_CAUSAL, True, UPCAST, PRECISION, False)
        else:
            if IS_CAUSAL:
                dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSE + row0, DELTA + row0, stride_qm, stride_dom,
                                     offs_n, S_Q, qk_scale, lo, diag_end, col_lo, col_hi, KV_LO, KV_HI, 0, 0,
                                     q_desc, do_desc, BLOCK_M, HEAD_DIM, True, IS_CAUSAL, False, UPCAST, PRECISION, TMA)
            dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSE + row0, DELTA + row0, stride_qm, stride_dom,
                                 offs_n, S_Q, qk_scale, mid, full_end, col_lo, col_hi, KV_LO, KV_HI, 0, 0,
                                 q_desc, do_desc, BLOCK_M, HEAD_DIM, False, IS_CAUSAL, False, UPCAST, PRECISION, TMA,
                                 WARP_SPECIALIZE)
            dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSE + row0, DELTA + row0, stride_qm, stride_dom,
                                 offs_n, S_Q, qk_scale, full_end, end, col_lo, col_hi, KV_LO, KV_HI, 0, 0,
                                 q_desc, do_desc, BLOCK_M, HEAD_DIM, True, IS_CAUSAL, False, UPCAST, PRECISION, TMA)
    dk *= sm_scale
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, offs_m, S_K, qk_scale, lo, hi,
              row_lo, row_hi, Q_LO, Q_HI, m0, m1, k_desc, v_desc,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
              HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
              WARP_SPECIALIZE: tl.constexpr = False):
    """Accumulate dQ of one query block over key blocks [lo, hi). HAS_DOCS: as ``_fwd_inner``.
    TMA (never with HAS_DOCS): K and V tiles through k_desc/v_desc (rows past S_K are zeros)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K + offs_n[:, None] * stride_kn + offs_d[None, :]  # (BN, D)
        v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :]  # (BN, D)
        if HAS_DOCS:
            seen = _seen_by_block(Q_LO, Q_HI, offs_n, hi, m0, m1, IS_CAUSAL, True)  # (BN,), within S_K
            k = tl.load(k_ptrs, mask=seen[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=seen[:, None], other=0.0)
        elif TMA:
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
        elif MASK:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < S_K, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < S_K, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BM, BN)
        p = tl.exp2(qk * qk_scale - lse2[:, None])
        if HAS_DOCS:
            keep = (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < row_hi[:, None])
            if IS_CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        elif MASK:
            keep = offs_n[None, :] < S_K
            if IS_CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BM, BN)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # (BM, D)
    return dq


@triton.autotune(
    configs=_DQ_CONFIGS,
    key=["S_Q", "S_K", "HEAD_DIM", "IS_CAUSAL", "HAS_DOCS", "TMA", "ACCUMULATE"],
    prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N", _DQ_MEASURED)},
    restore_value=["DQ"],  # ACCUMULATE: each config tried must find the caller's sums
)
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KV_LO, KV_HI, Q_LO, Q_HI, sm_scale,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                 stride_dqb, stride_dqh, stride_dqm,
                 H_Q, GROUP, S_Q, S_K,
                 HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr = False,
                 ACCUMULATE: tl.constexpr = False):
    """One program: dQ of BLOCK_M query rows of one (batch, query head). HAS_DOCS: as
    ``_attn_fwd``'s KV_LO, KV_HI, Q_LO, Q_HI. TMA: K and V tiles through device-side descriptors.
    ACCUMULATE: add to DQ's values (its rows are this program's alone) instead of overwriting."""
    start_m = _query_block(IS_CAUSAL) * BLOCK_M
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // H_Q).to(tl.int64)
    off_h = (pid_bh % H_Q).to(tl.int64)
    off_hk = off_h // GROUP
    K += off_b * stride_kb + off_hk * stride_kh
    V += off_b * stride_vb + off_hk * stride_vh
    k_desc = K
    v_desc = V
    if TMA:
        k_desc = _row_tiles(K, S_K, stride_kn, BLOCK_N, HEAD_DIM)
        v_desc = _row_tiles(V, S_K, stride_vn, BLOCK_N, HEAD_DIM)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S_Q
    q_ok = row_ok
    row_lo = offs_m
    row_hi = offs_m
    if HAS_DOCS:  # a row that sees no key is never read: dq 0
        row_lo, row_hi, q_ok = _row_ranges(KV_LO + off_b * S_Q, KV_HI + off_b * S_Q, offs_m, row_ok, IS_CAUSAL)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=q_ok[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=q_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    do = do.to(q.dtype)
    row0 = pid_bh.to(tl.int64) * S_Q
    lse2 = tl.load(LSE + row0 + offs_m, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(DELTA + row0 + offs_m, mask=q_ok, other=0.0)
    qk_scale = sm_scale * _LOG2E

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full, hi = _key_block_bounds(S_K, start_m, BLOCK_M, BLOCK_N, IS_CAUSAL)
    if HAS_DOCS:  # one masked walk over the key blocks that the rows' ranges touch
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # a row that saw no key: P = 0, not NaN
        kv_lo, kv_hi = _doc_span(KV_LO + off_b * S_Q, KV_HI + off_b * S_Q, start_m, S_Q, BLOCK_M)
        if IS_CAUSAL:
            kv_hi = tl.minimum(kv_hi, start_m + BLOCK_M)
        dq = _dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, offs_m, S_K, qk_scale,
                       (kv_lo // BLOCK_N) * BLOCK_N, kv_hi, row_lo, row_hi, Q_LO + off_b * S_K, Q_HI + off_b * S_K,
                       start_m, tl.minimum(start_m + BLOCK_M, S_Q), k_desc, v_desc,
                       BLOCK_N, HEAD_DIM, True, IS_CAUSAL, True, UPCAST, PRECISION, False)
    else:
        dq = _dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, offs_m, S_K, qk_scale, 0, full,
                       offs_m, offs_m, Q_LO, Q_HI, 0, 0, k_desc, v_desc,
                       BLOCK_N, HEAD_DIM, False, IS_CAUSAL, False, UPCAST, PRECISION, TMA, WARP_SPECIALIZE)
        dq = _dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, offs_m, S_K, qk_scale, full, hi,
                       offs_m, offs_m, Q_LO, Q_HI, 0, 0, k_desc, v_desc,
                       BLOCK_N, HEAD_DIM, True, IS_CAUSAL, False, UPCAST, PRECISION, TMA)
    dq *= sm_scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
    if ACCUMULATE:
        dq = tl.load(dq_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32) + dq
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
