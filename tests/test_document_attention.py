"""Causal attention over packed documents (``document_attention.py``, ``context_parallel/ring.py``):
the one-rank path and the ring over 2 and 4 ranks against full attention with a
block-diagonal causal mask in float64, forward and every input gradient, with GQA,
documents that cross the zigzag shards' boundaries and one-token documents."""

from __future__ import annotations

import pytest
import torch

from dtensor_parallel.context_parallel import zigzag_indices
from dtensor_parallel.document_attention import document_causal_attention

from .harness import run_distributed
from .hf_parity import hf_one_step_parity
from .parity import make_documents, make_model, one_step_parity

# document lengths of two sequences of 48 tokens: one-token documents at the start, the end
# and inside; documents crossing every chunk boundary of cp 2 (12 tokens) and cp 4 (6)
DOC_LENGTHS = ([1, 5, 1, 1, 13, 20, 6, 1], [48])


def document_ids(lengths: tuple[list[int], ...]) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths])


def reference(q, k, v, docs, dout):
    """Full attention in float64 with the block-diagonal causal mask, and its gradients."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    s = q.shape[2]
    keep = torch.ones(s, s, dtype=torch.bool).tril() & (docs[:, :, None] == docs[:, None, :])[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=keep)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _inputs(hq: int, hkv: int, d: int, seq: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, h, seq, d, generator=g) for h in (hq, hkv, hkv, hq)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def test_one_rank_document_attention_matches_the_block_diagonal_mask() -> None:
    q, k, v, dout = _inputs(4, 2, 8, 48)
    docs = document_ids(DOC_LENGTHS)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    out = document_causal_attention(*ours, docs)
    out.backward(dout)
    want = reference(q, k, v, docs, dout)
    for got, ref in zip((out, *(t.grad for t in ours)), want):
        assert rel(got, ref) < 1e-6
    # one document per sequence is plain causal attention
    one = torch.zeros(2, 48, dtype=torch.long)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(document_causal_attention(q, k, v, one), causal, rtol=1e-5, atol=1e-6)


def _ring_documents(backend: str, hq: int, hkv: int, d: int, seq: int, per_document: bool) -> float:
    import torch.distributed as dist

    from dtensor_parallel.context_parallel.ring import ring_attention
    from dtensor_parallel.context_parallel.sharding import document_zigzag_indices

    cp, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, dout = _inputs(hq, hkv, d, seq)
    docs = document_ids(DOC_LENGTHS)
    if per_document:  # each row its own shard: pieces of every document, masked by position
        idx = document_zigzag_indices(docs, cp, rank)  # (b, s/cp)
        pick = lambda t: t.gather(2, idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))  # noqa: E731
        positions = idx
    else:  # the sequence-wide zigzag, halved ring steps
        pick, positions = (lambda t: t[:, :, zigzag_indices(seq, cp, rank)]), None
        idx = zigzag_indices(seq, cp, rank).expand(docs.shape[0], -1)
    mine = [pick(t).clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*mine, causal=True, scale=None, group=dist.group.WORLD, backend=backend,
                         document_ids=docs.gather(1, idx), positions=positions)
    out.backward(pick(dout))
    want = reference(q, k, v, docs, dout)
    return max(rel(got, pick(ref)) for got, ref in zip((out, *(t.grad for t in mine)), want))


RING_CASES = [("torch", 2, False), ("torch", 4, False), ("triton", 2, False), ("sdpa", 2, False),
              ("torch", 2, True), ("torch", 4, True), ("sdpa", 2, True), ("triton", 2, True)]


@pytest.mark.parametrize("backend,world,per_document", RING_CASES)
def test_ring_with_documents_matches_the_block_diagonal_mask(backend: str, world: int, per_document: bool) -> None:
    """GQA 4 on 2 heads, head dim 8, 2 x 48 tokens over 2 and 4 ranks, sharded by the
    sequence-wide zigzag or per document; the Triton blocks in the interpreter (fp32)."""
    for err in run_distributed(world, _ring_documents, backend, 4, 2, 8, 48, per_document):
        assert err < 1e-5, err


def test_document_ids_of_the_wrong_shape_are_an_error() -> None:
    q, k, v, _ = _inputs(4, 2, 8, 48)
    with pytest.raises(ValueError, match=r"document_ids of shape \(2, 47\) do not match"):
        document_causal_attention(q, k, v, torch.zeros(2, 47, dtype=torch.long))


def test_packed_llama_equals_each_document_alone() -> None:
    """Independent of our attention code: the packed forward's logits are those of each
    document run alone at the same positions (causal attention of a prefix)."""
    model = make_model("llama")
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    docs = make_documents(2, 32)
    packed = model(x, document_ids=docs)
    for row in range(2):
        for d in docs[row].unique():
            cols = (docs[row] == d).nonzero().flatten()
            alone = model(x[row:row + 1, cols], position_ids=cols[None])
            torch.testing.assert_close(packed[row:row + 1, cols], alone, rtol=1e-5, atol=1e-5)
    assert (packed - model(x)).abs().max() > 1e-2  # the masks differ, and it shows


# our Llama (reference: the same model on one device, whose document attention the tests
# above check) and transformers' Llama (reference: transformers' own packed-sequence mask)
DOC_LAYOUTS = {
    "cp2": (2, {"cp": 2}, {}),
    "cp4": (4, {"cp": 4}, {}),
    "cp2_tp2_sp": (4, {"cp": 2, "tp": 2}, {"sequence_parallel": True}),
    "cp2_pp2": (4, {"cp": 2, "pp": 2}, {"micro_batch_size": 1}),
    "tp2_sp_fsdp2": (4, {"tp": 2, "dp_shard": 2}, {"sequence_parallel": True}),
    "cp2_selective": (2, {"cp": 2}, {"recompute": "selective"}),
    "cp2_triton": (2, {"cp": 2}, {"kernels": {"attention": "triton"}}),  # (the interpreter here)
    "cp2_sdpa": (2, {"cp": 2}, {"kernels": {"attention": "sdpa"}}),
}


@pytest.mark.parametrize("layout", list(DOC_LAYOUTS))
def test_packed_documents_match_one_device(layout: str) -> None:
    world, mesh_kwargs, plan_kwargs = DOC_LAYOUTS[layout]
    losses = run_distributed(world, one_step_parity, "llama", mesh_kwargs, plan_kwargs, batch=4, seq=32,
                             documents=True)
    assert len(set(losses)) == 1


@pytest.mark.parametrize("arch,layout", [("llama", "cp2"), ("llama", "cp2_tp2_sp"), ("qwen3", "cp2_pp2")])
def test_transformers_packed_documents_match_transformers(arch: str, layout: str) -> None:
    world, mesh_kwargs, plan_kwargs = DOC_LAYOUTS[layout]
    losses = run_distributed(world, hf_one_step_parity, arch, mesh_kwargs, plan_kwargs, seq=32, documents=True)
    assert len(set(losses)) == 1


def _forward_logits_with_documents() -> float:
    """pm(x, document_ids=...) under CP2: this rank's logits, at its per-document shard's
    positions, against the one-device model's."""
    import copy

    import torch.distributed as dist

    from dtensor_parallel import build_mesh, parallelize
    from dtensor_parallel.context_parallel.sharding import document_zigzag_indices

    from .parity import make_batch, plan_for, rel_err

    ref = make_model("llama")
    pm = parallelize(copy.deepcopy(ref), build_mesh(cp=2), plan_for("llama"))
    x, _ = make_batch(128, 2, 32)
    docs = make_documents(2, 32)
    with torch.no_grad():
        want = ref(x, document_ids=docs)
        got = pm(x, document_ids=docs)
    idx = document_zigzag_indices(docs, 2, dist.get_rank())
    return rel_err(got, want.gather(1, idx[..., None].expand(-1, -1, want.shape[-1])))


