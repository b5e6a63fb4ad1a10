"""Context parallel: zigzag sharding, ring attention parity with the single-device model
alone and composed with TP+SP, FSDP and PP, balanced work, and the sequence check."""

from __future__ import annotations

import copy

import pytest
import torch

from dtensor_parallel import build_mesh, parallelize
from dtensor_parallel.context_parallel import zigzag_indices
from dtensor_parallel.context_parallel.blocks import TorchBlocks

from .harness import run_distributed
from .parity import TINY_LLAMA, make_batch, make_model, one_step_parity, plan_for, training_parity


def test_zigzag_indices_cover_the_sequence_once() -> None:
    assert zigzag_indices(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_indices(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    all_idx = torch.cat([zigzag_indices(48, 4, r) for r in range(4)])
    assert sorted(all_idx.tolist()) == list(range(48))
    with pytest.raises(ValueError, match=r"sequence length 30 is not divisible by 2 x cp = 4"):
        zigzag_indices(30, 2, 0)


CP_LAYOUTS = {
    "cp2": (2, {"cp": 2}, {}),
    "cp4": (4, {"cp": 4}, {}),
    "cp2_tp2_sp": (4, {"cp": 2, "tp": 2}, {"sequence_parallel": True}),
    "cp2_fsdp2": (4, {"cp": 2, "dp_shard": 2}, {}),
    "cp2_pp2": (4, {"cp": 2, "pp": 2}, {"micro_batch_size": 2}),
    "cp2_tp2_dp2_selective": (8, {"cp": 2, "tp": 2, "dp_shard": 2},
                              {"sequence_parallel": True, "recompute": "selective"}),
    # the Triton ring (in the interpreter here; head dim 8 runs zero-padded to 16)
    "cp2_triton": (2, {"cp": 2}, {"kernels": {"attention": "triton"}}),
    "cp2_tp2_sp_triton": (4, {"cp": 2, "tp": 2}, {"sequence_parallel": True, "kernels": {"attention": "triton"}}),
    # PyTorch's fused attention ops (on the CPU their flash kernel); "auto" picks them here
    "cp2_sdpa": (2, {"cp": 2}, {"kernels": {"attention": "sdpa"}}),
    "cp2_auto": (2, {"cp": 2}, {"kernels": {"attention": "auto"}}),
}


# the toy model (SDPA intercepted at its attention module) on every torch-kernel layout; the
# Triton ring, slow in the interpreter, on the Llama (the same kernel either way)
CP_CASES = [(name, kind) for name in CP_LAYOUTS for kind in ("llama", "toy")
            if kind == "llama" or not any(k in name for k in ("triton", "sdpa", "auto"))]


@pytest.mark.parametrize("layout,kind", CP_CASES, ids=[f"{n}-{k}" for n, k in CP_CASES])
def test_context_parallel_parity(layout: str, kind: str) -> None:
    """The Llama calls our attention (ring with un-repeated kv heads); the toy model calls
    F.scaled_dot_product_attention, which the context-parallel region turns into the ring."""
    world, mesh_kwargs, plan_kwargs = CP_LAYOUTS[layout]
    losses = run_distributed(world, one_step_parity, kind, mesh_kwargs, plan_kwargs, batch=4, seq=32)
    assert len(set(losses)) == 1


def test_context_parallel_training_tracks_single_device() -> None:
    run_distributed(4, training_parity, "llama", {"cp": 2, "dp_shard": 2}, {}, steps=10, batch=4, seq=32)


def _work_per_rank(cp: int) -> float:
    """Score elements this rank computes in one forward (a causal diagonal block counts half)."""
    from dtensor_parallel.context_parallel import blocks

    done = 0.0
    orig = TorchBlocks.forward_step

    def counting(q, k, v, out, lse, causal, scale, accumulate=True, **masks):
        nonlocal done
        done += q.shape[2] * k.shape[2] * (0.5 if causal else 1.0)
        return orig(q, k, v, out, lse, causal, scale, accumulate, **masks)

    blocks.TorchBlocks.forward_step = staticmethod(counting)
    try:
        pm = parallelize(copy.deepcopy(make_model("llama")), build_mesh(cp=cp), plan_for("llama"))
        x, _ = make_batch(TINY_LLAMA.vocab_size, 1, 64)
        with torch.no_grad():
            pm(x)
    finally:
        blocks.TorchBlocks.forward_step = staticmethod(orig)
    return done / TINY_LLAMA.n_layers


def test_zigzag_balances_causal_work() -> None:
    work = run_distributed(4, _work_per_rank, 4)
    assert len(set(work)) == 1, work
    # each rank: 16 local tokens; diagonal 16x16/2 + 3 half-blocks of 16x8
    assert work[0] == 16 * 16 / 2 + 3 * 16 * 8


def _bad_sequence_case() -> None:
    pm = parallelize(copy.deepcopy(make_model("toy")), build_mesh(cp=2), plan_for("toy"))
    x = torch.zeros(2, 30, dtype=torch.long)
    with pytest.raises(ValueError, match=r"sequence length 30 is not divisible by 2 x cp = 4"):
        pm.forward_backward(x, x)


def test_sequence_not_divisible_by_two_cp_is_an_error() -> None:
    run_distributed(2, _bad_sequence_case)


def _ring_vs_full_attention(backend_name: str, hq: int, hkv: int, d: int, seq: int,
                            dtype_name: str) -> tuple[float, float]:
    """Ring attention on zigzag shards against full causal attention in float64: the worst
    relative error of the output and the three input gradients, and that of PyTorch's own
    attention run in the same dtype (the yardstick)."""
    import torch.distributed as dist

    from dtensor_parallel.context_parallel.ring import ring_attention

    dtype = getattr(torch, dtype_name)
    cp, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    qg, kg, vg = (torch.randn(2, h, seq, d, generator=g) for h in (hq, hkv, hkv))
    dout = torch.randn(2, hq, seq, d, generator=g)
    idx = zigzag_indices(seq, cp, rank)
    q, k, v = (t[:, :, idx].to(dtype).requires_grad_() for t in (qg, kg, vg))
    out = ring_attention(q, k, v, causal=True, scale=None, group=dist.group.WORLD, backend=backend_name)
    out.backward(dout[:, :, idx].to(dtype))
    # float64 reference of the full sequence
    ref_in = [t.double().requires_grad_() for t in (qg, kg, vg)]
    rep = hq // hkv
    ref = torch.nn.functional.scaled_dot_product_attention(
        ref_in[0], ref_in[1].repeat_interleave(rep, 1), ref_in[2].repeat_interleave(rep, 1), is_causal=True)
    ref.backward(dout.double())
    same = [t.to(dtype).requires_grad_() for t in (qg, kg, vg)]
    torch_out = torch.nn.functional.scaled_dot_product_attention(
        same[0], same[1].repeat_interleave(rep, 1), same[2].repeat_interleave(rep, 1), is_causal=True)
    torch_out.backward(dout.to(dtype))

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    refs = (ref, ref_in[0].grad, ref_in[1].grad, ref_in[2].grad)
    ours = max(rel(got, want[:, :, idx]) for got, want in zip((out, q.grad, k.grad, v.grad), refs))
    yardstick = max(rel(got, want) for got, want in zip((torch_out, *(t.grad for t in same)), refs))
    return ours, yardstick


@pytest.mark.parametrize("backend,dtype", [("torch", "float32"), ("triton", "float16"), ("triton", "float32")])
def test_ring_attention_against_full_attention(backend: str, dtype: str) -> None:
    """GQA (4 query heads on 2 kv heads), head dim 16, 2 x 24 tokens on 2 ranks; error <= 2 x
    PyTorch's own error in the same dtype + 1e-5. The Triton backend runs in the interpreter
    here (fp16/fp32: bf16 dots are wrong in the interpreter; bf16 is checked on GPU)."""
    for ours, yardstick in run_distributed(2, _ring_vs_full_attention, backend, 4, 2, 16, 48, dtype):
        assert ours <= 2 * yardstick + 1e-5, (ours, yardstick)


@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_row_chunks_give_the_same_result(monkeypatch, causal: bool) -> None:
    from dtensor_parallel.context_parallel import blocks

    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, h, 40, 8, generator=g) for h in (4, 2, 2, 4))
    out0, lse0 = torch.zeros(1, 4, 40, 8), torch.full((1, 4, 40), float("-inf"))
    whole = TorchBlocks.forward_step(q, k, v, out0.clone(), lse0.clone(), causal, 0.3)  # in place
    grads = TorchBlocks.backward_block(dout, q, k, v, *whole, causal, 0.3)
    monkeypatch.setattr(blocks, "MAX_SCORE_ELEMENTS", 4 * 40 * 7)  # 7 rows a chunk
    chunked = TorchBlocks.forward_step(q, k, v, out0.clone(), lse0.clone(), causal, 0.3)
    chunked_grads = TorchBlocks.backward_block(dout, q, k, v, *whole, causal, 0.3)
    for a, b in zip((*whole, *grads), (*chunked, *chunked_grads)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # against plain causal attention
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=causal, scale=0.3)
    torch.testing.assert_close(chunked[0], ref, rtol=1e-5, atol=1e-5)


