"""Document masks (packed sequences) in the flash attention kernels, against PyTorch.

Same tolerance rule as ``test_flash_attention.py`` (kernel error at most twice PyTorch's own
in the input dtype, plus atol, against fp64 :func:`attention_ref` with the same mask). The
documents are laid out to hit the edges: one-token documents, documents crossing the
interpreter's blocks (64 x 32), documents present among the queries but not the keys (rows
that see no key: out 0, lse -inf) and the reverse (keys nobody sees: zero dK/dV). The skip
tests put NaN where a kernel that only masked, instead of skipping, would read it. Global
positions (causal by position over position-sorted subsets): ``test_flash_attention_positions.py``.
"""

from __future__ import annotations

import pytest
import torch

from triton_kernels.flash_attention import (
    attention_ref,
    flash_attention,
    flash_attention_backward,
    flash_attention_ring_step,
)
from triton_kernels.flash_attention_documents import document_ranges

from .kernel_checks import ATOL, DEVICE, check_against_torch, rel_err
from .test_flash_attention import _inputs, _run

# A row that sees no key has lse = m + log2(0) = -inf by design; numpy (the interpreter) warns.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")


def _ids(*lengths_per_row: list[int], first: int = 0) -> torch.Tensor:
    """Document ids (b, s), one row per list of document lengths; ids count up from ``first``
    and skip a number wherever a length is 0 (a document absent from this sequence)."""
    rows = []
    for lengths in lengths_per_row:
        rows.append(torch.cat([torch.full((n,), first + i, dtype=torch.int64) for i, n in enumerate(lengths)]))
    return torch.stack(rows).to(DEVICE)


# Query and key documents per case. s_q == s_k: the same packing; s_q != s_k: doc 2 has no
# key (its rows see nothing) and doc 3 no query (its keys get zero gradients).
DOCS_EQUAL = ([1, 37, 1, 1, 30, 10], [70, 1, 9])  # two rows: 80 tokens each
DOCS_Q = ([3, 40, 5, 0, 22], [1, 1, 60, 0, 8])  # 70 queries
DOCS_K = ([10, 35, 0, 30, 15], [2, 30, 0, 50, 8])  # 90 keys

CASES = [
    # (hq, hkv, s_q, s_k, d, causal, dtype)
    (4, 2, 80, 80, 16, True, torch.float32),
    (4, 2, 80, 80, 16, False, torch.float32),
    (2, 2, 70, 90, 16, True, torch.float32),
    (4, 2, 70, 90, 24, False, torch.float32),  # head dim 24: padded to 32
    (2, 2, 80, 80, 8, True, torch.float16),  # head dim 8: padded to 16
    (4, 2, 80, 80, 16, True, torch.bfloat16),  # bf16 loads upcast under the interpreter
]


