"""Global token positions in the flash attention kernels' document masks: query i sees key
j when their documents match and pos_k[j] <= pos_q[i], for position-sorted subsets of a
sequence (how context parallelism shards each document: ``document_zigzag_indices``), against
fp64 references, as a ring of three shards against whole attention, and with NaN where the
mask hides values (the kernels must not read them).
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
from triton_kernels.flash_attention_documents import document_mask, document_ranges

from .kernel_checks import ATOL, DEVICE, check_against_torch, rel_err
from .test_flash_attention import _inputs, _run
from .test_flash_attention_documents import _finite, _ids

# A row that sees no key has lse = m + log2(0) = -inf by design; numpy (the interpreter) warns.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

PACKED = [1, 30, 1, 1, 40, 23]  # 96 tokens, one-token documents among them
NEG_INF = float("-inf")


def _tokens(doc: torch.Tensor, idx: torch.Tensor) -> dict:
    """Ids and global positions of the tokens ``idx`` (sorted, CPU) of a packed row (1, s)."""
    return {"doc": doc[:, idx.to(doc.device)], "pos": idx[None].to(DEVICE)}


def _pos_kw(qt: dict, kt: dict) -> dict:
    return {"causal": False, "doc_q": qt["doc"], "doc_k": kt["doc"], "pos_q": qt["pos"], "pos_k": kt["pos"]}


def _positions_case() -> tuple[dict, dict]:
    """Queries (2, 64) and keys (2, 32): row 0 the tokens i % 3 != 1 of a 96-token packed
    sequence and the others; row 1 two random sorted subsets of another packing."""
    g = torch.Generator().manual_seed(3)
    i = torch.arange(96)
    q_idx = [i[i % 3 != 1], torch.randperm(96, generator=g)[:64].sort().values]
    k_idx = [i[i % 3 == 1], torch.randperm(96, generator=g)[:32].sort().values]
    docs = _ids(PACKED, [50, 1, 45])
    rows = [(_tokens(docs[r:r + 1], q_idx[r]), _tokens(docs[r:r + 1], k_idx[r])) for r in range(2)]
    qt, kt = ({key: torch.cat([row[side][key] for row in rows]) for key in ("doc", "pos")} for side in (0, 1))
    kt["pos"] = kt["pos"].int()  # int64 query positions, int32 key positions
    return qt, kt


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (2, 2, 24)])  # GQA and MHA; head dim 24 padded to 32
def test_positions_forward_backward(hq, hkv, d):
    """Interleaved subsets of one sequence: query i sees key j iff same document and
    pos_k[j] <= pos_q[i]; some rows see nothing (out 0, lse -inf), some keys nobody sees."""
    torch.manual_seed(10)
    qt, kt = _positions_case()
    q, k, v = _inputs(2, hq, hkv, 64, 32, d, torch.float32)
    dout, dlse = torch.randn(2, hq, 64, d, device=DEVICE), torch.randn(2, hq, 64, device=DEVICE)
    kw = _pos_kw(qt, kt)
    got = _run(lambda *a: flash_attention(*a, **kw), q, k, v, dout, dlse)
    same = _run(lambda *a: attention_ref(*a, upcast=False, **kw), q, k, v, dout, dlse)
    ref = _run(lambda *a: attention_ref(*a, **kw), *(t.double() for t in (q, k, v)), dout.double(), dlse.double())

    keep = document_mask(qt["doc"], kt["doc"], qt["pos"], kt["pos"])  # (2, 1, 64, 32)
    assert (~keep.any(-1)).any() and (~keep.any(-2)).any() and keep.any(-1).any()
    assert torch.equal(got[1] == NEG_INF, (~keep.any(-1)).expand(-1, hq, -1))
    for name, g, s, r in zip(("out", "lse", "dq", "dk", "dv"), got, same, ref):
        assert torch.isfinite(_finite(g)).all(), name
        check_against_torch(name, _finite(g), _finite(s), _finite(r), ATOL[torch.float32])


def test_position_ranges_match_brute_force():
    qt, kt = _positions_case()
    docs = document_ranges(qt["doc"], kt["doc"], qt["pos"], kt["pos"])
    keep = document_mask(qt["doc"], kt["doc"], qt["pos"], kt["pos"])[:, 0]  # (2, 64, 32)
    for b in range(2):
        for i in range(64):
            assert keep[b, i].nonzero().flatten().tolist() == list(range(docs.kv_lo[b, i], docs.kv_hi[b, i]))
        for j in range(32):
            assert keep[b, :, j].nonzero().flatten().tolist() == list(range(docs.q_lo[b, j], docs.q_hi[b, j]))


def test_ring_with_positions_equals_whole():
    """Three ranks hold random position-sorted shards of one packed sequence (so every rank's
    keys interleave in position with every other rank's queries). Each rank starts on its own
    block (accumulate=False, over NaN buffers) and merges the others'; rows that see no key of
    a block keep their running result bit for bit. The backward of every (query, key) shard
    pair with the final out/lse, summed, and the merged forward equal whole attention with the
    block-diagonal causal mask."""
    torch.manual_seed(11)
    doc = _ids(PACKED)  # (1, 96)
    q, k, v = _inputs(1, 4, 2, 96, 96, 16, torch.float32)
    dout = torch.randn_like(q)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(12))
    shards = [perm[a:b].sort().values for a, b in ((0, 40), (40, 72), (72, 96))]
    toks = [_tokens(doc, idx) for idx in shards]
    part = [lambda t, r=r: t[:, :, shards[r].to(t.device)] for r in range(3)]
    outs, lses, blind_rows = [], [], 0
    for i in range(3):
        out = torch.full_like(part[i](q), float("nan"))
        lse = torch.full(out.shape[:3], float("nan"), device=DEVICE)
        for j in (i, *(r for r in range(3) if r != i)):
            before_o, before_l = out.clone(), lse.clone()
            flash_attention_ring_step(part[i](q), part[j](k), part[j](v), out, lse, accumulate=j != i,
                                      **_pos_kw(toks[i], toks[j]))
            blind = ~document_mask(toks[i]["doc"], toks[j]["doc"], toks[i]["pos"], toks[j]["pos"]).any(-1)[0, 0]
            if j != i:
                assert torch.equal(out[:, :, blind], before_o[:, :, blind])
                assert torch.equal(lse[:, :, blind], before_l[:, :, blind])
                blind_rows += int(blind.sum())
        outs.append(out)
        lses.append(lse)
    assert blind_rows > 0
    got = [torch.zeros_like(q), torch.zeros(1, 4, 96, device=DEVICE)] + [torch.zeros_like(t) for t in (q, k, v)]
    for i in range(3):
        got[0][:, :, shards[i]], got[1][:, :, shards[i]] = outs[i], lses[i]
        for j in range(3):
            grads = flash_attention_backward(part[i](q), part[j](k), part[j](v), outs[i], lses[i], part[i](dout),
                                             grad_dtype=torch.float32, **_pos_kw(toks[i], toks[j]))
            for g, r, t in zip(got[2:], (i, j, j), grads):
                g[:, :, shards[r]] += t
    ref = _run(lambda *a: attention_ref(*a, causal=True, doc_q=doc, doc_k=doc),
               *(t.double() for t in (q, k, v)), dout.double(), None)
    for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert rel_err(g, r) < 1e-5, name


def test_positions_never_read_what_the_mask_hides():
    """Keys: every token of documents [30, 40, 26]; queries: document 0's first 20 tokens and
    every other token of documents 1 and 2. Document 0's keys 20..29 are seen by no query yet
    lie inside the key span of the one query block (rows of documents 0 to 2): filled with
    NaN they must not be loaded. Then the mirror: all 96 tokens as queries, the odd ones as
    keys; the rows that see no key (each document's first token) hold NaN in q and dout. Both
    runs equal the clean ones bit for bit, and match the reference."""
    torch.manual_seed(13)
    doc, i = _ids([30, 40, 26]), torch.arange(96)
    for q_idx, k_idx, hide_keys in ((torch.cat([i[:20], i[30::2]]), i, True), (i, i[1::2], False)):
        qt, kt = _tokens(doc, q_idx), _tokens(doc, k_idx)
        kw = _pos_kw(qt, kt)
        q, k, v = _inputs(1, 4, 2, len(q_idx), len(k_idx), 16, torch.float32)
        dout = torch.randn_like(q)
        keep = document_mask(qt["doc"], kt["doc"], qt["pos"], kt["pos"])[0, 0]  # (s_q, s_k)
        hidden = ~keep.any(0 if hide_keys else 1)
        assert hidden.sum() > (10 if hide_keys else 2)
        dirty = [t.clone() for t in (q, k, v, dout)]
        for t in (dirty[1:3] if hide_keys else dirty[0:4:3]):
            t[:, :, hidden] = float("nan")
        out, lse = flash_attention(dirty[0], dirty[1], dirty[2], **kw)
        got = (out, lse, *flash_attention_backward(*dirty[:3], out, lse, dirty[3], **kw))
        clean_out, clean_lse = flash_attention(q, k, v, **kw)
        clean = (clean_out, clean_lse, *flash_attention_backward(q, k, v, clean_out, clean_lse, dout, **kw))
        ref = _run(lambda *a: attention_ref(*a, **kw), *(t.double() for t in (q, k, v)), dout.double(), None)
        for name, g, c, r in zip(("out", "lse", "dq", "dk", "dv"), got, clean, ref):
            assert torch.equal(g, c), f"{name}: a value the mask hides was read"
            assert rel_err(_finite(g), _finite(r)) < 1e-5, name
        zero_grads = (got[3], got[4]) if hide_keys else (got[0], got[2])
        assert all(not t[:, :, hidden].any() for t in zero_grads)


def test_position_errors():
    q, k, v = _inputs(1, 4, 2, 16, 24, 16, torch.float32)
    doc_q, doc_k = (torch.zeros(1, n, dtype=torch.int64, device=DEVICE) for n in (16, 24))
    pos_q, pos_k = (torch.arange(n, device=DEVICE)[None] for n in (16, 24))
    with pytest.raises(ValueError, match=r"pos_q/pos_k refine a document mask: pass doc_q and doc_k"):
        flash_attention(q, k, v, causal=False, pos_q=pos_q, pos_k=pos_k)
    with pytest.raises(ValueError, match="pass causal=False with pos_q/pos_k"):
        flash_attention_ring_step(q, k, v, None, None, causal=True, doc_q=doc_q, doc_k=doc_k, pos_q=pos_q,
                                  pos_k=pos_k)
    with pytest.raises(ValueError, match="got only pos_q"):
        attention_ref(q, k, v, causal=False, doc_q=doc_q, doc_k=doc_k, pos_q=pos_q)
    with pytest.raises(ValueError, match=r"pos_k must be \(batch, seq\) = \(1, 24\)"):
        flash_attention_backward(q, k, v, q, torch.zeros(1, 4, 16), q, causal=False, doc_q=doc_q, doc_k=doc_k,
                                 pos_q=pos_q, pos_k=pos_q)
    with pytest.raises(ValueError, match=r"pos_q must hold integer global token positions.*pos_q.long\(\)"):
        flash_attention(q, k, v, causal=False, doc_q=doc_q, doc_k=doc_k, pos_q=pos_q.float(), pos_k=pos_k)