def test_ring_runs_only_at_the_named_call_sites_on_their_own_thread(monkeypatch) -> None:
    """Applied to modules, not the process: F.scaled_dot_product_attention is never
    reassigned; an SDPA call becomes the ring only inside a named site's forward, on the
    thread running it (not in another module, not in a concurrent thread); and a recompute
    that reruns the site's forward inside the backward goes through the ring again."""
    import threading

    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from dtensor_parallel.context_parallel import RingAttentionMode, apply_context_parallel
    from dtensor_parallel.context_parallel import attention as cp_attention

    calls: list[str] = []

    def fake_ring(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append(self.site)
        return cp_attention._SDPA(q, k, v, is_causal=is_causal)

    monkeypatch.setattr(RingAttentionMode, "attention", fake_ring)
    sdpa_before = F.scaled_dot_product_attention
    other_thread_ran = threading.Event()

    class Site(torch.nn.Module):
        def __init__(self, probe_thread: bool = False):
            super().__init__()
            self.probe_thread = probe_thread

        def forward(self, q):
            assert F.scaled_dot_product_attention is sdpa_before  # nothing reassigned
            if self.probe_thread:  # another thread's SDPA while this forward is inside the mode
                t = threading.Thread(target=lambda: (F.scaled_dot_product_attention(q, q, q), other_thread_ran.set()))
                t.start()
                t.join()
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    site, bystander = Site(probe_thread=True), Site()
    apply_context_parallel({"blocks.0.attn": site}, group=None, backend="torch")
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    site(q)
    assert calls == ["blocks.0.attn"] and other_thread_ran.is_set()  # the thread's call was plain SDPA
    bystander(q)
    F.scaled_dot_product_attention(q, q, q)
    assert calls == ["blocks.0.attn"]  # outside the site: plain SDPA
    site.probe_thread = False
    calls.clear()
    checkpoint(site, q, use_reentrant=False).sum().backward()
    assert calls == ["blocks.0.attn", "blocks.0.attn"]  # forward, then the recompute in backward
    with pytest.raises(RuntimeError, match="boom"):  # a forward that raises leaves the mode
        site.register_forward_pre_hook(lambda m, i: (_ for _ in ()).throw(RuntimeError("boom")))
        site(q)
    calls.clear()
    F.scaled_dot_product_attention(q, q, q)
    assert calls == []
    other = Site()  # a pre-hook that raises before ours entered: the exit hook pops nothing
    apply_context_parallel({"blocks.1.attn": other}, group=None, backend="torch")
    other.register_forward_pre_hook(lambda m, i: (_ for _ in ()).throw(RuntimeError("early")), prepend=True)
    with pytest.raises(RuntimeError, match="early"):
        other(q)
    bystander(q)
    assert calls == []


def test_context_parallel_refuses_a_model_without_positions_or_sites() -> None:
    """Before any collective: a forward without position_ids would compute each shard's
    positions from its own length (silently wrong RoPE); no attention site, no ring."""
    from dtensor_parallel.validation import check_context_parallel
    from dtensor_parallel.tensor_parallel import resolve_rules

    from .toy_gpt import TOY_RULES, ToyGPT

    class NoPositions(ToyGPT):
        def forward(self, idx):
            return super().forward(idx)

    model = NoPositions()
    with pytest.raises(ValueError, match=r"takes no position_ids.*silently wrong RoPE"):
        check_context_parallel(model, resolve_rules(model, TOY_RULES), cp=2)
    rules = {k: v for k, v in TOY_RULES.items() if v != "attention"}
    with pytest.raises(ValueError, match=r"cp=2 needs the attention call sites .*'attention'"):
        check_context_parallel(ToyGPT(), resolve_rules(model, rules), cp=2)


def test_attention_backend_choices(monkeypatch, caplog) -> None:
    """"sdpa" is an attention backend only; "auto" takes the measured table's pick and says
    so in one log line, or says that the device was not measured."""
    import logging

    from dtensor_parallel import ParallelPlan
    from dtensor_parallel.context_parallel import backend_choice

    assert ParallelPlan(kernels={"attention": "sdpa"}).kernels["attention"] == "sdpa"
    with pytest.raises(ValueError, match=r"kernels\['sp_reduce_scatter'\]='sdpa': choose one of"):
        ParallelPlan(kernels={"sp_reduce_scatter": "sdpa"})
    with caplog.at_level(logging.WARNING, logger=backend_choice.__name__):
        pick = backend_choice.choose_attention_backend("cpu")
    assert (pick.plain, pick.documents) == ("sdpa", "sdpa")
    assert len(caplog.records) == 1 and "measured: block forward+backward on the CPU: sdpa 7.3x torch" in caplog.text
    assert backend_choice.lookup("NVIDIA H200") == backend_choice.MEASURED["H200"]  # a substring of the name
    assert (backend_choice.MEASURED["H200"].plain, backend_choice.MEASURED["H200"].documents) == ("sdpa", "triton")
    caplog.clear()
    monkeypatch.setattr(backend_choice, "device_key", lambda device_type: "NVIDIA Imaginary GPU")
    with caplog.at_level(logging.WARNING, logger=backend_choice.__name__):
        pick = backend_choice.choose_attention_backend("cuda")
    assert (pick.plain, pick.documents) == ("triton", "triton") and "no measurement" in caplog.text