def _case_ids(s_q: int, s_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if s_q == s_k:
        return _ids(*DOCS_EQUAL), _ids(*DOCS_EQUAL).int()  # int64 queries, int32 keys
    return _ids(*DOCS_Q), _ids(*DOCS_K)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return lse.masked_fill(lse == float("-inf"), 0.0)


@pytest.mark.parametrize("hq,hkv,s_q,s_k,d,causal,dtype", CASES)
def test_documents_forward_backward(hq, hkv, s_q, s_k, d, causal, dtype):
    torch.manual_seed(0)
    doc_q, doc_k = _case_ids(s_q, s_k)
    q, k, v = _inputs(2, hq, hkv, s_q, s_k, d, dtype)
    dout = torch.randn(2, hq, s_q, d, device=DEVICE, dtype=dtype)
    dlse = torch.randn(2, hq, s_q, device=DEVICE, dtype=torch.float32)
    kw = {"causal": causal, "doc_q": doc_q, "doc_k": doc_k}

    got = _run(lambda *a: flash_attention(*a, **kw), q, k, v, dout, dlse)
    same = _run(lambda *a: attention_ref(*a, upcast=False, **kw), q, k, v, dout, dlse)
    ref = _run(lambda *a: attention_ref(*a, **kw), *(t.double() for t in (q, k, v)), dout.double(), dlse.double())

    unseen = ref[1] == float("-inf")  # rows whose document has no visible key
    assert unseen.any() == (s_q != s_k)  # equal packing: every row sees at least itself
    assert torch.equal(got[1] == float("-inf"), unseen)
    assert not got[0][unseen[..., None].expand_as(got[0])].any()  # out 0 there
    for name, g, s, r in zip(("out", "lse", "dq", "dk", "dv"), got, same, ref):
        assert torch.isfinite(_finite(g) if name == "lse" else g).all(), name
        if name == "lse":
            g, s, r = _finite(g), _finite(s), _finite(r)
        check_against_torch(name, g, s, r, ATOL[dtype])


def test_document_ranges_match_brute_force():
    doc_q, doc_k = _ids(*DOCS_Q), _ids(*DOCS_K)
    docs = document_ranges(doc_q, doc_k.int())
    for b in range(2):
        for i in range(doc_q.shape[1]):
            hits = (doc_k[b] == doc_q[b, i]).nonzero().flatten().tolist()
            lo, hi = docs.kv_lo[b, i].item(), docs.kv_hi[b, i].item()
            assert (hits == list(range(lo, hi))) and (hits or lo == hi), (b, i)
        for j in range(doc_k.shape[1]):
            hits = (doc_q[b] == doc_k[b, j]).nonzero().flatten().tolist()
            assert hits == list(range(docs.q_lo[b, j].item(), docs.q_hi[b, j].item())), (b, j)
    assert docs.kv_lo.dtype == torch.int32 and docs.q_hi.shape == doc_k.shape


# ----------------------------------------------------------------------------------------
# Ring steps
# ----------------------------------------------------------------------------------------


def test_ring_step_rows_without_keys_keep_their_result():
    """Block 2 holds only documents 2 and 3: rows of documents 0 and 1 see none of its keys and
    must keep their running (out, lse) bit for bit; the others merge to attention over both
    blocks (document 3's rows saw no key in block 1). accumulate=False on the same block
    writes out 0, lse -inf for those rows."""
    torch.manual_seed(4)
    doc_q = _ids([20, 30, 14, 16])  # docs 0..3, 80 queries
    doc_k1, doc_k2 = _ids([30, 20, 10]), _ids([0, 0, 25, 25])  # block 1: docs 0..2, block 2: docs 2, 3
    q, k, v = _inputs(1, 4, 2, 80, 110, 32, torch.float32)
    k1, v1, k2, v2 = k[:, :, :60], v[:, :, :60], k[:, :, 60:], v[:, :, 60:]
    out, lse = flash_attention_ring_step(q, k1, v1, None, None, causal=False, doc_q=doc_q, doc_k=doc_k1)
    assert (lse[:, :, 64:] == float("-inf")).all() and torch.isfinite(lse[:, :, :64]).all()  # doc 3: no key yet
    before_o, before_l = out.clone(), lse.clone()
    flash_attention_ring_step(q, k2, v2, out, lse, causal=False, doc_q=doc_q, doc_k=doc_k2)
    assert torch.equal(out[:, :, :50], before_o[:, :, :50]) and torch.equal(lse[:, :, :50], before_l[:, :, :50])
    doc_k = torch.cat([doc_k1, doc_k2], dim=1)
    ref_o, ref_l = attention_ref(q.double(), k.double(), v.double(), causal=False, doc_q=doc_q, doc_k=doc_k)
    assert rel_err(out, ref_o) < 1e-6 and rel_err(lse, ref_l) < 1e-6

    out = torch.full((1, 4, 80, 32), float("nan"), device=DEVICE)
    lse = torch.full((1, 4, 80), float("nan"), device=DEVICE)
    flash_attention_ring_step(q, k2, v2, out, lse, causal=False, accumulate=False, doc_q=doc_q, doc_k=doc_k2)
    assert not out[:, :, :50].any() and (lse[:, :, :50] == float("-inf")).all()
    blk_o, blk_l = attention_ref(q.double(), k2.double(), v2.double(), causal=False, doc_q=doc_q, doc_k=doc_k2)
    assert rel_err(out[:, :, 50:], blk_o[:, :, 50:]) < 1e-6 and rel_err(lse[:, :, 50:], blk_l[:, :, 50:]) < 1e-6


def test_ring_step_skips_a_block_of_other_documents():
    """A K/V block of NaN whose documents no query shares: nothing of it may be read."""
    torch.manual_seed(5)
    q, k, v = _inputs(1, 2, 1, 40, 40, 16, torch.float32)
    doc_q, doc_k = _ids([15, 25]), _ids([0, 0, 40])
    out, lse = flash_attention_ring_step(q, k, v, None, None, causal=False, doc_q=doc_q, doc_k=_ids([40]))
    before_o, before_l = out.clone(), lse.clone()
    nan = torch.full_like(k, float("nan"))
    flash_attention_ring_step(q, nan, nan, out, lse, causal=True, doc_q=doc_q, doc_k=doc_k)
    assert torch.equal(out, before_o) and torch.equal(lse, before_l)


def _ring(q, k, v, dout, doc_q, doc_k, n: int):
    """n simulated ranks with document ids (as ``test_flash_attention._ring_forward`` and
    ``_ring_backward``): out, lse, dq, dk, dv concatenated over ranks."""
    qs, ks, vs, dos = q.chunk(n, dim=2), k.chunk(n, dim=2), v.chunk(n, dim=2), dout.chunk(n, dim=2)
    dqs, dks = doc_q.chunk(n, dim=1), doc_k.chunk(n, dim=1)
    outs, lses = [], []
    for i in range(n):
        out = lse = None
        for j in range(i, -1, -1):
            out, lse = flash_attention_ring_step(qs[i], ks[j], vs[j], out, lse, causal=(j == i),
                                                 doc_q=dqs[i], doc_k=dks[j])
        outs.append(out)
        lses.append(lse)
    dq = [torch.zeros(t.shape, device=t.device) for t in qs]
    dk = [torch.zeros(t.shape, device=t.device) for t in ks]
    dv = [torch.zeros(t.shape, device=t.device) for t in vs]
    for i in range(n):
        for j in range(i + 1):
            gq, gk, gv = flash_attention_backward(qs[i], ks[j], vs[j], outs[i], lses[i], dos[i], causal=(j == i),
                                                  grad_dtype=torch.float32, doc_q=dqs[i], doc_k=dks[j])
            dq[i] += gq
            dk[j] += gk
            dv[j] += gv
    return tuple(torch.cat(t, dim=2) for t in (outs, lses, dq, dk, dv))


def test_ring_with_documents_equals_whole():
    """Three ranks of 40 tokens, documents crossing the ranks' borders and the blocks, one
    document of one token: the merged ring forward and summed backward equal whole attention."""
    torch.manual_seed(6)
    doc = _ids([30, 1, 45, 20, 24])  # 120 tokens
    q, k, v = _inputs(1, 4, 2, 120, 120, 16, torch.float32)
    dout = torch.randn_like(q)
    got = _ring(q, k, v, dout, doc, doc, 3)
    kw = {"causal": True, "doc_q": doc, "doc_k": doc}
    ref = _run(lambda *a: attention_ref(*a, **kw), *(t.double() for t in (q, k, v)), dout.double(), None)
    whole = _run(lambda *a: flash_attention(*a, **kw), q, k, v, dout, None)
    for name, g, w, r in zip(("out", "lse", "dq", "dk", "dv"), got, whole, ref):
        assert rel_err(g, r) < 1e-5 and rel_err(w, r) < 1e-5, name


# ----------------------------------------------------------------------------------------
# The skip is real: NaN outside the ranges
# ----------------------------------------------------------------------------------------


def test_keys_outside_the_ranges_are_never_read():
    """Queries hold documents 1 and 2; the keys also hold documents 0 and 3 (45 and 40 tokens,
    not block aligned), filled with NaN. A kernel that loaded them and only masked the scores
    would get NaN through ``P @ V`` (0 * NaN); ours never loads them: out, lse and dq equal
    attention over clean keys, and the NaN keys get zero dK/dV."""
    torch.manual_seed(7)
    doc_q, doc_k = _ids([0, 35, 45], first=0), _ids([45, 20, 30, 40])  # 80 queries, 135 keys
    q, k, v = _inputs(1, 4, 2, 80, 135, 16, torch.float32)
    dout = torch.randn_like(q)
    hidden = (doc_k[0] == 0) | (doc_k[0] == 3)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, hidden] = float("nan")
    v_nan[:, :, hidden] = float("nan")
    for causal in (False, True):
        kw = {"causal": causal, "doc_q": doc_q, "doc_k": doc_k}
        got = _run(lambda *a: flash_attention(*a, **kw), q, k_nan, v_nan, dout, None)
        ref = _run(lambda *a: attention_ref(*a, **kw), *(t.double() for t in (q, k, v)), dout.double(), None)
        for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
            g, r = _finite(g), _finite(r)
            assert torch.isfinite(g).all(), f"{name} (causal={causal}) read a key outside the ranges"
            assert rel_err(g, r) < 1e-5, name
        assert not got[3][:, :, hidden].any() and not got[4][:, :, hidden].any()


