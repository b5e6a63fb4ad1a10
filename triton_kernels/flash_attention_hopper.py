"""Flash attention forward for Hopper (sm90): Q, K and V tiles through TMA descriptors.

The same algorithm, masks and epilogue as ``_attn_fwd`` in ``flash_attention_kernels.py``
(FlashAttention-2 loop order, base-2 online softmax, causal diagonal and key tail in a
second masked loop, ring merge in fp32 with ``HAS_ACC``), for the common case only: 16-bit
inputs, head dim 128, no document mask, on a GPU with the tensor memory accelerator. What
changes is how tiles reach shared memory: a descriptor per (batch, head) is built on the device
(``tl.make_tensor_descriptor``, any row stride, so the (b, s, h, d) layout seen through a
transpose needs no copy) and each K/V tile is one bulk asynchronous copy, which the
compiler pipelines ``num_stages`` deep instead of issuing per-thread loads. Out-of-range
rows of a tile read as zeros (the key tail is still masked to -inf in the scores).

Device-side descriptors need a little global scratch per program, which Triton asks its
allocator for at launch: :func:`ensure_allocator` installs one on the current stream's
device when none is set.

Dispatch (``flash_attention.py``): :func:`hopper_eligible` says whether a forward call may
run here; everything else (fp32, documents, positions, pre-Hopper GPUs, the interpreter)
stays on the pointer-based kernel. The backward kernels (``flash_attention_bwd_kernels.py``)
have the same TMA loads behind their ``TMA`` flag, off by default until measured
(``_TMA_BACKWARD`` in ``flash_attention.py``; the interpreter tests run them).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .flash_attention_kernels import (_INTERPRET, _M_INIT, _configs, _key_block_bounds, _prune, _query_block,
                                      _store_result)

# (BLOCK_M, BLOCK_N, num_warps, num_stages): one config, measured, so no rank tunes its own
# (ranks agree by construction, and a first call pays no benchmarking). H200, triton 3.6,
# b1 hq32 hkv8 d128 causal bf16 (benchmarks/results/flash_attention_kernel.json): (128, 64, 4, 2)
# was the fastest of nine at 8K and 32K tokens in each of two runs (478-517 and 528 TFLOP/s);
# (128, 64, 4, 3) 405-454, (128, 128, 8, 3) 429-476. At d64 no TMA config beat the pointer
# kernel (402-414 against 404-444), so the TMA forward takes head dim 128 only.
_HOPPER_FWD_CONFIGS = _configs([(128, 64, 4, 2)])
_PINNED_FWD = {**_HOPPER_FWD_CONFIGS[0].kwargs, "num_warps": _HOPPER_FWD_CONFIGS[0].num_warps,
               "num_stages": _HOPPER_FWD_CONFIGS[0].num_stages}
_HOPPER_HEAD_DIM = 128


def hopper_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, has_docs: bool, *more: torch.Tensor) -> bool:
    """True when the TMA forward can run this call: CUDA sm90+, fp16/bf16, head dim 128 (as
    the kernel runs it, after padding), no documents, 16-byte aligned base pointers and row
    strides (TMA's requirement; of ``more`` too, e.g. dO for the backward), unit head-dim stride."""
    if _INTERPRET or has_docs or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if q.shape[-1] != _HOPPER_HEAD_DIM:
        return False
    if _major_capability(q.get_device()) < 9:
        return False
    for t in (q, k, v, *more):
        strides = t.stride()
        size = t.element_size()
        if strides[-1] != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in strides[:-1]):
            return False
    return True


