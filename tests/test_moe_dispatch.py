"""MoE dispatch kernels (``triton_kernels/moe_dispatch.py``) against PyTorch.

Routing (counts, offsets, row_map) and the permuted rows are integer bookkeeping and copies:
they must equal the argsort references exactly. Anything that sums (unpermute, and every
gradient) follows the tolerance rule of DESIGN "Testing layers" / STYLE principle 7, with
relative Frobenius errors: ``err(kernel, ref_fp64) <= 2 * err(torch_same_dtype, ref_fp64) + atol``
(fp32 reference on the GPU). Shapes are odd on purpose: token counts and hidden sizes that
are not multiples of the kernel tiles, k not a power of two, experts that receive no token.

Without CUDA the kernels run in the Triton interpreter on CPU in fp32/fp16; ``pytest -m gpu``
runs bf16 at DeepSeek-V3 sizes (T=4096, H=7168, top-8 of 64 experts).
"""

from __future__ import annotations

import pytest
import torch

from triton_kernels.moe_dispatch import (
    moe_dispatch,
    moe_dispatch_ref,
    permute,
    permute_ref,
    routing_histogram,
    routing_histogram_ref,
    unpermute,
    unpermute_ref,
)

from .kernel_checks import ATOL, DEVICE, check_against_torch, rel_err


def _routing(t: int, k: int, e: int, dead: int = 0, repeats: bool = False, device: str = DEVICE,
             seed: int = 0) -> torch.Tensor:
    """(t, k) int64 expert ids. Top-k of random logits (distinct experts per token) with the
    last ``dead`` experts never chosen; ``repeats``: uniform with replacement, so a token may
    pick one expert in several slots (the stable order then goes by slot)."""
    g = torch.Generator().manual_seed(seed)
    if repeats:
        return torch.randint(0, e - dead, (t, k), generator=g).to(device)
    logits = torch.randn(t, e, generator=g)
    if dead:
        logits[:, e - dead:] = float("-inf")
    return logits.topk(k, dim=-1).indices.to(device)


def _out_and_grads(fn, y, w, dout):
    """fn(y, w) and its gradients for y and w, on fresh leaves."""
    y, w = y.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = fn(y, w)
    out.backward(dout)
    return out.detach(), y.grad, w.grad


def _weights(t: int, k: int, dtype: torch.dtype, device: str = DEVICE, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, k, generator=g).softmax(-1).to(device=device, dtype=dtype)  # rows sum to 1


# (T, H, k, E, dead experts, repeats, dtype): top-1, top-2, top-8 (E >= 8), k = 3 (K_PAD > k),
# odd T and H, experts without tokens.
CASES = [
    (37, 48, 1, 4, 1, False, torch.float32),
    (37, 200, 2, 6, 2, False, torch.float16),
    (101, 48, 2, 20, 5, True, torch.float32),
    (101, 200, 8, 16, 4, False, torch.float16),
    (64, 80, 8, 8, 0, False, torch.float32),
    (53, 72, 3, 10, 3, True, torch.float16),
]
IDS = "T,H,k,E,dead,repeats,dtype"


@pytest.mark.parametrize(IDS, CASES)
def test_routing_histogram(T, H, k, E, dead, repeats, dtype):
    ids = _routing(T, k, E, dead, repeats)
    counts, offsets = routing_histogram(ids, E)
    ref_counts, ref_offsets = routing_histogram_ref(ids, E)
    assert counts.dtype == torch.int32 and offsets.dtype == torch.int32
    assert counts.shape == (E,) and offsets.shape == (E + 1,)
    assert torch.equal(counts, ref_counts) and torch.equal(offsets, ref_offsets)
    assert int(counts.sum()) == T * k and int(offsets[-1]) == T * k
    if dead:
        assert (counts[E - dead:] == 0).all()
    # int32 ids give the same answer
    c32, o32 = routing_histogram(ids.to(torch.int32), E)
    assert torch.equal(c32, ref_counts) and torch.equal(o32, ref_offsets)