def test_queries_outside_the_ranges_are_never_read():
    """The mirror for the dK/dV kernel: query rows of documents the keys lack hold NaN (q and
    dout); they get out 0 and lse -inf, and dK/dV stay exact."""
    torch.manual_seed(8)
    doc_q, doc_k = _ids([40, 30, 50]), _ids([0, 60])  # only document 1 has keys
    q, k, v = _inputs(1, 2, 1, 120, 60, 16, torch.float32)
    dout = torch.randn_like(q)
    hidden = doc_q[0] != 1
    q_nan, dout_nan = q.clone(), dout.clone()
    q_nan[:, :, hidden] = float("nan")
    dout_nan[:, :, hidden] = float("nan")
    kw = {"causal": False, "doc_q": doc_q, "doc_k": doc_k}
    out, lse = flash_attention(q_nan, k, v, **kw)
    assert not out[:, :, hidden].any() and (lse[:, :, hidden] == float("-inf")).all()
    dq, dk, dv = flash_attention_backward(q_nan, k, v, out, lse, dout_nan, **kw)
    ref = _run(lambda *a: attention_ref(*a, **kw), *(t.double() for t in (q, k, v)), dout.double(), None)
    assert rel_err(dk, ref[3]) < 1e-5 and rel_err(dv, ref[4]) < 1e-5
    assert rel_err(dq[:, :, ~hidden], ref[2][:, :, ~hidden]) < 1e-5