@functools.cache
def _major_capability(device_index: int) -> int:
    """The GPU's major compute capability (cached: asked on every attention call)."""
    return torch.cuda.get_device_capability(device_index)[0]


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Give Triton a scratch allocator (torch's caching allocator) if none is set in this
    context: device-side tensor descriptors are written to global scratch at launch."""
    try:  # private: the only way to read the current one (a ContextVar since Triton 3.3)
        from triton.runtime import _allocation  # noqa: PLC0415
        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):
        unset = True
    if unset:
        triton.set_allocator(_scratch)


@triton.jit
def _row_tiles(base, rows, stride, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A device-side TMA descriptor over a (rows, HEAD_DIM) matrix with row stride ``stride``
    (unit column stride) at ``base``, read in (BLOCK, HEAD_DIM) tiles."""
    return tl.make_tensor_descriptor(base, shape=[rows, HEAD_DIM], strides=[stride, 1],
                                     block_shape=[BLOCK, HEAD_DIM])


@triton.jit
def _fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, S_K, qk_scale, lo, hi,
                   BLOCK_N: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   WARP_SPECIALIZE: tl.constexpr):
    """Online softmax over key blocks [lo, hi); MASK: the key tail and the causal diagonal.
    WARP_SPECIALIZE: Triton's automatic warp specialization of the loop (loads in a producer
    warp, the math in consumers), a benchmark's candidate, not yet the library's."""
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = k_desc.load([start_n, 0])  # (BN, D), rows past S_K are zeros
        qk = tl.dot(q, tl.trans(k))  # (BM, BN), unscaled
        if MASK:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            keep = offs_n[None, :] < S_K
            if IS_CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp2(qk - m_new[:, None])
        else:  # the scale folded into the max and into one FMA per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([start_n, 0])  # (BN, D)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_HOPPER_FWD_CONFIGS,
    key=["S_Q", "S_K", "HEAD_DIM", "IS_CAUSAL", "HAS_ACC"],
    prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N")},
    restore_value=["O", "LSE"],  # HAS_ACC updates O/LSE in place: benchmarking must not compound
)
@triton.jit
def _attn_fwd_tma(Q, K, V, O, LSE, sm_scale,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                  H_Q, GROUP, S_Q, S_K,
                  HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_ACC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr = False):
    """One program: BLOCK_M query rows of one (batch, query head); arguments as ``_attn_fwd``."""
    start_m = _query_block(IS_CAUSAL) * BLOCK_M
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // H_Q).to(tl.int64)
    off_h = (pid_bh % H_Q).to(tl.int64)
    off_hk = off_h // GROUP  # GQA: kv head of this query head
    q_desc = _row_tiles(Q + off_b * stride_qb + off_h * stride_qh, S_Q, stride_qm, BLOCK_M, HEAD_DIM)
    k_desc = _row_tiles(K + off_b * stride_kb + off_hk * stride_kh, S_K, stride_kn, BLOCK_N, HEAD_DIM)
    v_desc = _row_tiles(V + off_b * stride_vb + off_hk * stride_vh, S_K, stride_vn, BLOCK_N, HEAD_DIM)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([start_m, 0])  # (BM, D)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): the kernel works in base 2

    m_i = tl.full([BLOCK_M], _M_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full, hi = _key_block_bounds(S_K, start_m, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, S_K, qk_scale, 0, full,
                                   BLOCK_N, False, IS_CAUSAL, WARP_SPECIALIZE)
    acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, S_K, qk_scale, full, hi,
                                   BLOCK_N, True, IS_CAUSAL, False)
    _store_result(O + off_b * stride_ob + off_h * stride_oh, LSE + off_b * stride_lb + off_h * stride_lh,
                  acc, l_i, m_i, offs_m, offs_m < S_Q, stride_om, HEAD_DIM, HAS_ACC)


def forward_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                causal: bool, scale: float, has_acc: bool, kernel=None, **config) -> None:
    """Launch the TMA forward (the caller checked :func:`hopper_eligible` and the head dim).
    ``kernel``/``config``: a benchmark's way to run one config of the unwrapped kernel
    (``_attn_fwd_tma.fn`` with BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    b, hq, s_q, d = q.shape
    hkv, s_k = k.shape[1], k.shape[2]
    ensure_allocator()

    def grid(meta: dict) -> tuple[int, int]:
        return (b * hq, triton.cdiv(s_q, meta["BLOCK_M"]))

    if kernel is None and len(_HOPPER_FWD_CONFIGS) == 1:  # one config: skip the autotuner's per-call work
        kernel, config = _attn_fwd_tma.fn, _PINNED_FWD
    (kernel or _attn_fwd_tma)[grid](
        q, k, v, out, lse, scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
        hq, hq // hkv, s_q, s_k,
        HEAD_DIM=d, IS_CAUSAL=bool(causal), HAS_ACC=has_acc, **config,
    )