@pytest.mark.parametrize(IDS, CASES)
def test_permute(T, H, k, E, dead, repeats, dtype):
    torch.manual_seed(0)
    ids = _routing(T, k, E, dead, repeats)
    x = torch.randn(T, H, device=DEVICE, dtype=dtype)
    dxs = torch.randn(T * k, H, device=DEVICE, dtype=dtype)

    xk = x.clone().requires_grad_()
    x_sorted, row_map = permute(xk, ids, E)
    x_sorted.backward(dxs)
    ref_sorted, ref_map = permute_ref(x, ids)
    assert row_map.dtype == torch.int64 and x_sorted.dtype == dtype
    assert torch.equal(row_map, ref_map)
    assert torch.equal(x_sorted, ref_sorted)  # a copy: exact

    # stability: within each expert's segment the flat index (token*k + slot) increases
    _, offsets = routing_histogram_ref(ids, E)
    for e in range(E):
        seg = row_map[offsets[e]:offsets[e + 1]]
        assert (seg[1:] > seg[:-1]).all() and (ids.reshape(-1)[seg] == e).all()

    # backward: a token picked by k experts gets the sum of its k row-gradients
    xs = x.clone().requires_grad_()
    permute_ref(xs, ids)[0].backward(dxs)
    xr = x.double().requires_grad_()
    permute_ref(xr, ids)[0].backward(dxs.double())
    check_against_torch("permute dx", xk.grad, xs.grad, xr.grad, ATOL[dtype])


@pytest.mark.parametrize(IDS, CASES)
def test_unpermute(T, H, k, E, dead, repeats, dtype):
    torch.manual_seed(0)
    ids = _routing(T, k, E, dead, repeats)
    _, row_map = permute_ref(torch.empty(T, 1, device=DEVICE), ids)
    y = torch.randn(T * k, H, device=DEVICE, dtype=dtype)
    w = _weights(T, k, dtype)
    dout = torch.randn(T, H, device=DEVICE, dtype=dtype)

    got = _out_and_grads(lambda y, w: unpermute(y, row_map, w), y, w, dout)
    same = _out_and_grads(lambda y, w: unpermute_ref(y, row_map, w, upcast=False), y, w, dout)
    ref = _out_and_grads(lambda y, w: unpermute_ref(y, row_map, w), y.double(), w.double(), dout.double())
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    for name, g, s, r in zip(("unpermute out", "unpermute dy", "unpermute dw"), got, same, ref):
        check_against_torch(name, g, s, r, ATOL[dtype])


def test_unpermute_partial_grads_and_fp32_weights():
    """Only one of the two gradients requested; fp32 router weights with fp16 rows."""
    T, H, k, E = 29, 40, 4, 9
    ids = _routing(T, k, E, dead=2)
    _, row_map = permute_ref(torch.empty(T, 1, device=DEVICE), ids)
    y = torch.randn(T * k, H, device=DEVICE, dtype=torch.float16)
    w = _weights(T, k, torch.float32)
    dout = torch.randn(T, H, device=DEVICE, dtype=torch.float16)
    ref_y, ref_w = y.double().requires_grad_(), w.double().requires_grad_()
    unpermute_ref(ref_y, row_map, ref_w).backward(dout.double())

    yk = y.clone().requires_grad_()
    out = unpermute(yk, row_map, w)
    assert out.dtype == torch.float16
    out.backward(dout)
    assert rel_err(yk.grad, ref_y.grad) < 1e-3

    wk = w.clone().requires_grad_()
    unpermute(y, row_map, wk).backward(dout)
    assert wk.grad.dtype == torch.float32 and rel_err(wk.grad, ref_w.grad) < 1e-6


@pytest.mark.parametrize("T,H,k,E,dtype", [(101, 200, 8, 16, torch.float32), (37, 48, 2, 5, torch.float16)])
def test_round_trip(T, H, k, E, dtype):
    """permute -> identity expert -> unpermute with weights summing to 1 gives x back."""
    torch.manual_seed(0)
    ids = _routing(T, k, E, dead=1)
    x = torch.randn(T, H, device=DEVICE, dtype=dtype)
    w = _weights(T, k, torch.float32)
    x_sorted, row_map = permute(x, ids, E)
    back = unpermute(x_sorted, row_map, w)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(back, x, rtol=tol, atol=tol)


