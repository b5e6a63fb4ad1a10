"""Flash attention kernel (``triton_kernels/flash_attention.py``) against PyTorch.

Tolerance (DESIGN "Testing layers", STYLE principle 7): with relative Frobenius errors,
``err(kernel, ref_hi) <= 2 * err(torch_same_dtype, ref_hi) + atol``, where ``ref_hi`` is
:func:`attention_ref` in fp64 (CPU) or fp32 (GPU) and ``torch_same_dtype`` is PyTorch's own
attention in the input dtype. Shapes are odd on purpose: sequence lengths that are not
multiples of the blocks, GQA, s_q != s_k.

Without CUDA the kernels run in the Triton interpreter on CPU (fp16/fp32, and bf16 through
the kernel's upcast flag); ``pytest -m gpu`` runs bf16 at real sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from triton_kernels.flash_attention import (
    attention_ref,
    flash_attention,
    flash_attention_backward,
    flash_attention_ring_step,
)

from .kernel_checks import ATOL, DEVICE, check_against_torch, rel_err


def _inputs(b: int, hq: int, hkv: int, s_q: int, s_k: int, d: int, dtype: torch.dtype,
            bshd: bool = False, device: str = DEVICE) -> tuple[torch.Tensor, ...]:
    if bshd:  # (b, s, h, d) memory seen as (b, h, s, d): strided, head dim contiguous
        q = torch.randn(b, s_q, hq, d, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(b, s_k, hkv, d, device=device, dtype=dtype).transpose(1, 2)
        v = torch.randn(b, s_k, hkv, d, device=device, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(b, hq, s_q, d, device=device, dtype=dtype)
        k = torch.randn(b, hkv, s_k, d, device=device, dtype=dtype)
        v = torch.randn(b, hkv, s_k, d, device=device, dtype=dtype)
    return q, k, v


def _run(fn, q, k, v, dout, dlse):
    """out, lse, dq, dk, dv of ``fn`` for the loss <out, dout> + <lse, dlse>."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.to(dout.dtype) * dout).sum()
    if dlse is not None:
        loss = loss + (lse.to(dlse.dtype) * dlse).sum()
    loss.backward()
    return out.detach(), None if lse is None else lse.detach(), q.grad, k.grad, v.grad


CASES = [
    # (b, hq, hkv, s_q, s_k, d, causal, dtype, bshd)
    (1, 4, 2, 80, 80, 64, True, torch.float16, False),
    (2, 2, 1, 100, 100, 64, False, torch.float16, True),
    (1, 2, 2, 48, 48, 128, True, torch.float32, False),
    (1, 4, 2, 100, 100, 128, False, torch.float32, False),
    (1, 2, 1, 48, 80, 32, True, torch.float32, False),  # s_q < s_k, top-left causal
    (1, 2, 1, 100, 48, 16, True, torch.float16, False),  # s_q > s_k
    (2, 4, 1, 100, 100, 128, True, torch.float16, False),  # GQA group of 4
    (1, 4, 2, 80, 80, 64, True, torch.bfloat16, False),  # bf16 upcast under the interpreter
    (1, 2, 1, 40, 40, 8, True, torch.float32, False),  # head dim 8: zero-padded to 16
    (1, 4, 2, 48, 48, 96, False, torch.float16, True),  # head dim 96: padded to 128, strided input
]


@pytest.mark.parametrize("b,hq,hkv,s_q,s_k,d,causal,dtype,bshd", CASES)
def test_forward_backward(b, hq, hkv, s_q, s_k, d, causal, dtype, bshd):
    torch.manual_seed(0)
    q, k, v = _inputs(b, hq, hkv, s_q, s_k, d, dtype, bshd)
    dout = torch.randn(b, hq, s_q, d, device=DEVICE, dtype=dtype)
    dlse = torch.randn(b, hq, s_q, device=DEVICE, dtype=torch.float32)  # gradient through lse too

    got = _run(lambda *a: flash_attention(*a, causal=causal), q, k, v, dout, dlse)
    same = _run(lambda *a: attention_ref(*a, causal=causal, upcast=False), q, k, v, dout, dlse)
    ref = _run(lambda *a: attention_ref(*a, causal=causal), *(t.double() for t in (q, k, v)),
               dout.double(), dlse.double())

    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert got[1].shape == (b, hq, s_q)
    for name, g, s, r in zip(("out", "lse", "dq", "dk", "dv"), got, same, ref):
        assert g.shape == r.shape, name
        check_against_torch(name, g, s, r, ATOL[dtype])


