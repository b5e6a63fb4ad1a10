"""The "sdpa" ring-attention block backend (``context_parallel/sdpa_blocks.py``) against the
plain-torch backend and an fp64 reference: forward steps written through views and merged,
the block backward given the final out and lse, GQA, document masks, and a ring-like
composition of two key blocks whose gradients must sum to full attention's.

CPU runs ``_scaled_dot_product_flash_attention_for_cpu`` in fp32; the CUDA class (``-m gpu``)
runs the flash and efficient ops in bf16 against the fp32 torch backend."""

from __future__ import annotations

import math

import pytest
import torch

from dtensor_parallel.context_parallel.blocks import TorchBlocks, get_backend
from dtensor_parallel.context_parallel.sdpa_blocks import SdpaBlocks, _kind

NEG_INF = float("-inf")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def reference(q, k, v, causal: bool, scale: float, doc_q=None, doc_k=None, offset: int = 0):
    """fp64 attention (differentiable): out (b, hq, s_q, d), lse (b, hq, s_q); top-left causal
    with query rows at offset..; a row that sees no key gives out 0, lse -inf."""
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    s_q, s_k = s.shape[-2:]
    visible = torch.ones(q.shape[0], s_q, s_k, dtype=torch.bool, device=q.device)
    if causal:
        rows = torch.arange(offset, offset + s_q, device=q.device)[:, None]
        visible &= torch.arange(s_k, device=q.device)[None, :] <= rows
    if doc_q is not None:
        visible &= doc_q[:, :, None] == doc_k[:, None, :]
    s = s.masked_fill(~visible[:, None], NEG_INF)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(lse == NEG_INF, 0.0)[..., None])
    return p @ vv, lse


