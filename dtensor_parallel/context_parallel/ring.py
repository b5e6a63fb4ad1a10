"""Ring attention over the cp group, zigzag-aware (Liu et al. 2023, "Ring Attention with
Blockwise Transformers"; load balancing as in Brandon et al. 2023 / ring-flash-attention).

Each rank holds queries and keys/values of two sequence chunks, r and 2cp-1-r. Over cp
steps the key/value blocks rotate around the ring (step i holds rank (r-i)'s), the next
rotation in flight while the current block is computed. With causal attention and that
layout every step but the first does exactly half a block:

- step 0, own keys: causal attention over the rank's two chunks (in position order);
- keys from a rank j < r: all queries attend to j's first chunk (j's second chunk lies
  after both of ours);
- keys from a rank j > r: only our second chunk attends, to both of j's chunks.

So no step is fully masked and none is skipped: zigzag turns causal skipping into halving.
Partial results merge by log-sum-exp in fp32, in place into one (out, lse) buffer pair (the
first step writes it, so it is never zero-filled). The backward runs the same ring: dQ
stays, dK/dV accumulators travel with their key/value block, sent on asynchronously, and
one last rotation brings each home.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .ring_comm import RingComm


def _ring_steps(k: torch.Tensor, v: torch.Tensor, comm: RingComm):
    """Yield (j, k_j, v_j) for j = r, r-1, ... around the ring; the next block's transfer is
    in flight while the caller computes on the current one."""
    k_cur, v_cur = k, v
    for i in range(comm.size):
        works = None
        if i + 1 < comm.size:
            (k_next, v_next), works = comm.start([k_cur, v_cur])
        yield (comm.rank - i) % comm.size, k_cur, v_cur
        if works is not None:
            comm.wait(works)
            k_cur, v_cur = k_next, v_next


def _forward(q, k, v, causal: bool, scale: float, comm: RingComm, backend):
    b, hq, s, d = q.shape
    c = s // 2
    out = torch.empty(b, hq, s, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, hq, s, device=q.device, dtype=torch.float32)
    for j, k_j, v_j in _ring_steps(k, v, comm):
        first = j == comm.rank  # step 0: the own block, written rather than merged
        if first or not causal:
            backend.forward_step(q, k_j, v_j, out, lse, causal, scale, accumulate=not first)
        elif j < comm.rank:  # all our queries see j's first chunk only
            backend.forward_step(q, k_j[:, :, :c], v_j[:, :, :c], out, lse, False, scale, accumulate=True)
        else:  # only our second chunk sees j, all of it: merge into the second half in place
            backend.forward_step(q[:, :, c:], k_j, v_j, out[:, :, c:], lse[:, :, c:], False, scale,
                                 accumulate=True)
    return out, lse


def _backward(dout, q, k, v, out, lse, causal: bool, scale: float, comm: RingComm, backend):
    """dQ stays home; the dK/dV accumulator of each key/value block travels with it. A
    block's accumulator is sent on as soon as this rank has added its share, and the next
    block's arrives while this rank computes on it, so only the last hop (the one that
    brings each accumulator home) is exposed."""
    c = q.shape[2] // 2
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    in_flight = None  # (receive buffers, works) of the accumulator of the block held next
    for j, k_j, v_j in _ring_steps(k, v, comm):
        if j == comm.rank or not causal:
            gq, gk, gv = backend.backward_block(dout, q, k_j, v_j, out, lse, causal, scale)
            rows, keys = slice(None), slice(None)
        elif j < comm.rank:
            gq, gk, gv = backend.backward_block(dout, q, k_j[:, :, :c], v_j[:, :, :c], out, lse, False, scale)
            rows, keys = slice(None), slice(0, c)
        else:
            gq, gk, gv = backend.backward_block(dout[:, :, c:], q[:, :, c:], k_j, v_j,
                                                out[:, :, c:], lse[:, :, c:], False, scale)
            rows, keys = slice(c, None), slice(None)
        dq[:, :, rows] += gq
        if in_flight is None:  # step 0: the own block's accumulator starts here
            dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
            dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        else:
            (dk, dv), works = in_flight
            comm.wait(works)
        dk[:, :, keys] += gk
        dv[:, :, keys] += gv
        in_flight = comm.start([dk, dv])
    (dk, dv), works = in_flight  # after cp hops each accumulator is home
    comm.wait(works)
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, group, backend):
        comm = RingComm(group)
        out, lse = _forward(q, k, v, causal, scale, comm, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.group, ctx.backend = causal, scale, group, backend
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale, RingComm(ctx.group), ctx.backend)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


# Compiled blocks run the ring eagerly (one graph break): Dynamo would otherwise trace into
# the autograd Function and the Triton launches, and on torch 2.11 it fails there ("Can't
# construct an AttrSource without a valid base source" at the autotuner's config pruning on
# an H200, a fake-tensor error inside the interpreter on CPU). Issue 21 is the ring in the graph.
@torch.compiler.disable
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None,
                   group: dist.ProcessGroup, backend) -> torch.Tensor:
    """q (b, hq, s_local, d), k/v (b, hkv, s_local, d), sequences zigzag-sharded over
    ``group``; returns (b, hq, s_local, d)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    if causal and q.shape[2] % 2:
        raise ValueError(f"local sequence {q.shape[2]} is odd: zigzag needs two equal chunks")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _RingAttention.apply(q, k, v, causal, scale, group, backend)
