"""The expert-parallel exchange beside the experts' compute: tokens in chunks, two streams.

``ParallelPlan.moe_dispatch_chunks = C`` (> 1) with the symmetric-memory exchange
(``kernels={"moe_dispatch": "triton"}``, ep > 1): each MoE layer splits its T tokens into C
chunks, routes them all at once (the balancing statistics are the layer's), permutes each
chunk, and pipelines the chunks over two CUDA streams::

    side (exchange):  [E0][E1]    [S0][E2]    [S1] ...  [S_C-1]
    main (compute):   [shared][G0]    [G1]        [G2]...        [combine 0..C-1]

E_c: chunk c's rows to their experts' ranks (``symm_dispatch.to_experts``: counts, push,
copy-out); G_c: the grouped GEMMs of chunk c on the rows this rank received; S_c: the outputs
back to their sources (``to_sources``). E_{c+1} travels while G_c computes, S_c while G_{c+1}
does, and the shared experts (``shared()``, when the layer has them) compute while E0 travels.
Each arrow between the streams is one CUDA event; the host never waits.

Backward overlaps the same way without more code: autograd runs each node's backward on the
stream its forward ran on and makes a stream wait where a gradient crosses over, so S_c's
backward (a dispatch of the output gradient) runs on the side stream beside the GEMM
gradients of another chunk on the main one.

Workspaces. Chunk c uses the symmetric workspace ``lane = c % 2``. The side stream runs the
pushes in issue order (E0 E1 S0 E2 S1 ...), so each lane's pushes alternate direction, the
condition under which one workspace is reused without a barrier (``moe_dispatch_symm``'s
reuse argument, per lane). Every rank issues the same sequence: the forward's by
construction; the backward's because autograd orders the nodes of identical graphs alike.

Memory across streams: a tensor made on one stream and read on another is marked for the
reader (``record_stream``) so the caching allocator cannot hand its block out before the
reader is done; the autograd functions do the same for their gradients (``ctx.streams``).

Bit-equality: each token's combine sums its k outputs in fp32 in slot order as the
unchunked path does; the grouped GEMMs see other row counts per call, so their outputs and
the weight gradients (summed over chunks) agree within the GEMMs' rounding, not bitwise.

SMs. The grouped GEMM (CUTLASS, persistent: one program per SM, each walking a fixed share
of the tiles) does not leave SMs to a push that arrives after it, and a push that arrives
first delays the GEMM programs that wait for its SMs, with their whole share of tiles. So
``push_programs`` caps the pushes' grid (``OVERLAP_PROGRAMS``) and ``carveout`` SMs are
taken from the experts' GEMMs, forward and backward (torch's experimental SM carveout, which
``torch._grouped_mm`` reads when it runs; ``OVERLAP_CARVEOUT``): the GEMMs then run on the
other SMs while the pushes have theirs. The trade (a GEMM on fewer SMs against an exchange
hidden) is measured in ``benchmarks/moe_dispatch.py`` (``--overlaps C:P:S``).

On CPU ranks (the emulated exchange, tests) the same chunks run one after another.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

OVERLAP_PROGRAMS = 32  # push/copy-out programs beside a GEMM (of 132 SMs on an H100/H200)
OVERLAP_CARVEOUT = 0  # SMs the experts' GEMMs leave to the pushes
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}
_CARVEOUT = {"depth": 0, "saved": None}


def _carve(n: int) -> None:
    if _CARVEOUT["depth"] == 0:
        _CARVEOUT["saved"] = torch._C._get_sm_carveout_experimental()
        torch._C._set_sm_carveout_experimental(n)
    _CARVEOUT["depth"] += 1


def _uncarve() -> None:
    _CARVEOUT["depth"] -= 1
    if _CARVEOUT["depth"] == 0:
        torch._C._set_sm_carveout_experimental(_CARVEOUT["saved"])


class _CarveoutFrom(torch.autograd.Function):
    """On the experts' input: identity; its backward, which runs after the experts' backward,
    ends the carveout that :class:`_CarveoutUntil`'s backward began."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _uncarve()
        return grad