def test_document_errors():
    q, k, v = _inputs(1, 4, 2, 16, 24, 16, torch.float32)
    doc_q = torch.zeros(1, 16, dtype=torch.int64, device=DEVICE)
    doc_k = torch.zeros(1, 24, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="pass both doc_q .* or neither; got only doc_q"):
        flash_attention(q, k, v, causal=True, doc_q=doc_q)
    with pytest.raises(ValueError, match="got only doc_k"):
        flash_attention_ring_step(q, k, v, None, None, causal=True, doc_k=doc_k)
    with pytest.raises(ValueError, match=r"doc_k must be \(batch, seq\) = \(1, 24\)"):
        flash_attention(q, k, v, causal=True, doc_q=doc_q, doc_k=doc_q)
    with pytest.raises(ValueError, match=r"doc_q must hold integer document ids.*doc_q.long\(\)"):
        flash_attention_backward(q, k, v, q, torch.zeros(1, 4, 16), q, causal=True, doc_q=doc_q.float(),
                                 doc_k=doc_k)
    with pytest.raises(ValueError, match=r"doc_q is on meta.*doc_q.to\(q.device\)"):
        attention_ref(q, k, v, causal=True, doc_q=doc_q.to("meta"), doc_k=doc_k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestGPU:
    """bf16 at real sizes (what documents save is measured by benchmarks/ring_attention.py,
    never by a timed test)."""

    @staticmethod
    def _packed(b: int, s: int, mean_len: int, seed: int) -> torch.Tensor:
        """Random document lengths around ``mean_len`` (some of one token), ids (b, s) on CUDA."""
        g = torch.Generator().manual_seed(seed)
        rows = []
        for _ in range(b):
            lengths, total = [], 0
            while total < s:
                one_token = torch.rand(1, generator=g).item() < 0.1
                n = 1 if one_token else int(torch.randint(1, 2 * mean_len, (1,), generator=g))
                lengths.append(min(n, s - total))
                total += lengths[-1]
            rows.append(lengths)
        return _ids(*rows).cuda()

    @pytest.mark.parametrize("causal", [True, False])
    def test_bf16_documents(self, causal):
        torch.manual_seed(0)
        dtype = torch.bfloat16
        q, k, v = _inputs(2, 8, 2, 4096, 4096, 128, dtype, device="cuda")
        doc = self._packed(2, 4096, 700, seed=1)
        dout = torch.randn_like(q)
        kw = {"causal": causal, "doc_q": doc, "doc_k": doc}
        got = _run(lambda *a: flash_attention(*a, **kw), q, k, v, dout, None)
        same = _run(lambda *a: attention_ref(*a, upcast=False, **kw), q, k, v, dout, None)
        ref = _run(lambda *a: attention_ref(*a, **kw), *(t.float() for t in (q, k, v)), dout.float(), None)
        for name, g, s, r in zip(("out", "lse", "dq", "dk", "dv"), got, same, ref):
            check_against_torch(name, g, s, r, ATOL[dtype])
