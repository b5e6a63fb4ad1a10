"""The Llama 3 reference model: published shapes, Llama 3.1 RoPE scaling, meta init,
shape-inferred head counts."""

from __future__ import annotations

import math

import pytest
import torch

from dtensor_parallel.models import LLAMA3_FLAVOURS, Llama, llama3_args
from dtensor_parallel.models.llama import apply_rope, rope_cache

from .parity import TINY_LLAMA


@pytest.mark.parametrize("flavour,params_b,ffn", [("8B", 8.03, 14336), ("70B", 70.55, 28672), ("405B", 405.85, 53248)])
def test_published_shapes(flavour: str, params_b: float, ffn: int) -> None:
    args = llama3_args(flavour)
    assert args.ffn_hidden_dim == ffn
    assert round(args.num_params() / 1e9, 2) == params_b
    with torch.device("meta"):
        model = Llama(args)
    assert sum(p.numel() for p in model.parameters()) == args.num_params()


def test_rope_llama31_scaling() -> None:
    """High frequencies (wavelength < 8192/4) unchanged, low ones (> 8192) divided by 8,
    the band between interpolated; checked against the formula from the Llama 3.1 paper's
    reference code written out here element by element."""
    args = llama3_args("8B", max_seq_len=16)
    cache = rope_cache(args)
    base = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    for i, f in enumerate(base.tolist()):
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want = f
        elif wavelen > 8192 / 1:
            want = f / 8
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - smooth) * f / 8 + smooth * f
        angle = math.atan2(cache[1, i, 1].item(), cache[1, i, 0].item())  # position 1
        assert angle == pytest.approx(want, rel=1e-5, abs=1e-7)
    scaled = [f for f in base.tolist() if 2 * math.pi / f > 8192]
    assert scaled, "the 8B flavour has frequencies in the scaled band"


def test_rope_rotates_pairs_and_keeps_norm() -> None:
    args = TINY_LLAMA
    x = torch.randn(2, 8, 3, args.head_dim)
    out = apply_rope(x, rope_cache(args))
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0: identity
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    # relative position: <rope(q)_m, rope(k)_n> depends only on m - n
    q, k = torch.randn(args.head_dim), torch.randn(args.head_dim)
    qs = apply_rope(q.expand(1, 8, 1, -1).contiguous(), rope_cache(args))[0, :, 0]
    ks = apply_rope(k.expand(1, 8, 1, -1).contiguous(), rope_cache(args))[0, :, 0]
    assert torch.dot(qs[5], ks[3]).item() == pytest.approx(torch.dot(qs[4], ks[2]).item(), rel=1e-4)


def test_meta_build_then_init() -> None:
    with torch.device("meta"):
        model = Llama(TINY_LLAMA)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.layers["1"].attention.wo.weight.std().item() == pytest.approx(0.02 / 2, rel=0.2)
    logits = model(torch.randint(0, TINY_LLAMA.vocab_size, (2, 8)))
    assert logits.shape == (2, 8, TINY_LLAMA.vocab_size)


def test_gqa_matches_explicit_mha() -> None:
    """GQA with kv heads repeated equals MHA whose k/v weights repeat each kv head."""
    torch.manual_seed(0)
    gqa = Llama(TINY_LLAMA)
    gqa.init_weights()
    mha = Llama(TINY_LLAMA.__class__(**{**TINY_LLAMA.__dict__, "n_kv_heads": TINY_LLAMA.n_heads}))
    sd = gqa.state_dict()
    rep = TINY_LLAMA.n_heads // TINY_LLAMA.n_kv_heads
    hd = TINY_LLAMA.head_dim
    for k in list(sd):
        if k.endswith(("attention.wk.weight", "attention.wv.weight")):
            w = sd[k].view(TINY_LLAMA.n_kv_heads, hd, -1)
            sd[k] = w.repeat_interleave(rep, dim=0).reshape(TINY_LLAMA.n_heads * hd, -1)
    mha.load_state_dict(sd)
    tokens = torch.randint(0, TINY_LLAMA.vocab_size, (2, 12))
    torch.testing.assert_close(gqa(tokens), mha(tokens))


def test_debug_flavour_is_tiny() -> None:
    assert LLAMA3_FLAVOURS["debug"].num_params() < 10_000_000
