"""The fused local MoE permute (``triton_kernels/moe_dispatch_route.py``, issue 22 item 3):
routing and the permute copy in two launches, the combine reading the routing's inverse map
directly. Bit-equal to the argsort reference; the MoE layer's Triton path launches exactly
count + place + combine forward and combine + unpermute-backward backward (spied), with no
inversion and no torch bincount.

Interpreter on CPU (fp32/fp16; chunks of 16 entries and scan tiles of 64 elements there, so
several chunks, scan iterations and hidden spans are exercised); ``pytest -m gpu`` runs bf16
at the issue's shapes."""

from __future__ import annotations

import pytest
import torch

import triton_kernels.moe_dispatch as md
import triton_kernels.moe_dispatch_route as route
from dtensor_parallel.expert_parallel import ParallelDispatch
from dtensor_parallel.models.moe import MoE, MoEArgs

from .kernel_checks import DEVICE


def _ids(t: int, k: int, e: int, seed: int = 0, repeats: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if repeats:
        return torch.randint(0, e, (t, k), generator=g).to(DEVICE)
    return torch.randn(t, e, generator=g).topk(k, dim=-1).indices.to(DEVICE)


@pytest.mark.parametrize("t,h,k,e,repeats", [(1, 8, 1, 3, False), (37, 48, 2, 8, False), (53, 40, 3, 10, True),
                                             (29, 72, 8, 64, False), (40, 16, 2, 256, True)])
def test_routing_outputs_are_the_argsort_reference(t, h, k, e, repeats) -> None:
    """pos is the inverse of row_map, counts are bincount's (int64), rows are exact copies;
    E up to 256 (one-hot over padded experts), k = 3 (padded slots), one token."""
    ids = _ids(t, k, e, repeats=repeats)
    x = torch.randn(t, h, device=DEVICE)
    rows, row_map, counts, pos = md.permute(x, ids, e, routing=True)
    ref_rows, ref_map = md.permute_ref(x, ids)
    assert torch.equal(row_map, ref_map) and torch.equal(rows, ref_rows)
    assert counts.dtype == torch.int64 and torch.equal(counts, torch.bincount(ids.reshape(-1), minlength=e))
    assert pos.dtype == torch.int32 and torch.equal(pos.long(), torch.argsort(ref_map))
    c32, o32 = md.routing_histogram(ids, e)
    assert torch.equal(c32, counts.int()) and int(o32[-1]) == t * k


def test_ticket_is_reset_for_the_next_launch() -> None:
    """The counting kernel's last program resets its ticket: back-to-back calls of other
    shapes (other chunk counts) stay right."""
    for t, k, e in [(50, 2, 8), (7, 4, 5), (90, 1, 3), (50, 2, 8)]:
        ids = _ids(t, k, e, seed=t)
        counts, offsets = md.routing_histogram(ids, e)
        assert torch.equal(counts.long(), torch.bincount(ids.reshape(-1), minlength=e))
        assert all(int(v) == 0 for v in route._TICKETS.values())


def test_unpermute_with_pos_equals_unpermute_with_row_map() -> None:
    t, h, k, e = 31, 40, 2, 6
    ids = _ids(t, k, e)
    x = torch.randn(t, h, device=DEVICE)
    w = torch.rand(t, k, device=DEVICE)
    rows, row_map, _, pos = md.permute(x, ids, e, routing=True)
    y = (rows * 2).requires_grad_()
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
    a = md.unpermute(y, None, wa, pos=pos)
    g = torch.randn_like(a)
    da = torch.autograd.grad(a, [y, wa], g)
    b = md.unpermute(y, row_map, wb)
    db = torch.autograd.grad(b, [y, wb], g)
    assert torch.equal(a, b) and all(torch.equal(p, q) for p, q in zip(da, db))
    with pytest.raises(ValueError, match="give row_map"):
        md.unpermute(y, None, w)


class _Spy:
    """Counts the launches of a @triton.jit kernel (``kernel[grid](...)``)."""

    def __init__(self, kernel, name: str, log: list):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def test_moe_layer_launches(monkeypatch) -> None:
    """The layer's Triton path: forward = count, place (routing + copy), combine; backward =
    unpermute backward, combine (permute's backward). No inversion, no bincount."""
    log: list[str] = []
    for mod, name in [(route, "_count_kernel"), (route, "_place_kernel"), (md, "_combine_kernel"),
                      (md, "_invert_kernel"), (md, "_unpermute_bwd_kernel")]:
        monkeypatch.setattr(mod, name, _Spy(getattr(mod, name), name, log))
    bincounts = []
    real_bincount = torch.bincount
    monkeypatch.setattr(torch, "bincount", lambda *a, **kw: bincounts.append(1) or real_bincount(*a, **kw))
    torch.manual_seed(0)
    moe = MoE(16, MoEArgs(n_experts=4, top_k=2, hidden_dim=8, load_balance="none"))
    moe.dispatch = ParallelDispatch(kernels="triton")
    x = torch.randn(1, 12, 16, requires_grad=True)
    out = moe(x)
    assert log == ["_count_kernel", "_place_kernel", "_combine_kernel"], log
    assert len(bincounts) == 1, bincounts  # the router's statistics only (torch's path: 2)
    log.clear()
    out.sum().backward()
    assert sorted(log) == ["_combine_kernel", "_unpermute_bwd_kernel"], log


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t,h,k,e", [(8192, 4096, 2, 8), (8192, 7168, 8, 64), (4093, 7168, 8, 256)])
def test_gpu_bf16_exact_at_the_issue_shapes(t, h, k, e) -> None:
    ids = _ids(t, k, e)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    rows, row_map, counts, pos = md.permute(x, ids, e, routing=True)
    ref_rows, ref_map = md.permute_ref(x, ids)
    assert torch.equal(row_map, ref_map) and torch.equal(rows, ref_rows)
    assert torch.equal(counts, torch.bincount(ids.reshape(-1), minlength=e))
    for _ in range(3):  # the ticket survives back-to-back launches
        assert torch.equal(md.permute(x, ids, e)[0], ref_rows)