def test_moe_dispatch_expert_segments():
    """End to end: expert e scales its rows by (e + 1), working on its segment
    offsets[e]:offsets[e+1] only; the combine must equal sum_j w[t,j] (ids[t,j] + 1) x[t]."""
    torch.manual_seed(0)
    T, H, k, E = 45, 56, 2, 7
    ids = _routing(T, k, E, dead=2)
    x = torch.randn(T, H, device=DEVICE)
    w = _weights(T, k, torch.float32)
    x_sorted, row_map, counts, offsets = moe_dispatch(x, ids, E)
    for got, ref in zip((x_sorted, row_map, counts, offsets), moe_dispatch_ref(x, ids, E)):
        assert torch.equal(got, ref)
    y = torch.cat([x_sorted[offsets[e]:offsets[e + 1]] * (e + 1) for e in range(E)])  # (T*k, H)
    out = unpermute(y, row_map, w)
    expected = ((w * (ids + 1)).sum(1, keepdim=True)) * x
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_deterministic_and_no_experts_argument():
    ids = _routing(70, 3, 11, repeats=True)
    x = torch.randn(70, 24, device=DEVICE)
    a = permute(x, ids)  # n_experts inferred from ids.max()
    b = permute(x, ids, 11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    xs = [x.clone().requires_grad_() for _ in range(2)]
    for xi in xs:
        permute(xi, ids, 11)[0].pow(2).sum().backward()
    assert torch.equal(xs[0].grad, xs[1].grad)


def test_errors():
    x = torch.randn(8, 16, device=DEVICE)
    ids = _routing(8, 2, 4)
    with pytest.raises(ValueError, match="9 tokens|8 tokens"):
        permute(torch.randn(9, 16, device=DEVICE), ids, 4)
    with pytest.raises(ValueError, match="2-D"):
        permute(x, ids.reshape(-1), 4)
    with pytest.raises(TypeError, match="integer dtype"):
        routing_histogram(ids.float(), 4)
    with pytest.raises(TypeError, match="supported"):
        permute(x.double(), ids, 4)
    _, row_map = permute(x, ids, 4)
    with pytest.raises(ValueError, match="T\\*k"):
        unpermute(torch.randn(15, 16, device=DEVICE), row_map, torch.rand(8, 2, device=DEVICE))
    if DEVICE == "cpu":  # checked eagerly only where it costs no synchronization
        with pytest.raises(ValueError, match=r"\[0, 3\)"):
            routing_histogram(ids, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestGPU:
    """bf16 at DeepSeek-V3 sizes against the fp32 references; torch_same_dtype is the
    reference run in bf16."""

    T, H, K, E = 4096, 7168, 8, 64

    def test_routing_and_permute(self):
        ids = _routing(self.T, self.K, self.E, dead=3)
        counts, offsets = routing_histogram(ids, self.E)
        ref_counts, ref_offsets = routing_histogram_ref(ids, self.E)
        assert torch.equal(counts, ref_counts) and torch.equal(offsets, ref_offsets)
        x = torch.randn(self.T, self.H, device="cuda", dtype=torch.bfloat16)
        dxs = torch.randn(self.T * self.K, self.H, device="cuda", dtype=torch.bfloat16)
        xk = x.clone().requires_grad_()
        x_sorted, row_map = permute(xk, ids, self.E)
        ref_sorted, ref_map = permute_ref(x, ids)
        assert torch.equal(row_map, ref_map) and torch.equal(x_sorted, ref_sorted)
        x_sorted.backward(dxs)
        xs = x.clone().requires_grad_()
        permute_ref(xs, ids)[0].backward(dxs)
        xr = x.float().requires_grad_()
        permute_ref(xr, ids)[0].backward(dxs.float())
        check_against_torch("gpu permute dx", xk.grad, xs.grad, xr.grad, ATOL[torch.bfloat16])

    def test_unpermute(self):
        ids = _routing(self.T, self.K, self.E, dead=3)
        _, row_map = permute_ref(torch.empty(self.T, 1, device="cuda"), ids)
        y = torch.randn(self.T * self.K, self.H, device="cuda", dtype=torch.bfloat16)
        w = _weights(self.T, self.K, torch.bfloat16, device="cuda")
        dout = torch.randn(self.T, self.H, device="cuda", dtype=torch.bfloat16)

        got = _out_and_grads(lambda y, w: unpermute(y, row_map, w), y, w, dout)
        same = _out_and_grads(lambda y, w: unpermute_ref(y, row_map, w, upcast=False), y, w, dout)
        ref = _out_and_grads(lambda y, w: unpermute_ref(y, row_map, w), y.float(), w.float(), dout.float())
        for name, g, s, r in zip(("gpu unpermute out", "gpu unpermute dy", "gpu unpermute dw"), got, same, ref):
            check_against_torch(name, g, s, r, ATOL[torch.bfloat16])

    def test_round_trip(self):
        ids = _routing(self.T, self.K, self.E)
        x = torch.randn(self.T, self.H, device="cuda", dtype=torch.bfloat16)
        w = _weights(self.T, self.K, torch.float32, device="cuda")
        x_sorted, row_map = permute(x, ids, self.E)
        torch.testing.assert_close(unpermute(x_sorted, row_map, w), x, rtol=1.6e-2, atol=1e-2)