def _ring_forward(q, k, v, n: int):
    """Simulate n ring ranks on one process: rank i holds query block i and sees K/V block
    (i - t) mod n at step t; the diagonal is causal, earlier blocks fully visible, later
    ones skipped. Returns the merged fp32 out and lse, concatenated over ranks."""
    qs, ks, vs = q.chunk(n, dim=2), k.chunk(n, dim=2), v.chunk(n, dim=2)
    outs, lses = [], []
    for i in range(n):
        out = lse = None  # first step starts from (0, -inf)
        for t in range(n):
            j = (i - t) % n
            if j > i:
                continue
            out, lse = flash_attention_ring_step(qs[i], ks[j], vs[j], out, lse, causal=(j == i))
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _ring_backward(q, k, v, out, lse, dout, n: int):
    """Per (query block i, K/V block j <= i): FlashAttention backward with the global out/lse;
    dq sums over j, dk/dv over i (in fp32)."""
    qs, ks, vs = q.chunk(n, dim=2), k.chunk(n, dim=2), v.chunk(n, dim=2)
    outs, lses, douts = out.chunk(n, dim=2), lse.chunk(n, dim=2), dout.chunk(n, dim=2)
    dq = [torch.zeros(t.shape, device=t.device) for t in qs]
    dk = [torch.zeros(t.shape, device=t.device) for t in ks]
    dv = [torch.zeros(t.shape, device=t.device) for t in vs]
    for i in range(n):
        for j in range(i + 1):
            gq, gk, gv = flash_attention_backward(qs[i], ks[j], vs[j], outs[i], lses[i].contiguous(), douts[i],
                                                  causal=(j == i), grad_dtype=torch.float32)
            dq[i] += gq
            dk[j] += gk
            dv[j] += gv
    return torch.cat(dq, dim=2), torch.cat(dk, dim=2), torch.cat(dv, dim=2)


def _check_ring(q, k, v, dout, n: int, ref_dtype: torch.dtype) -> None:
    dtype = q.dtype
    out, lse = _ring_forward(q, k, v, n)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    dq, dk, dv = _ring_backward(q, k, v, out, lse, dout, n)

    ref = _run(lambda *a: attention_ref(*a, causal=True), *(t.to(ref_dtype) for t in (q, k, v)),
               dout.to(ref_dtype), None)
    same_out, same_lse = attention_ref(q, k, v, causal=True, upcast=False)
    same = _run(lambda *a: (F.scaled_dot_product_attention(*a, is_causal=True, enable_gqa=True), None),
                q, k, v, dout, None)
    check_against_torch("ring out", out, same[0], ref[0], ATOL[dtype])
    check_against_torch("ring lse", lse, same_lse, ref[1], ATOL[dtype])
    for name, g, s, r in zip(("ring dq", "ring dk", "ring dv"), (dq, dk, dv), same[2:], ref[2:]):
        check_against_torch(name, g, s, r, ATOL[dtype])


@pytest.mark.parametrize("dtype,n", [(torch.float16, 3), (torch.float32, 2)])
def test_ring_step_and_backward(dtype, n):
    torch.manual_seed(1)
    block = 40  # not a multiple of the kernel blocks
    q, k, v = _inputs(1, 4, 2, block * n, block * n, 64, dtype)
    dout = torch.randn_like(q)
    _check_ring(q, k, v, dout, n, torch.float64)


@pytest.mark.parametrize("d", [32, 24])  # 24: the kernel runs padded to 32 and copies back
def test_ring_step_merges_in_place(d):
    torch.manual_seed(2)
    q, k, v = _inputs(1, 2, 1, 40, 80, d, torch.float32)
    out, lse = flash_attention_ring_step(q, k[:, :, :40], v[:, :, :40], None, None, causal=False)
    out2, lse2 = flash_attention_ring_step(q, k[:, :, 40:], v[:, :, 40:], out, lse, causal=False)
    assert out2.data_ptr() == out.data_ptr() and lse2.data_ptr() == lse.data_ptr()
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), causal=False)
    assert rel_err(out2, ref_out) < 1e-6 and rel_err(lse2, ref_lse) < 1e-6