def inputs(b, hq, hkv, s_q, s_k, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    return make(b, hq, s_q, d), make(b, hkv, s_k, d), make(b, hkv, s_k, d)


def run_forward(backend, q, k, v, causal, scale, accumulate, prev=None, **docs):
    """forward_step into the second half of (b, hq, 2 s_q, d) fp32 buffers; the first half
    must stay untouched. ``prev`` (out, lse) seeds the running half for accumulate=True."""
    b, hq, s_q, d = q.shape
    out = torch.full((b, hq, 2 * s_q, d), 7.0, device=q.device)
    lse = torch.full((b, hq, 2 * s_q), 7.0, device=q.device)
    if prev is not None:
        out[:, :, s_q:], lse[:, :, s_q:] = prev
    o, l = backend.forward_step(q, k, v, out[:, :, s_q:], lse[:, :, s_q:], causal, scale, accumulate=accumulate, **docs)
    assert (out[:, :, :s_q] == 7).all() and (lse[:, :, :s_q] == 7).all()
    return out[:, :, s_q:], lse[:, :, s_q:]


GQA = [(4, 2), (2, 2)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("d", [16, 8])
@pytest.mark.parametrize("accumulate", [False, True])
def test_forward_step(causal, hq, hkv, d, accumulate):
    q, k, v = inputs(2, hq, hkv, 12, 12, d)
    scale = d ** -0.5
    prev = None
    if accumulate:  # a previous block's result, merged with this one
        q0, k0, v0 = inputs(2, hq, hkv, 12, 12, d, seed=1)
        prev = tuple(t.float() for t in reference(q, k0, v0, False, scale))
    out, lse = run_forward(SdpaBlocks, q, k, v, causal, scale, accumulate, prev)
    out_t, lse_t = run_forward(TorchBlocks, q, k, v, causal, scale, accumulate, prev)
    o, l = reference(q, k, v, causal, scale)
    if accumulate:
        o, l = _merged(prev, (o, l))
    assert rel(out, out_t) < 1e-5 and rel(lse, lse_t) < 1e-5
    assert rel(out, o) < 1e-5 and rel(lse, l) < 1e-5


def _merged(a, b):
    (oa, la), (ob, lb) = a, b
    new = torch.logaddexp(la.double(), lb.double())
    return oa.double() * torch.exp(la - new)[..., None] + ob.double() * torch.exp(lb - new)[..., None], new


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("d", [16, 8])
def test_backward_block(causal, hq, hkv, d):
    """One block's share of the gradients, given the final out/lse of two blocks."""
    q, k, v = inputs(1, hq, hkv, 10, 10, d)
    _, k0, v0 = inputs(1, hq, hkv, 10, 10, d, seed=2)
    scale = d ** -0.5
    out, lse = _merged(reference(q, k0, v0, False, scale), reference(q, k, v, causal, scale))
    out, lse = out.float(), lse.float()
    dout = torch.randn_like(q)
    got = SdpaBlocks.backward_block(dout, q, k, v, out, lse, causal, scale)
    want = TorchBlocks.backward_block(dout, q, k, v, out, lse, causal, scale)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert rel(a, b) < 1e-5, f"{name}: {rel(a, b):.2e}"


def _ring_like(dtype, device, causal, hq, hkv, d, docs: bool, tol: float, c: int = 8):
    """Keys in two blocks A = [0, c), B = [c, 2c) as a ring holds them: under causal, A is
    attended by all queries (top-left: rows < c causally, rows >= c fully) and B only by the
    second half of the queries (causal, square), merged into the second half of the buffers.
    out, lse and the summed block gradients must equal full attention (fp64 autograd)."""
    b, s = 2, 2 * c
    q, k, v = inputs(b, hq, hkv, s, s, d, dtype=dtype, device=device, seed=3)
    scale = d ** -0.5
    doc = None
    if docs:  # three documents per sequence, and a query in a document of no key of block B
        doc = torch.tensor([[0] * 5 + [1] * 6 + [2] * (s - 11), [0] * 9 + [1] * (s - 9)], device=device)
    da = {} if doc is None else {"doc_q": doc, "doc_k": doc[:, :c]}
    db = {} if doc is None else {"doc_q": doc[:, c:], "doc_k": doc[:, c:]}
    d_all_b = {} if doc is None else {"doc_q": doc, "doc_k": doc[:, c:]}  # all queries, keys of B
    kA, vA, kB, vB = k[:, :, :c], v[:, :, :c], k[:, :, c:], v[:, :, c:]
    out = torch.empty(b, hq, s, d, device=device)
    lse = torch.empty(b, hq, s, device=device)
    SdpaBlocks.forward_step(q, kA, vA, out, lse, causal, scale, accumulate=False, **da)
    if causal:
        SdpaBlocks.forward_step(q[:, :, c:], kB, vB, out[:, :, c:], lse[:, :, c:], True, scale, **db)
    else:
        SdpaBlocks.forward_step(q, kB, vB, out, lse, False, scale, **d_all_b)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()

    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    o_ref, l_ref = reference(qr, kr, vr, causal, scale, doc, doc)
    dout = torch.randn(o_ref.shape, dtype=torch.float64, device=device)
    (o_ref * dout).sum().backward()
    assert rel(out, o_ref) < tol and rel(lse, l_ref) < tol

    dout = dout.to(dtype)
    dq, dkA, dvA = SdpaBlocks.backward_block(dout, q, kA, vA, out, lse, causal, scale, **da)
    if causal:
        gq, dkB, dvB = SdpaBlocks.backward_block(dout[:, :, c:], q[:, :, c:], kB, vB, out[:, :, c:], lse[:, :, c:],
                                                 True, scale, **db)
        dq[:, :, c:] += gq
    else:
        gq, dkB, dvB = SdpaBlocks.backward_block(dout, q, kB, vB, out, lse, False, scale, **d_all_b)
        dq += gq
    for name, a, want in (("dq", dq, qr.grad), ("dk", torch.cat([dkA, dkB], 2), kr.grad),
                          ("dv", torch.cat([dvA, dvB], 2), vr.grad)):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        assert rel(a, want) < tol, f"{name}: {rel(a, want):.2e}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("docs", [False, True])
def test_ring_like_composition(causal, hq, hkv, docs):
    _ring_like(torch.float32, "cpu", causal, hq, hkv, 16, docs, 1e-5)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("hq,hkv", GQA)
def test_documents_row_without_keys(accumulate, hq, hkv):
    """A query whose document has no key in the block merges as lse = -inf, out = 0."""
    q, k, v = inputs(1, hq, hkv, 6, 5, 8)
    doc_q = torch.tensor([[0, 0, 9, 1, 1, 9]])  # document 9: no key here
    doc_k = torch.tensor([[0, 0, 1, 1, 1]])
    prev = (torch.randn(1, hq, 6, 8), torch.randn(1, hq, 6)) if accumulate else None
    out, lse = run_forward(SdpaBlocks, q, k, v, True, 0.3, accumulate, prev, doc_q=doc_q, doc_k=doc_k)
    assert torch.isfinite(out).all() and not lse.isnan().any()
    o, l = reference(q, k, v, True, 0.3, doc_q, doc_k)
    if accumulate:
        o, l = _merged(prev, (o, l))
        for row in (2, 5):
            assert torch.equal(out[:, :, row], prev[0][:, :, row]) and torch.equal(lse[:, :, row], prev[1][:, :, row])
    else:
        assert (out[:, :, [2, 5]] == 0).all() and (lse[:, :, [2, 5]] == NEG_INF).all()
        # a second block these rows do not see either: still out 0, lse -inf (no NaN from -inf - -inf)
        SdpaBlocks.forward_step(q, k, v, out, lse, True, 0.3, accumulate=True, doc_q=doc_q, doc_k=doc_k)
        assert (out[:, :, [2, 5]] == 0).all() and (lse[:, :, [2, 5]] == NEG_INF).all()
        l = l + math.log(2)  # the same block twice: out unchanged, lse + log 2 (-inf stays)
    assert rel(out, o) < 1e-5
    seen = l > NEG_INF
    assert torch.allclose(lse[seen], l[seen].float(), atol=1e-5)
    # the row's gradients (final lse from elsewhere) are zero, the others as the reference's
    # (row 5 is seen by no block at all: final lse -inf, out 0)
    final = (torch.randn(1, hq, 6, 8), torch.randn(1, hq, 6))
    final[0][:, :, 5], final[1][:, :, 5] = 0.0, NEG_INF
    dout = torch.randn(1, hq, 6, 8)
    dq, dk, dv = SdpaBlocks.backward_block(dout, q, k, v, *final, True, 0.3, doc_q=doc_q, doc_k=doc_k)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (dq[:, :, [2, 5]] == 0).all()


def test_non_square_causal_is_top_left():
    q, k, v = inputs(1, 4, 2, 12, 7, 8)
    for s_k in (7, 12):
        q_ = q[:, :, :7] if s_k == 12 else q  # s_q > s_k, then s_q < s_k
        k_, v_ = inputs(1, 4, 2, 12, s_k, 8, seed=4)[1:]
        out, lse = run_forward(SdpaBlocks, q_, k_, v_, True, 0.4, False)
        o, l = reference(q_, k_, v_, True, 0.4)
        assert rel(out, o) < 1e-5 and rel(lse, l) < 1e-5


def test_registry_and_errors():
    assert get_backend("sdpa") is SdpaBlocks and SdpaBlocks.name == "sdpa"
    with pytest.raises(ValueError, match="'sdpa'"):
        get_backend("cudnn")
    q, k, v = inputs(1, 2, 2, 4, 4, 8)
    out, lse = torch.empty(1, 2, 4, 8), torch.empty(1, 2, 4)
    with pytest.raises(ValueError, match="both doc_q and doc_k"):
        SdpaBlocks.forward_step(q, k, v, out, lse, False, 1.0, doc_q=torch.zeros(1, 4))
    with pytest.raises(NotImplementedError, match="'torch' backend"):
        _kind(q.to("meta"), False, False, 4)


class _CudaOpsOnCpu:
    """CPU stand-ins for the CUDA ops with the layouts those ops give and demand (read in
    torch's attention_backward.cu): the efficient op returns lse padded to 32 rows and out in
    (b, s, h, d) memory, and its backward derives out's row stride from that layout; its bias
    has the query's dtype, full (b, h, s_q, s_k) shape and 16-aligned strides; flash is called
    dense (cum_seq None) with an unpadded contiguous lse; neither takes GQA here."""

    cpu, cpu_backward = (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                         torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    _scaled_dot_product_flash_attention_for_cpu = cpu
    _scaled_dot_product_flash_attention_for_cpu_backward = cpu_backward

    def _scaled_dot_product_efficient_attention(self, q, k, v, bias, lse_wanted, p, causal, *, scale):
        assert lse_wanted and p == 0 and q.shape[1] == k.shape[1]
        if bias is not None:
            assert bias.dtype == q.dtype and bias.shape == (*q.shape[:3], k.shape[2]) and bias.stride(3) == 1
            assert all(st % 16 == 0 for st in bias.stride()[:3])
        o, l = self.cpu(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        padded = torch.full((*l.shape[:2], -(-l.shape[2] // 32) * 32), 123.0)
        padded[..., :l.shape[2]] = l
        return o.transpose(1, 2).contiguous().transpose(1, 2), padded, torch.empty(()), torch.empty(())

    def _scaled_dot_product_efficient_attention_backward(self, do, q, k, v, bias, o, lse, seed, offset, p, mask,
                                                         causal, *, scale):
        assert o.transpose(1, 2).is_contiguous() and lse.is_contiguous() and lse.shape[2] % 32 == 0
        assert mask == [True, True, True, False] and p == 0
        return (*self.cpu_backward(do, q, k, v, o, lse[..., :q.shape[2]], 0.0, causal, attn_mask=bias, scale=scale),
                None)

    refuse_gqa = False  # as a cuDNN that takes no grouped k/v would: a RuntimeError
    gqa_calls = 0  # calls that took grouped k/v (fewer heads than q), as cuDNN does

    def _grouped(self, q, k, v):
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            if self.refuse_gqa:
                raise RuntimeError("stand-in: cuDNN takes no grouped k/v")
            self.gqa_calls += 1
        return rep, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)

    def _scaled_dot_product_cudnn_attention(self, q, k, v, bias, lse_wanted, p, causal, debug, *, scale):
        assert bias is None and lse_wanted and p == 0 and not debug and q.shape[1] % k.shape[1] == 0
        assert not (causal and q.shape[2] != k.shape[2])
        _, k, v = self._grouped(q, k, v)
        o, l = self.cpu(q, k, v, 0.0, causal, scale=scale)
        return o, l[..., None], None, None, q.shape[2], k.shape[2], torch.empty(()), torch.empty(()), None

    def _scaled_dot_product_cudnn_attention_backward(self, do, q, k, v, o, lse, seed, offset, bias, cum_q, cum_k,
                                                     max_q, max_k, p, causal, *, scale):
        assert bias is None and cum_q is None and cum_k is None and (max_q, max_k) == (q.shape[2], k.shape[2])
        assert lse.shape == (*q.shape[:3], 1) and all(t.is_contiguous() for t in (do, q, k, v, o, lse)) and p == 0
        (b, hkv, s_k, d), (rep, kr, vr) = k.shape, self._grouped(q, k, v)
        dq, dk, dv = self.cpu_backward(do, q, kr, vr, o, lse[..., 0], 0.0, causal, scale=scale)
        return dq, dk.reshape(b, hkv, rep, s_k, d).sum(2), dv.reshape(b, hkv, rep, s_k, d).sum(2)

    def _scaled_dot_product_flash_attention(self, q, k, v, p, causal, debug, *, scale):
        assert q.shape[1] == k.shape[1] and not (causal and q.shape[2] != k.shape[2]) and p == 0
        o, l = self.cpu(q, k, v, 0.0, causal, scale=scale)
        return o.transpose(1, 2).contiguous().transpose(1, 2), l.contiguous(), None, None, q.shape[2], k.shape[2], \
            torch.empty(2, dtype=torch.uint64), torch.empty((), dtype=torch.uint64), torch.empty(0)

    def _scaled_dot_product_flash_attention_backward(self, do, q, k, v, o, lse, cum_q, cum_k, max_q, max_k, p, causal,
                                                     rng_state, unused, *, scale):
        assert cum_q is None and cum_k is None and (max_q, max_k) == (q.shape[2], k.shape[2])
        assert lse.shape == q.shape[:3] and lse.is_contiguous() and rng_state.shape == (2,)
        return self.cpu_backward(do, q, k, v, o, lse, 0.0, causal, scale=scale)


@pytest.mark.parametrize("op", ["cudnn", "cudnn_refusing_gqa", "flash", "efficient"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("docs", [False, True])
def test_cuda_glue_with_cpu_stand_ins(monkeypatch, op, causal, docs):
    """The CUDA paths' plumbing (lse padding and shapes, layouts, GQA fold/repeat/grouped k/v,
    masks) on CPU. cuDNN's causal blocks take the grouped k/v as they are; a cuDNN that
    refuses them makes the blocks repeat k/v from then on."""
    import dtensor_parallel.context_parallel.sdpa_blocks as sdpa

    def kind(q, masked, causal, s_k):
        square = not causal or q.shape[2] == s_k
        return op[:5] if op != "efficient" and not masked and square else "efficient"

    ops = _CudaOpsOnCpu()
    ops.refuse_gqa = op == "cudnn_refusing_gqa"
    monkeypatch.setattr(sdpa, "aten", ops)
    monkeypatch.setattr(sdpa, "_kind", kind)
    monkeypatch.setattr(sdpa, "_CUDNN_GQA", [True])
    _ring_like(torch.float32, "cpu", causal, 4, 2, 16, docs, 1e-5)
    grouped = op == "cudnn" and causal and not docs  # the only unmasked causal blocks go to cuDNN
    assert (ops.gqa_calls > 0) == grouped and sdpa._CUDNN_GQA[0] == (op != "cudnn_refusing_gqa" or not causal
                                                                    or docs)


def test_out_of_memory_is_not_a_gqa_refusal(monkeypatch):
    """cuDNN running out of memory on grouped k/v raises as it is: the blocks do not take it for
    a refusal of the grouped k/v (repeating them would need more memory, and the switch would
    stay off for the rest of the run)."""
    import dtensor_parallel.context_parallel.sdpa_blocks as sdpa

    class _OomOps(_CudaOpsOnCpu):
        def _scaled_dot_product_cudnn_attention(self, *args, **kwargs):
            raise torch.OutOfMemoryError("stand-in: out of memory")

    monkeypatch.setattr(sdpa, "aten", _OomOps())
    monkeypatch.setattr(sdpa, "_kind", lambda q, masked, causal, s_k: "cudnn")
    monkeypatch.setattr(sdpa, "_CUDNN_GQA", [True])
    q, k, v = inputs(1, 4, 2, 16, 16, 16, device="cpu")
    out, lse = torch.empty(1, 4, 16, 16), torch.empty(1, 4, 16)
    with pytest.raises(torch.OutOfMemoryError):
        SdpaBlocks.forward_step(q, k, v, out, lse, True, 0.25, accumulate=False)
    assert sdpa._CUDNN_GQA[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCuda:
    """bf16 through the cuDNN op (no mask; the flash op where cuDNN is switched off) and the
    efficient op (documents, fp32, non-square causal) against the fp32 torch backend on the
    same bf16 inputs."""

    @pytest.mark.parametrize("causal", [False, True])
    @pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4)])
    @pytest.mark.parametrize("docs", [False, True])
    @pytest.mark.parametrize("cudnn", [True, False])
    def test_bf16_block_vs_torch(self, monkeypatch, causal, hq, hkv, docs, cudnn):
        import dtensor_parallel.context_parallel.sdpa_blocks as sdpa

        b, s, d = 2, 200, 64
        q, k, v = inputs(b, hq, hkv, s, s, d, dtype=torch.bfloat16, device="cuda")
        if cudnn and not sdpa._has_cudnn_attention(q.device):
            pytest.skip("no cuDNN attention on this GPU")
        if not cudnn:
            monkeypatch.setattr(sdpa, "_has_cudnn_attention", lambda device: False)
        assert _kind(q, docs, causal, s) == ("efficient" if docs else "cudnn" if cudnn else "flash")
        kw = {}
        if docs:
            doc = (torch.arange(s, device="cuda") // 37).expand(b, s).contiguous()
            kw = {"doc_q": doc, "doc_k": doc}
        scale = d ** -0.5
        out, lse = run_forward(SdpaBlocks, q, k, v, causal, scale, False, **kw)
        o, l = reference(q, k, v, causal, scale, kw.get("doc_q"), kw.get("doc_k"))
        if not docs:
            out_t, lse_t = run_forward(TorchBlocks, q, k, v, causal, scale, False)
            assert rel(out_t, o) < 1e-4
        assert rel(out, o) < 2e-2 and (lse - l).abs().max() < 2e-2
        dout = torch.randn(o.shape, device="cuda").to(torch.bfloat16)
        got = SdpaBlocks.backward_block(dout, q, k, v, o.float(), l.float(), causal, scale, **kw)
        if not docs:
            want = TorchBlocks.backward_block(dout, q, k, v, o.float(), l.float(), causal, scale)
        else:
            qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
            (reference(qr, kr, vr, causal, scale, doc, doc)[0] * dout.double()).sum().backward()
            want = (qr.grad, kr.grad, vr.grad)
        for name, a, w in zip(("dq", "dk", "dv"), got, want):
            assert a.dtype == torch.float32 and rel(a, w) < 3e-2, f"{name}: {rel(a, w):.2e}"
        if cudnn and causal and not docs and hq > hkv:  # the grouped k/v went to cuDNN as they are
            assert sdpa._CUDNN_GQA[0], "cuDNN refused grouped k/v: the causal blocks repeat them"

    @pytest.mark.parametrize("causal", [False, True])
    @pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4)])
    @pytest.mark.parametrize("docs", [False, True])
    def test_bf16_ring_like(self, causal, hq, hkv, docs):
        # block A under causal is non-square (s_q > s_k): the efficient op even without documents
        _ring_like(torch.bfloat16, "cuda", causal, hq, hkv, 64, docs, 3e-2, c=96)

    @pytest.mark.parametrize("causal", [False, True])
    def test_fp32_efficient(self, causal):
        q, k, v = inputs(1, 4, 2, 70, 70, 32, device="cuda")
        assert _kind(q, False, causal, 70) == "efficient"
        out, lse = run_forward(SdpaBlocks, q, k, v, causal, 0.2, False)
        o, l = reference(q, k, v, causal, 0.2)
        assert rel(out, o) < 1e-3 and rel(lse, l) < 1e-3
        dout = torch.randn_like(q)
        got = SdpaBlocks.backward_block(dout, q, k, v, o.float(), l.float(), causal, 0.2)
        want = TorchBlocks.backward_block(dout, q, k, v, o.float(), l.float(), causal, 0.2)
        for a, w in zip(got, want):
            assert rel(a, w) < 1e-3
