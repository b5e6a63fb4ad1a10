"""The fused local MoE permute (``triton_kernels/moe_dispatch_route.py``, issue 22 item 3):
routing and the permute copy in two launches (per-chunk counts with a last-program scan, then
ranks + copy), the combine reading the routing's inverse map directly. Bit-equal to the
argsort reference; the
launches of every op forward and backward are counted (spied) together with the torch ops
between them, so that neither can silently grow back.

Interpreter on CPU (fp32/fp16; chunks of 16 entries and scan tiles of 64 elements there, so
several chunks, scan iterations and hidden spans are exercised); ``pytest -m gpu`` runs bf16
at the issue's shapes and a CUDA-graph capture."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import triton_kernels.moe_dispatch as md
import triton_kernels.moe_dispatch_route as route
import triton_kernels.moe_dispatch_rows as rows_mod
from dtensor_parallel.expert_parallel import ParallelDispatch
from dtensor_parallel.models.moe import MoE, MoEArgs

from .kernel_checks import ATOL, DEVICE, check_against_torch

KERNELS = [(route, "_count_kernel"), (route, "_place_kernel"),
           (rows_mod, "_combine_kernel"), (rows_mod, "_invert_kernel"), (rows_mod, "_unpermute_bwd_kernel")]


def _ids(t: int, k: int, e: int, seed: int = 0, repeats: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if repeats:
        return torch.randint(0, e, (t, k), generator=g).to(DEVICE)
    return torch.randn(t, e, generator=g).topk(k, dim=-1).indices.to(DEVICE)


@pytest.mark.parametrize("t,h,k,e,repeats", [(1, 8, 1, 3, False), (37, 48, 2, 8, False), (53, 40, 3, 10, True),
                                             (29, 72, 8, 64, False), (40, 16, 2, 256, True), (45, 33, 1, 5, False)])
def test_routing_outputs_are_the_argsort_reference(t, h, k, e, repeats) -> None:
    """pos is the inverse of row_map, counts are bincount's (int64), rows are exact copies;
    E up to 256, k = 1, 3 (padded slots) and 8, one token, odd hidden sizes."""
    ids = _ids(t, k, e, repeats=repeats)
    x = torch.randn(t, h, device=DEVICE)
    rows, row_map, counts, pos = md.permute(x, ids, e, routing=True)
    ref_rows, ref_map = md.permute_ref(x, ids)
    assert torch.equal(row_map, ref_map) and torch.equal(rows, ref_rows)
    assert counts.dtype == torch.int64 and torch.equal(counts, torch.bincount(ids.reshape(-1), minlength=e))
    assert pos.dtype == torch.int32 and torch.equal(pos.long(), torch.argsort(ref_map))
    c32, o32 = md.routing_histogram(ids, e)
    assert torch.equal(c32, counts.int()) and int(o32[-1]) == t * k


@pytest.mark.parametrize("t,h,k,e,dtype", [(37, 48, 1, 4, torch.float32), (41, 40, 2, 8, torch.float16),
                                           (23, 72, 8, 16, torch.float32), (19, 24, 3, 10, torch.float16)])
def test_forward_and_backward_against_torch(t, h, k, e, dtype) -> None:
    """permute -> an expert that scales rows -> unpermute(pos=...): output, dx and dweights
    against the plain-PyTorch references (tolerance rule of kernel_checks)."""
    ids = _ids(t, k, e, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(t, h, generator=g).to(DEVICE, dtype)
    w = torch.randn(t, k, generator=g).softmax(-1).to(DEVICE)
    dout = torch.randn(t, h, generator=g).to(DEVICE, dtype)
    scale = torch.linspace(0.5, 2.0, t * k, device=DEVICE, dtype=dtype)[:, None]

    def ours(x, w):
        rows, _, _, pos = md.permute(x, ids, e, routing=True)
        return md.unpermute(rows * scale, None, w, pos=pos)

    def ref(x, w, upcast=True):
        rows, row_map = md.permute_ref(x, ids)
        return md.unpermute_ref(rows * scale.to(rows.dtype), row_map, w, upcast=upcast)

    results = []
    for fn, xd, wd in [(ours, dtype, torch.float32), (lambda a, b: ref(a, b, upcast=False), dtype, torch.float32),
                       (ref, torch.float64, torch.float64)]:
        xi, wi = x.to(xd).requires_grad_(), w.to(wd).requires_grad_()
        out = fn(xi, wi)
        results.append((out.detach(), *torch.autograd.grad(out, [xi, wi], dout.to(out.dtype))))
    for name, got, same, exact in zip(("out", "dx", "dw"), *results):
        check_against_torch(f"fused {name}", got, same, exact, ATOL[dtype])


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


# ----------------------------------------------------------------------------------------
# Launch counts
# ----------------------------------------------------------------------------------------


class _Launches(TorchDispatchMode):
    """Records the Triton launches (``kernel[grid](...)`` of the kernels above, spied) and the
    torch ops dispatched outside them (the interpreter's own tensor work inside a launch is
    not the op's)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.log: list[str] = []
        self.inside = False
        for mod, name in KERNELS:
            monkeypatch.setattr(mod, name, _Spy(getattr(mod, name), name, self))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.log.append(f"aten.{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))

    def take(self) -> tuple[list[str], list[str]]:
        """(Triton launches, torch ops that are not allocations or views) since the last take."""
        log, self.log = self.log, []
        free = ("aten.empty", "aten.view", "aten.detach", "aten._reshape_alias", "aten.alias")
        return ([n for n in log if not n.startswith("aten.")],
                [n for n in log if n.startswith("aten.") and not n.startswith(free)])


class _Spy:
    def __init__(self, kernel, name: str, mode: _Launches):
        self.kernel, self.name, self.mode = kernel, name, mode

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.mode.log.append(self.name)
            self.mode.inside = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.mode.inside = False
        return launch


# the CPU-only range check of expert ids (free there; skipped on the GPU, where its .item()
# would synchronize: there any aten._local_scalar_dense fails the test)
_CPU_CHECKS = (
    ["aten.min", "aten._local_scalar_dense", "aten.max", "aten._local_scalar_dense"] if DEVICE == "cpu" else [])


@pytest.mark.parametrize("t,k,e", [(24, 2, 8), (24, 8, 256)])
def test_launch_counts(t, k, e, monkeypatch) -> None:
    """Every op's launches, and no torch op besides allocations and views (no zeros, cumsum,
    index, bincount; no zero-filled gradients for the integer outputs) forward or backward:
    permute 2 launches, unpermute(pos=) 1, backward 1 each."""
    h = 40
    ids = _ids(t, k, e)
    x = torch.randn(t, h, device=DEVICE, requires_grad=True)
    w = torch.rand(t, k, device=DEVICE, requires_grad=True)
    dout = torch.randn(t, h, device=DEVICE)
    mode = _Launches(monkeypatch)
    with mode:
        rows, row_map, counts, pos = md.permute(x, ids, e, routing=True)
        assert mode.take() == (["_count_kernel", "_place_kernel"], _CPU_CHECKS)
        out = md.unpermute(rows, None, w, pos=pos)
        assert mode.take() == (["_combine_kernel"], [])
        torch.autograd.grad(out, [x, w], dout)
        assert mode.take() == (["_unpermute_bwd_kernel", "_combine_kernel"], [])
        md.unpermute(rows, row_map, w)  # without pos: one more launch, the inversion
        assert mode.take() == (["_invert_kernel", "_combine_kernel"], [])


def test_moe_layer_launches(monkeypatch) -> None:
    """The layer's Triton path: forward = routing + copy (two launches), combine;
    backward = unpermute backward, combine (permute's backward). No inversion, no bincount
    beyond the router's statistics. Capacity mode keeps torch's path (the kernels are dropless)."""
    torch.manual_seed(0)
    moe = MoE(16, MoEArgs(n_experts=4, top_k=2, hidden_dim=8, load_balance="none"))
    moe.dispatch = ParallelDispatch(kernels="triton")
    x = torch.randn(1, 12, 16, requires_grad=True)
    mode = _Launches(monkeypatch)
    with mode:
        out = moe(x)
        launches, ops = mode.take()
        assert launches == ["_count_kernel", "_place_kernel", "_combine_kernel"], launches
        assert ops.count("aten.bincount") == 1, ops  # the router's statistics only (torch's path: 2)
        out.sum().backward()
        assert sorted(mode.take()[0]) == ["_combine_kernel", "_unpermute_bwd_kernel"]
        moe.args = dataclasses.replace(moe.args, capacity_factor=1.0)
        moe(x)
        assert mode.take()[0] == []


# ----------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t,h,k,e", [(8192, 4096, 2, 8), (8192, 7168, 8, 64), (4093, 7168, 8, 256),
                                     (4093, 4096, 1, 8)])
