"""Flash attention backward in one pass: dK, dV and dQ from one walk (launched by
``flash_attention.py``; the math and masks are in ``flash_attention_kernels.py``'s docstring).

The split backward (``flash_attention_bwd_kernels.py``) runs two kernels that each rebuild the
probabilities: dK/dV walks the query blocks of a key block (S = K Q^T, dV += P^T dO,
dP^T = V dO^T, dK += dS^T Q: four matmuls), dQ walks the key blocks of a query block
(S, dP and dQ += dS K: three more). Seven matmuls where the gradient needs five. Here the
dK/dV walk also forms each block's dQ share, dS K, and adds it into an fp32 dQ buffer with
atomics (FlashAttention-2's backward; FlashAttention-3 does the same with bulk TMA reductions):
five matmuls, at the price of an fp32 (b, hq, s_q, d) buffer and atomic traffic.

Float addition is not associative, so the order in which key blocks' shares land makes dQ
vary in its last bits from run to run. ``flash_attention.py`` therefore runs this kernel only
where the caller has not asked for determinism (``torch.use_deterministic_algorithms``), the
split kernels otherwise and for document masks.

Measured slower than the split kernels, so off by default (``DTP_FLASH_BWD=fused`` runs it):
on an H200 (triton 3.6, b1 hq32 hkv8 causal bf16, 2026-11-30,
benchmarks/results/flash_backward_d*.json), the whole backward at d128 took 4.31 ms at 8K
tokens with the best of seven tile configs against the split kernels' 3.39-3.63 (cuDNN 2.87),
and 58.9 ms against 49.7-50.0 at 32K; at d64 2.51 against 2.03 and 35.6 against 29.8. Two
fewer matmuls do not pay for what the one pass costs in Triton: dK, dV and the dQ share live
in registers together (2 x BLOCK_N x d + BLOCK_M x d fp32), which forces smaller or
spilling tiles, and every step adds BLOCK_M x d fp32 atomics. The kernel stays as the
measured alternative: the benchmark times it in every run (``ours_bwd_fused*``), so a Triton
whose register allocation or warp specialization changes the balance shows it.

``TMA``: Q and dO tiles through device-side descriptors (as the split kernels). ``TMA_REDUCE``:
the dQ share is added with one bulk tensor reduction per tile (``desc.atomic_add``) instead of
one atomic per element. The interpreter has no bulk reduction, so that path is checked on a GPU
against the per-element one (tests/test_gpu.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .flash_attention_bwd_kernels import _key_block, _query_walk
from .flash_attention_hopper import _row_tiles
from .flash_attention_kernels import _INTERPRET, _LOG2E, _configs, _prune

# (BLOCK_M, BLOCK_N, num_warps, num_stages): BLOCK_N keys per program, BLOCK_M query rows a
# step. dK and dV stay in registers (2 x BLOCK_N x d fp32), so the tiles are those of dK/dV.
if _INTERPRET:
    _FUSED_CONFIGS = _configs([(32, 64, 4, 1)])
else:
    _FUSED_CONFIGS = _configs([(64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2)])
# head dim -> the config Hopper GPUs run (see _measured_config): of eight on an H200, (64, 128, 8, 3)
# was fastest or within 5% of it at 8K and 32K tokens for both head dims
_FUSED_MEASURED = {128: (64, 128, 8, 3), 64: (64, 128, 8, 3)}


@triton.jit
def _fused_inner(dk, dv, k, v, Q, DO, DQ, LSE, DELTA, stride_qm, stride_dom, stride_dqm, offs_n, S_Q,
                 qk_scale, lo, hi, q_desc, do_desc, dq_desc,
                 BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, TMA_REDUCE: tl.constexpr):
    """dK, dV of one key block over query blocks [lo, hi) of one query head; each block's
    dQ share (unscaled: the caller's conversion multiplies by the softmax scale) is added
    into DQ (fp32). MASK: the causal diagonal or the query tail (rows past S_Q read as zeros
    and are never added)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < S_Q
        if TMA:
            q = q_desc.load([start_m, 0])
            do = do_desc.load([start_m, 0])
        elif MASK:
            q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        else:
            q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :])
            do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :])
        if MASK:
            lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        else:
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        if UPCAST:
            q = q.to(tl.float32)
        do = do.to(q.dtype)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BN, BM)
        pT = tl.exp2(qkT * qk_scale - (lse * _LOG2E)[None, :])
        if MASK:
            keep = row_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            pT = tl.where(keep, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)  # (BN, D)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BN, BM)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = tl.dot(dsT, q, dk, input_precision=PRECISION)  # (BN, D)
        dq = tl.dot(tl.trans(dsT), k, input_precision=PRECISION)  # (BM, D), this key block's share
        if TMA_REDUCE:
            dq_desc.atomic_add([start_m, 0], dq)  # rows past S_Q are dropped by the unit
        elif MASK:
            tl.atomic_add(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :], dq, mask=row_ok[:, None],
                          sem="relaxed")
        else:
            tl.atomic_add(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :], dq, sem="relaxed")
    return dk, dv