def test_forward_with_documents_gives_the_shards_logits() -> None:
    for err in run_distributed(2, _forward_logits_with_documents):
        assert err < 1e-5, err


def _toy_with_documents() -> str:
    from dtensor_parallel import build_mesh, parallelize

    from .parity import make_batch, plan_for

    pm = parallelize(make_model("toy"), build_mesh(cp=2), plan_for("toy"))
    x, y = make_batch(64, 2, 16)
    with pytest.raises(ValueError) as e:
        pm.forward_backward(x, y, document_ids=torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"document_ids decrease along sequence 1"):
        pm.forward_backward(x, y, document_ids=torch.tensor([[0] * 16, [1] * 8 + [0] * 8]))
    return str(e.value)


def test_a_model_without_document_ids_is_refused() -> None:
    """The toy model calls SDPA itself and takes no document_ids: a ValueError before the
    forward, not a silently unmasked attention; ids that decrease are refused too."""
    for msg in run_distributed(2, _toy_with_documents):
        assert "ToyGPT.forward takes no document_ids" in msg, msg


def _ring_forwards(recompute: str) -> int:
    """How many ring forwards one CP2 training step of the 4-layer Llama runs."""
    from dtensor_parallel.context_parallel import ring

    calls = []
    real = ring._forward
    def spy(*args):  # (the ring's, not the one-device reference's one-rank calls)
        calls.extend([1] if args[7].size > 1 else [])
        return real(*args)

    ring._forward = spy
    try:
        one_step_parity("llama", {"cp": 2}, {"recompute": recompute}, batch=2, seq=32, documents=True)
    finally:
        ring._forward = real
    return len(calls)


def test_selective_recompute_keeps_the_ring_output() -> None:
    """Selective recompute saves the ring op's output (a recompute would rerun the ring's
    communication); full recompute reruns it, once more per layer."""
    assert run_distributed(2, _ring_forwards, "selective") == [4, 4]
    assert run_distributed(2, _ring_forwards, "full") == [8, 8]


def test_document_zigzag_balances_work_and_covers_each_row_once() -> None:
    """Attended (query, key) pairs per rank of 8192-token rows of random documents (mean
    512 tokens, one-token ones too) over cp 4: the per-document zigzag within 2% of the
    mean, where the sequence-wide zigzag is far off; every token on exactly one rank, in
    order, the same count on every rank."""
    from dtensor_parallel.context_parallel.sharding import document_zigzag_indices

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(2):
        lengths = torch.randint(1, 1024, (64,), generator=g)
        lengths[::7] = 1
        rows.append(torch.repeat_interleave(torch.arange(64), lengths)[:8192])
    docs, cp = torch.stack(rows), 4
    start = torch.ones_like(docs, dtype=torch.bool)
    start[:, 1:] = docs[:, 1:] != docs[:, :-1]
    idx = torch.arange(8192).expand_as(docs)
    work = (idx - torch.where(start, idx, 0).cummax(1).values + 1).double()  # keys each token sees
    shards = [document_zigzag_indices(docs, cp, r) for r in range(cp)]
    assert (torch.cat(shards, 1).sort(1).values == idx).all()
    assert all((sh[:, 1:] > sh[:, :-1]).all() for sh in shards)
    per_doc = torch.stack([work.gather(1, sh).sum(1) for sh in shards])  # (cp, b)
    sequence_wide = torch.stack([work[:, zigzag_indices(8192, cp, r)].sum(1) for r in range(cp)])
    assert (per_doc.max(0).values / per_doc.mean(0)).max() < 1.02, per_doc
    assert (sequence_wide.max(0).values / sequence_wide.mean(0)).max() > 1.05, sequence_wide