def test_ring_step_writes_and_merges_through_views():
    """The ring merges into the second half of its (out, lse) buffers: strided views, written
    in place; accumulate=False overwrites whatever the buffers held."""
    torch.manual_seed(3)
    q, k, v = _inputs(2, 4, 2, 48, 48, 32, torch.float32)
    out = torch.full((2, 4, 48, 32), float("nan"))
    lse = torch.full((2, 4, 48), float("nan"))
    flash_attention_ring_step(q, k[:, :, :24], v[:, :, :24], out, lse, causal=False, accumulate=False)
    half_o, half_l = out[:, :, 24:], lse[:, :, 24:]
    assert not half_o.is_contiguous() and not half_l.is_contiguous()
    got_o, got_l = flash_attention_ring_step(q[:, :, 24:], k[:, :, 24:], v[:, :, 24:], half_o, half_l, causal=True)
    assert got_o.data_ptr() == half_o.data_ptr() and got_l.data_ptr() == half_l.data_ptr()
    # rows 24.. see keys 0..23 and, causally from their own start, 24..47: plain causal attention
    ref_o, ref_l = attention_ref(q.double(), k.double(), v.double(), causal=True)
    assert rel_err(out[:, :, 24:], ref_o[:, :, 24:]) < 1e-6 and rel_err(lse[:, :, 24:], ref_l[:, :, 24:]) < 1e-6
    first_o, first_l = attention_ref(q.double(), k[:, :, :24].double(), v[:, :, :24].double(), causal=False)
    assert rel_err(out[:, :, :24], first_o[:, :, :24]) < 1e-6 and rel_err(lse[:, :, :24], first_l[:, :, :24]) < 1e-6


@pytest.mark.parametrize("d,backward,docs", [(32, "split", False), (32, "split", True), (24, "split", False),
                                           (32, "fused", False)])
def test_backward_into_writes_and_adds_dq_through_views(monkeypatch, d, backward, docs):
    """``into``: the first block's gradients overwrite the (NaN-filled) buffers; the second
    block's dQ is added to a strided view of dq (the ring's half chunk) and its dK/dV
    overwrite strided views of the other buffers, in the kernels' epilogue (d 32, split) or
    through the fallback (d 24 runs padded; the fused backward): bit-equal to fresh fp32
    gradients (dQ summed by PyTorch). ``kv_ready`` runs once dK/dV are
    written, before the dQ kernel where the two kernels run apart."""
    monkeypatch.setattr("triton_kernels.flash_attention._BACKWARD", backward)
    torch.manual_seed(4)
    q, k, v = _inputs(2, 4, 2, 48, 48, d, torch.float32)
    out, lse = flash_attention(q, k, v, causal=True)
    dout = torch.randn_like(q)
    kw = {}
    if docs:
        ids = torch.tensor([[0] * 10 + [1] * 14 + [2] * 24, [0] * 30 + [1] * 18], dtype=torch.int32)
        kw = {"doc_q": ids, "doc_k": ids}
        out, lse = flash_attention(q, k, v, causal=True, **kw)
    g1 = flash_attention_backward(q, k, v, out, lse, dout, causal=True, grad_dtype=torch.float32, **kw)
    half = {"doc_q": kw["doc_q"][:, 24:], "doc_k": kw["doc_k"][:, :24]} if docs else {}
    g2 = flash_attention_backward(q[:, :, 24:], k[:, :, :24], v[:, :, :24], out[:, :, 24:], lse[:, :, 24:].contiguous(),
                                  dout[:, :, 24:], causal=False, grad_dtype=torch.float32, **half)
    bufs = tuple(torch.full(t.shape, float("nan")) for t in (q, k, v))
    seen = []

    def kv_ready():  # dK/dV written; dQ not yet where its kernel runs apart (split, unpadded)
        seen.append((torch.equal(bufs[1], g1[1]) and torch.equal(bufs[2], g1[2]), bool(torch.isnan(bufs[0]).all())))

    got = flash_attention_backward(q, k, v, out, lse, dout, causal=True, into=bufs, kv_ready=kv_ready, **kw)
    assert all(a is b for a, b in zip(got, bufs))
    assert seen == [(True, backward == "split" and d == 32)], seen
    views = (bufs[0][:, :, 24:], bufs[1][:, :, :24], bufs[2][:, :, :24])
    assert not views[0].is_contiguous()
    flash_attention_backward(q[:, :, 24:], k[:, :, :24], v[:, :, :24], out[:, :, 24:], lse[:, :, 24:].contiguous(),
                             dout[:, :, 24:], causal=False, into=views, add_q=True, **half)
    want_q = g1[0].clone()
    want_q[:, :, 24:] += g2[0]
    want_k, want_v = g1[1].clone(), g1[2].clone()
    want_k[:, :, :24] = g2[1]
    want_v[:, :, :24] = g2[2]
    for name, g, w in zip(("dq", "dk", "dv"), bufs, (want_q, want_k, want_v)):
        assert torch.equal(g, w), f"{name}: max diff {(g - w).abs().max().item()}"
    with pytest.raises(ValueError, match="into's dk"):
        flash_attention_backward(q, k, v, out, lse, dout, causal=True, into=(bufs[0], bufs[0], bufs[2]))