def test_gpu_bf16_exact_at_the_issue_shapes(t, h, k, e) -> None:
    ids = _ids(t, k, e)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    rows, row_map, counts, pos = md.permute(x, ids, e, routing=True)
    ref_rows, ref_map = md.permute_ref(x, ids)
    assert torch.equal(row_map, ref_map) and torch.equal(rows, ref_rows)
    assert torch.equal(counts, torch.bincount(ids.reshape(-1), minlength=e))
    for _ in range(3):  # the ticket survives back-to-back launches
        assert torch.equal(md.permute(x, ids, e)[0], ref_rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t,h,k,e", [(8192, 4096, 2, 8), (2048, 7168, 8, 64)])
def test_gpu_bf16_forward_backward_and_cuda_graph(t, h, k, e) -> None:
    """bf16 permute -> unpermute(pos=) forward and backward against the references, then the
    same forward+backward captured in a CUDA graph (no host sync on the path) and replayed on
    new inputs copied into the static ones: equal to eager, bit for bit."""
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.rand(t, e, device="cuda", generator=g).topk(k, dim=-1).indices
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = torch.randn(t, k, device="cuda", generator=g).softmax(-1).requires_grad_()
    dout = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=g)

    def step(x, w):
        rows, _, _, pos = md.permute(x, ids, e, routing=True)
        out = md.unpermute(rows, None, w, pos=pos)
        return (out.detach(), *torch.autograd.grad(out, [x, w], dout))

    eager = step(x, w)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rows, row_map = md.permute_ref(xr, ids)
    ref_out = md.unpermute_ref(rows, row_map, wr)
    ref = (ref_out, *torch.autograd.grad(ref_out, [xr, wr], dout.double()))
    xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rows, row_map = md.permute_ref(xs, ids)
    same_out = md.unpermute_ref(rows, row_map, ws, upcast=False)
    same = (same_out, *torch.autograd.grad(same_out, [xs, ws], dout))
    for name, a, s, r in zip(("out", "dx", "dw"), eager, same, ref):
        check_against_torch(f"gpu fused {name}", a, s, r, ATOL[torch.bfloat16])

    # The captured leaves are new and first used on the side stream: a leaf whose gradient
    # node was made on the default stream (x, w above) makes the capture depend on that
    # stream, which CUDA refuses (cudaErrorStreamCaptureImplicit; torch's AccumulateGrad
    # stream warning says the same).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        xc, wc = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        step(xc, wc)  # warm-up off the capture stream: compiles, allocator, this stream's ticket
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step(xc, wc)
    with torch.no_grad():
        xc.mul_(-1)
        wc.copy_(wc.flip(-1))
        ids.copy_(ids.flip(0))
    graph.replay()
    again = step(xc, wc)
    for a, b in zip(static, again):
        assert torch.equal(a, b)