class _CarveoutUntil(torch.autograd.Function):
    """On the experts' output: identity; its backward, which runs before the experts'
    backward, begins the carveout (nested chunks share one span: a depth count)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, n: int) -> torch.Tensor:
        ctx.n = n
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _carve(ctx.n)
        return grad, None


def _experts_carved(experts, rows: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """``experts(rows, counts)`` on all SMs but ``n``, forward and backward."""
    if not n:
        return experts(rows, counts)
    _carve(n)
    try:
        train = torch.is_grad_enabled() and rows.requires_grad
        y = experts(_CarveoutFrom.apply(rows) if train else rows, counts)
    finally:
        _uncarve()
    return _CarveoutUntil.apply(y, n) if train else y


def chunk_sizes(n_tokens: int, chunks: int) -> list[int]:
    """``chunks`` near-equal token counts (the first ones one larger), none empty."""
    c = max(1, min(chunks, n_tokens))
    base, extra = divmod(n_tokens, c)
    return [base + (i < extra) for i in range(c)]


class _Streams:
    """The main (current) stream and this device's side stream, or nothing on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.main = torch.cuda.current_stream(device)
            idx = device.index if device.index is not None else torch.cuda.current_device()
            if idx not in _SIDE_STREAMS:
                _SIDE_STREAMS[idx] = torch.cuda.Stream(device)
            self.side = _SIDE_STREAMS[idx]

    def on_side(self):
        return torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext()

    def side_waits_main(self) -> None:
        if self.cuda:
            self.side.wait_event(self.main.record_event())

    def main_waits_side(self) -> None:
        if self.cuda:
            self.main.wait_event(self.side.record_event())

    def read_on_side(self, *ts: torch.Tensor) -> None:
        if self.cuda:
            for t in ts:
                t.record_stream(self.side)

    def read_on_main(self, *ts: torch.Tensor) -> None:
        if self.cuda:
            for t in ts:
                t.record_stream(self.main)


def chunked_experts(dispatch, flat: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                    n_experts: int, experts, shared: Callable[[], torch.Tensor | None] | None,
                    chunks: int, group, exchange: str, recv_bound: float | None,
                    push_programs: int | None = None, carveout: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed experts' output per token (T, d) in ``flat``'s dtype, plus the shared
    experts', and the rows per expert (E,), through ``chunks`` pipelined exchanges
    (module docstring). ``dispatch``: the layer's ``ParallelDispatch`` (its permute and
    combine kernels)."""
    from .symm_dispatch import open_exchange, to_experts, to_sources

    programs = push_programs if push_programs is not None else OVERLAP_PROGRAMS
    carve = (carveout if carveout is not None else OVERLAP_CARVEOUT) if flat.is_cuda else 0
    sizes = chunk_sizes(flat.shape[0], chunks)
    pieces = list(zip(flat.split(sizes), expert_ids.split(sizes), weights.split(sizes)))
    permuted = [dispatch.permute(f, ids, n_experts, None) for f, ids, _ in pieces]  # (rows, slots, counts) each
    st = _Streams(flat.device)
    st.side_waits_main()  # the permuted rows and counts
    st.read_on_side(*(t for rows, _, counts in permuted for t in (rows, counts)))
    c_total = len(sizes)
    exchanges: list = [None] * c_total
    received: list = [None] * c_total
    arrived: list = [None] * c_total

    def send(c: int) -> None:
        rows, _, counts = permuted[c]
        with st.on_side():
            ex = open_exchange(rows, counts, group, exchange, recv_bound, lane=c % 2, programs=programs)
            ex.streams = st if st.cuda else None
            exchanges[c], received[c] = ex, to_experts(rows, ex)
            arrived[c] = st.side.record_event() if st.cuda else None

    send(0)
    extra = shared() if shared is not None else None  # beside E0
    back: list = [None] * c_total
    for c in range(c_total):
        if c + 1 < c_total:
            send(c + 1)  # beside G_c
        if st.cuda:
            st.main.wait_event(arrived[c])
            st.read_on_main(received[c], exchanges[c].recv_counts)
        y = _experts_carved(experts, received[c], exchanges[c].recv_counts, carve)
        st.side_waits_main()  # G_c done
        st.read_on_side(y)
        with st.on_side():
            back[c] = to_sources(y, exchanges[c])
    st.main_waits_side()
    st.read_on_main(*back)
    outs = [dispatch.combine(b, slots, w, f) for b, (_, slots, _), (f, _, w) in zip(back, permuted, pieces)]
    out = torch.cat(outs).to(flat.dtype) if len(outs) > 1 else outs[0].to(flat.dtype)
    counts = torch.stack([counts for _, _, counts in permuted]).sum(0)
    return (out if extra is None else out + extra), counts