def test_errors():
    q, k, v = _inputs(1, 4, 2, 16, 16, 64, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q, k[:, :1].expand(1, 3, 16, 64), v[:, :1].expand(1, 3, 16, 64), causal=True)
    with pytest.raises(ValueError, match="head_dim 256"):
        flash_attention(q.repeat(1, 1, 1, 4), k.repeat(1, 1, 1, 4), v.repeat(1, 1, 1, 4), causal=True)
    with pytest.raises(TypeError, match="dtypes differ"):
        flash_attention(q, k.half(), v, causal=True)
    with pytest.raises(ValueError, match="4-D"):
        flash_attention(q[0], k[0], v[0], causal=True)
    with pytest.raises(ValueError, match="out must be fp32"):
        flash_attention_ring_step(q, k, v, torch.zeros_like(q, dtype=torch.float16),
                                  torch.zeros(1, 4, 16), causal=True)
    with pytest.raises(ValueError, match="both out and lse"):
        flash_attention_ring_step(q, k, v, torch.zeros_like(q), None, causal=True)


@pytest.mark.parametrize("s_q,s_k,d,causal,bshd", [(100, 100, 32, True, True), (70, 130, 32, False, False),
                                                  (130, 70, 128, True, False)])
def test_tma_forward_kernel(s_q, s_k, d, causal, bshd):
    """The Hopper forward (flash_attention_hopper.py) in the interpreter, which runs its tensor
    descriptors: one config whose diagonal spans blocks, odd lengths (the zero-filled tile
    tail, the key mask), (b, s, h, d) views, GQA, then a second K/V block merged into the
    first (HAS_ACC), against the fp32 reference. fp16: the interpreter's bf16 dot is wrong."""
    from triton_kernels import flash_attention_hopper as hopper

    if DEVICE != "cpu":
        pytest.skip("interpreter test (the GPU class runs the real kernel)")
    torch.manual_seed(0)
    q, k, v = _inputs(2, 4, 2, s_q, s_k, d, torch.float16, bshd=bshd)
    cfg = {"kernel": hopper._attn_fwd_tma.fn, "BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    out = torch.empty(q.shape, dtype=torch.float16)
    lse = torch.empty(q.shape[:3])
    hopper.forward_tma(q, k, v, out, lse, causal, d ** -0.5, False, **cfg)
    ref_o, ref_l = attention_ref(q, k, v, causal=causal)
    assert rel_err(out, ref_o) < 2e-3 and rel_err(lse, ref_l) < 1e-5
    half = s_k // 2  # two ring steps over halves of K/V, merged in fp32
    acc, acc_lse = torch.empty(q.shape), torch.empty(q.shape[:3])
    hopper.forward_tma(q, k[:, :, :half], v[:, :, :half], acc, acc_lse, False, d ** -0.5, False, **cfg)
    hopper.forward_tma(q, k[:, :, half:], v[:, :, half:], acc, acc_lse, False, d ** -0.5, True, **cfg)
    ref_o, ref_l = attention_ref(q, k, v, causal=False)
    assert rel_err(acc, ref_o) < 2e-3 and rel_err(acc_lse, ref_l) < 1e-5


@pytest.mark.parametrize("backward", ["split", "fused"])
@pytest.mark.parametrize("s_q,s_k,causal,bshd", [(100, 100, True, True), (70, 130, False, False),
                                                (130, 70, True, False)])
def test_tma_backward_kernels(monkeypatch, s_q, s_k, causal, bshd, backward):
    """The backward kernels with their TMA flag (split: Q/dO tiles of dK/dV, K/V tiles of dQ;
    fused: Q/dO tiles, its dQ atomics staying per element, as the interpreter has no bulk
    reduction: TestGPU covers that) in the interpreter: equal to the pointer-based loads and
    to the fp32 reference, with odd lengths (the zero-filled tile tails), GQA and (b, s, h, d)
    views."""
    import triton_kernels.flash_attention as fa

    if DEVICE != "cpu":
        pytest.skip("interpreter test (the GPU class runs the real kernels)")
    torch.manual_seed(0)
    q, k, v = _inputs(2, 4, 2, s_q, s_k, 32, torch.float16, bshd=bshd)
    dout = torch.randn(q.shape, dtype=torch.float16)
    out, lse = flash_attention(q, k, v, causal=causal)
    monkeypatch.setattr(fa, "_BACKWARD", backward)
    monkeypatch.setattr(fa, "hopper_eligible", lambda *a: True)  # the interpreter runs descriptors too
    grads = {}
    for tma in (True, False):
        monkeypatch.setattr(fa, "_TMA_BACKWARD", tma)
        grads[tma] = fa._backward(q, k, v, out, lse, dout, None, causal, 32 ** -0.5, torch.float32)
    ref = _run(lambda *a: attention_ref(*a, causal=causal), *(t.float() for t in (q, k, v)), dout.float(), None)
    for name, g_tma, g_ptr, r in zip(("dq", "dk", "dv"), grads[True], grads[False], ref[2:]):
        assert rel_err(g_tma, g_ptr) < 1e-6, name  # the same math, other loads
        assert rel_err(g_tma, r) < 5e-3, name


FUSED_CASES = [  # a subset of CASES: causal diagonal, key/query tails both ways, GQA, views, each dtype path
    (1, 4, 2, 80, 80, 64, True, torch.float16, False),
    (2, 2, 1, 100, 100, 64, False, torch.float16, True),
    (1, 2, 1, 48, 80, 32, True, torch.float32, False),
    (1, 2, 1, 100, 48, 16, True, torch.float16, False),
    (1, 4, 2, 80, 80, 64, True, torch.bfloat16, False),
]


@pytest.mark.parametrize("b,hq,hkv,s_q,s_k,d,causal,dtype,bshd", FUSED_CASES)
def test_fused_backward(monkeypatch, b, hq, hkv, s_q, s_k, d, causal, dtype, bshd):
    """The one-pass backward (dQ by atomics, flash_attention_bwd_fused.py) against the fp64
    reference and the split kernels, gradient through lse included; a spy shows it ran."""
    import triton_kernels.flash_attention as fa

    torch.manual_seed(0)
    q, k, v = _inputs(b, hq, hkv, s_q, s_k, d, dtype, bshd)
    dout = torch.randn(b, hq, s_q, d, device=DEVICE, dtype=dtype)
    dlse = torch.randn(b, hq, s_q, device=DEVICE, dtype=torch.float32)
    launches = []
    kernel = fa._attn_bwd_fused

    class _Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(fa, "_attn_bwd_fused", _Spy())
    got = {}
    for kind in ("fused", "split"):
        monkeypatch.setattr(fa, "_BACKWARD", kind)
        got[kind] = _run(lambda *a: flash_attention(*a, causal=causal), q, k, v, dout, dlse)
    assert len(launches) == 1
    same = _run(lambda *a: attention_ref(*a, causal=causal, upcast=False), q, k, v, dout, dlse)
    ref = _run(lambda *a: attention_ref(*a, causal=causal), *(t.double() for t in (q, k, v)),
               dout.double(), dlse.double())
    for i, name in enumerate(("dq", "dk", "dv"), start=2):
        check_against_torch(name, got["fused"][i], same[i], ref[i], ATOL[dtype])
        # the same products, summed in another order (dQ) or the same one (dK, dV); in 16 bits
        # the stores round: the interpreter's fp32 -> bf16 truncates where torch's .to (the fused
        # dQ's conversion) rounds to nearest, so bf16 dQs differ by up to an ulp there
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        assert rel_err(got["fused"][i].float(), got["split"][i].float()) < tol, name


def test_fused_backward_yields_to_determinism_and_documents(monkeypatch):
    """DTP_FLASH_BWD=fused still runs the split kernels where its atomics are not wanted:
    under torch.use_deterministic_algorithms(True), and with document masks (not fused)."""
    import triton_kernels.flash_attention as fa

    monkeypatch.setattr(fa, "_BACKWARD", "fused")
    assert fa._fused_backward(None)
    assert not fa._fused_backward(object())  # any document ranges
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not fa._fused_backward(None)


def test_measured_configs_pin_one_config_on_hopper_only(monkeypatch):
    """On a Hopper GPU the backward kernels run the measured config of their head dim alone
    (every rank the same, no first-call autotuning); documents, fp32, other head dims, other
    GPUs and short sequences keep the autotuner's candidates."""
    import triton

    from triton_kernels import flash_attention_kernels as fwdk

    monkeypatch.setattr(fwdk, "_INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability[0])
    configs = fwdk._configs([(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 2)])
    prune = fwdk._prune("BLOCK_N", "BLOCK_M", {128: (64, 128, 8, 3), 64: (32, 128, 4, 3)})
    args = {"S_Q": 4096, "S_K": 4096, "HEAD_DIM": 128, "PRECISION": "tf32", "HAS_DOCS": False}

    def picked(**changes):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in prune(configs, {**args, **changes})]

    assert picked() == [(64, 128, 8, 3)] and picked(HEAD_DIM=64) == [(32, 128, 4, 3)]
    assert len(picked(HAS_DOCS=True)) > 1 and len(picked(HEAD_DIM=32)) > 1
    assert picked(PRECISION="ieee") == [(32, 64, 4, 2)]  # fp32: its own small tile
    assert picked(S_Q=100, S_K=100) == [(32, 128, 4, 3)]  # short: the smallest 16-bit tile
    capability[0] = (8, 0)
    assert len(picked()) > 1
    assert isinstance(prune(configs, args)[0], triton.Config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestGPU:
    """bf16 at real sizes against the fp32 reference; torch_same_dtype is SDPA in bf16 (out,
    grads) and attention_ref in bf16 (lse)."""

    @pytest.mark.parametrize("s", [1024, 4096])
    @pytest.mark.parametrize("causal", [True, False])
    def test_bf16(self, s, causal):
        torch.manual_seed(0)
        dtype = torch.bfloat16
        q, k, v = _inputs(1, 32, 8, s, s, 128, dtype, device="cuda")
        dout = torch.randn_like(q)
        got = _run(lambda *a: flash_attention(*a, causal=causal), q, k, v, dout, None)
        ref = _run(lambda *a: attention_ref(*a, causal=causal), *(t.float() for t in (q, k, v)),
                   dout.float(), None)
        same = _run(lambda *a: (F.scaled_dot_product_attention(*a, is_causal=causal, enable_gqa=True), None),
                    q, k, v, dout, None)
        _, same_lse = attention_ref(q, k, v, causal=causal, upcast=False)
        check_against_torch("out", got[0], same[0], ref[0], ATOL[dtype])
        check_against_torch("lse", got[1], same_lse, ref[1], ATOL[dtype])
        for name, g, sm, r in zip(("dq", "dk", "dv"), got[2:], same[2:], ref[2:]):
            check_against_torch(name, g, sm, r, ATOL[dtype])

    def test_ring_bf16(self):
        torch.manual_seed(0)
        q, k, v = _inputs(1, 32, 8, 4096, 4096, 128, torch.bfloat16, device="cuda")
        _check_ring(q, k, v, torch.randn_like(q), 4, torch.float32)

    @pytest.mark.parametrize("s_q,s_k,d,bshd,causal", [(1000, 1000, 128, True, True), (777, 1500, 128, False, False),
                                                      (2048, 2048, 96, True, True), (300, 200, 128, False, True)])
    def test_tma_forward_matches_pointer_kernel_and_reference(self, s_q, s_k, d, bshd, causal):
        """The Hopper TMA forward (flash_attention_hopper.py) against the fp32 reference and
        against the pointer-based kernel it replaces: odd lengths (the zero-filled tile tail
        and the key mask), (b, s, h, d) views, GQA, and the ring merge (HAS_ACC)."""
        from triton_kernels import flash_attention_hopper as hopper
        from triton_kernels.flash_attention import _forward

        torch.manual_seed(0)
        q, k, v = _inputs(2, 16, 4, s_q, s_k, d, torch.bfloat16, bshd=bshd, device="cuda")
        if torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("the TMA forward needs sm90+")
        assert hopper.hopper_eligible(q, k, v, False) == (d == 128)  # head dim 96 runs padded to 128
        scale = d ** -0.5
        results = {}
        for name, tma in (("tma", True), ("pointer", False)):
            out = torch.empty(q.shape, device="cuda", dtype=torch.float32)
            lse = torch.empty(q.shape[:3], device="cuda", dtype=torch.float32)
            half = s_k // 2  # two ring steps: the second merges into the first (HAS_ACC)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr("triton_kernels.flash_attention._TMA_FORWARD", tma)
                calls = []
                mp.setattr("triton_kernels.flash_attention.forward_tma",
                           lambda *a, **kw: (calls.append(1), hopper.forward_tma(*a, **kw)))
                _forward(q, k[:, :, :half], v[:, :, :half], out, lse, False, scale, has_acc=False)
                _forward(q, k[:, :, half:], v[:, :, half:], out, lse, False, scale, has_acc=True)
                one_out = torch.empty_like(q)
                one_lse = torch.empty(q.shape[:3], device="cuda", dtype=torch.float32)
                _forward(q, k, v, one_out, one_lse, causal, scale, has_acc=False)
                assert len(calls) == (3 if tma else 0)
            results[name] = (out, lse, one_out, one_lse)
        ref_ring = attention_ref(*(t.float() for t in (q, k, v)), causal=False)
        ref_one = attention_ref(*(t.float() for t in (q, k, v)), causal=causal)
        for got, want in zip(results["tma"], (*ref_ring, *ref_one)):
            assert rel_err(got.float(), want.float()) < 1e-2
        for got, other in zip(results["tma"], results["pointer"]):  # the same math, other loads
            assert rel_err(got.float(), other.float()) < 2e-3

    @pytest.mark.parametrize("s,causal", [(1000, True), (2048, False)])
    def test_fused_backward_on_gpu(self, monkeypatch, s, causal):
        """The one-pass backward on the GPU, with per-element atomics and (sm90+) with bulk TMA
        reductions and TMA loads: equal to the split kernels within accumulation order, and
        to the fp32 reference."""
        import triton_kernels.flash_attention as fa

        torch.manual_seed(0)
        q, k, v = _inputs(2, 16, 4, s, s, 128, torch.bfloat16, bshd=True, device="cuda")
        dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
        out, lse = flash_attention(q, k, v, causal=causal)
        hopper = torch.cuda.get_device_capability()[0] >= 9
        assert fa.hopper_eligible(q, k, v, False, dout) == hopper
        ref = _run(lambda *a: attention_ref(*a, causal=causal), *(t.float() for t in (q, k, v)), dout.float(), None)
        monkeypatch.setattr(fa, "_BACKWARD", "split")
        split = fa._backward(q, k, v, out, lse, dout, None, causal, 128 ** -0.5, torch.float32)
        monkeypatch.setattr(fa, "_BACKWARD", "fused")
        for tma in ((False, True) if hopper else (False,)):
            monkeypatch.setattr(fa, "_TMA_BACKWARD", tma)
            monkeypatch.setattr(fa, "_TMA_REDUCE_DQ", tma)
            fused = fa._backward(q, k, v, out, lse, dout, None, causal, 128 ** -0.5, torch.float32)
            for name, g, sp, r in zip(("dq", "dk", "dv"), fused, split, ref[2:]):
                assert rel_err(g, sp) < 1e-5, (name, tma)
                assert rel_err(g, r.float()) < 1e-2, (name, tma)

    def test_tma_backward_matches_pointer_kernels(self, monkeypatch):
        """The backward kernels' TMA loads on the GPU (off in the library until timed) give the
        gradients of the pointer-based loads: odd length, GQA, (b, s, h, d) views."""
        import triton_kernels.flash_attention as fa

        if torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("TMA needs sm90+")
        torch.manual_seed(0)
        q, k, v = _inputs(2, 16, 4, 1000, 1000, 128, torch.bfloat16, bshd=True, device="cuda")
        dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
        assert fa.hopper_eligible(q, k, v, False, dout)  # else both runs would take the pointer loads
        out, lse = flash_attention(q, k, v, causal=True)
        grads = {}
        for tma in (True, False):
            monkeypatch.setattr(fa, "_TMA_BACKWARD", tma)
            grads[tma] = fa._backward(q, k, v, out, lse, dout, None, True, 128 ** -0.5, torch.float32)
        for g_tma, g_ptr in zip(grads[True], grads[False]):
            assert rel_err(g_tma, g_ptr) < 1e-5