@triton.autotune(
    configs=_FUSED_CONFIGS,
    key=["S_Q", "S_K", "HEAD_DIM", "IS_CAUSAL", "TMA", "TMA_REDUCE"],
    prune_configs_by={"early_config_prune": _prune("BLOCK_N", "BLOCK_M", _FUSED_MEASURED)},
    reset_to_zero=["DQ"],  # benchmarking a config adds into DQ: each candidate starts from zeros
)
@triton.jit
def _attn_bwd_fused(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, sm_scale,
                    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                    stride_dqb, stride_dqh, stride_dqm,
                    H_Q, H_KV, GROUP, S_Q, S_K,
                    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr, TMA: tl.constexpr, TMA_REDUCE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, kv head), over the GROUP query heads sharing
    it (GQA's dK/dV sum stays in registers) and their query blocks. DQ: fp32, zeroed by the
    caller, (b, hq, s_q, d) with unit last stride."""
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
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        Qh = Q + off_b * stride_qb + off_h * stride_qh
        DOh = DO + off_b * stride_dob + off_h * stride_doh
        DQh = DQ + off_b * stride_dqb + off_h * stride_dqh
        row0 = (off_b * H_Q + off_h) * S_Q
        q_desc = Qh
        do_desc = DOh
        dq_desc = DQh
        if TMA:
            q_desc = _row_tiles(Qh, S_Q, stride_qm, BLOCK_M, HEAD_DIM)
            do_desc = _row_tiles(DOh, S_Q, stride_dom, BLOCK_M, HEAD_DIM)
        if TMA_REDUCE:
            dq_desc = _row_tiles(DQh, S_Q, stride_dqm, BLOCK_M, HEAD_DIM)
        if IS_CAUSAL:
            dk, dv = _fused_inner(dk, dv, k, v, Qh, DOh, DQh, LSE + row0, DELTA + row0, stride_qm, stride_dom,
                                  stride_dqm, offs_n, S_Q, qk_scale, lo, diag_end, q_desc, do_desc, dq_desc,
                                  BLOCK_M, HEAD_DIM, True, IS_CAUSAL, UPCAST, PRECISION, TMA, TMA_REDUCE)
        dk, dv = _fused_inner(dk, dv, k, v, Qh, DOh, DQh, LSE + row0, DELTA + row0, stride_qm, stride_dom,
                              stride_dqm, offs_n, S_Q, qk_scale, mid, full_end, q_desc, do_desc, dq_desc,
                              BLOCK_M, HEAD_DIM, False, IS_CAUSAL, UPCAST, PRECISION, TMA, TMA_REDUCE)
        dk, dv = _fused_inner(dk, dv, k, v, Qh, DOh, DQh, LSE + row0, DELTA + row0, stride_qm, stride_dom,
                              stride_dqm, offs_n, S_Q, qk_scale, full_end, end, q_desc, do_desc, dq_desc,
                              BLOCK_M, HEAD_DIM, True, IS_CAUSAL, UPCAST, PRECISION, TMA, TMA_REDUCE)
    dk *= sm_scale
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
