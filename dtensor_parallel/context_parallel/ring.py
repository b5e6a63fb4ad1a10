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

Packed documents: ``document_ids`` (b, s_local), this rank's shard of ids that do not
decrease along the global sequence, travel with their key/value block (a few bytes per
token); every block call masks query i from key j unless their ids match, and the
backends skip key ranges no query of the block can see (``blocks.py``). Sharded per
document (``sharding.document_zigzag_indices``, with the tokens' global ``positions``),
the ranks' tokens interleave, so no step halves: every step attends the whole local block
to the whole received one, masked by document and global position (key j visible to query
i when their documents match and pos_j <= pos_i), and the backends' range skipping does
the work the halving did. Every rank still runs every step, so the ring's collectives
stay the same on every rank whatever the documents: a step whose keys no query sees costs
only its (skipped) launch.

The ring is two ``torch.library`` custom ops (``dtensor_parallel::ring_attention`` and its
backward), so ``torch.compile`` puts it in the graph as one opaque node with a fake
(shape-only) implementation, instead of a graph break; the process group travels as its
name and the block backend as its name (strings are op arguments, objects are not).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from .blocks import get_backend
from .ring_comm import RingComm

LOCAL = ""  # the group name of no group: one rank, the whole sequence (the ring of one step)


class _NoRing:
    """The ring of one rank: the own block only, nothing sent."""

    rank, size = 0, 1


def _comm(group_name: str):
    return _NoRing() if group_name == LOCAL else RingComm(_resolve_process_group(group_name))


def _ring_steps(blocks: list, comm):
    """Yield (j, blocks of rank j) for j = r, r-1, ... around the ring; the next rotation is
    in flight while the caller computes on the current blocks (None entries stay None)."""
    cur = blocks
    for i in range(comm.size):
        works = None
        if i + 1 < comm.size:
            moving = [t for t in cur if t is not None]
            received, works = comm.start(moving)
            it = iter(received)
            nxt = [None if t is None else next(it) for t in cur]
        yield (comm.rank - i) % comm.size, cur
        if works is not None:
            comm.wait(works)
            cur = nxt


def _half(doc, rows: slice):
    return None if doc is None else doc[:, rows]


def _by_position(doc_q, doc_k, pos_q, pos_k) -> dict:
    return {"doc_q": doc_q, "doc_k": doc_k, "pos_q": pos_q, "pos_k": pos_k}


def _forward(q, k, v, doc, pos, causal: bool, scale: float, comm, backend):
    b, hq, s, d = q.shape
    c = s // 2
    out = torch.empty(b, hq, s, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, hq, s, device=q.device, dtype=torch.float32)
    for j, (k_j, v_j, doc_j, pos_j) in _ring_steps([k, v, doc, pos], comm):
        first = j == comm.rank  # step 0: the own block, written rather than merged
        if pos is not None:  # sharded per document: whole blocks, masked by document and position
            backend.forward_step(q, k_j, v_j, out, lse, False, scale, accumulate=not first,
                                 **_by_position(doc, doc_j, pos, pos_j))
        elif first or not causal:
            backend.forward_step(q, k_j, v_j, out, lse, causal, scale, accumulate=not first,
                                 doc_q=doc, doc_k=doc_j)
        elif j < comm.rank:  # all our queries see j's first chunk only
            backend.forward_step(q, k_j[:, :, :c], v_j[:, :, :c], out, lse, False, scale, accumulate=True,
                                 doc_q=doc, doc_k=_half(doc_j, slice(0, c)))
        else:  # only our second chunk sees j, all of it: merge into the second half in place
            backend.forward_step(q[:, :, c:], k_j, v_j, out[:, :, c:], lse[:, :, c:], False, scale,
                                 accumulate=True, doc_q=_half(doc, slice(c, None)), doc_k=doc_j)
    return out, lse


def _backward(dout, q, k, v, out, lse, doc, pos, causal: bool, scale: float, comm, backend):
    """dQ stays home; the dK/dV accumulator of each key/value block travels with it. A
    block's accumulator is sent on as soon as this rank has added its share, which the backend
    signals (``kv_ready``) before it computes the block's dQ: the Triton backend between its
    dK/dV and dQ kernels, so each hop, the last one home included, travels beside a dQ kernel.
    The hop home carries the finished sums, which the op casts to k's dtype anyway, so they
    travel cast (half the bytes in bf16, the same values).

    The backend writes step 0's gradients (the own block: every row and key) straight into
    the fp32 accumulators, and adds the later steps' dQ into its accumulator, so the ring
    needs no zero fill and no fp32 copies of a block's gradients. A later step's dK/dV go to
    buffers of their own (no fill) and are added to the arriving accumulator once the kernel
    is done: adding inside the kernel would make it wait for the accumulator's hop, which
    leaves only when the previous step's dK/dV are done (on 2 x H200, in separate calls, 8K
    tokens: 10.34 ms with the add in the kernel, 10.29 after it; sdpa blocks 8.73 and 8.54)."""
    c = q.shape[2] // 2
    dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    held: dict = {}  # "acc": this rank's (dK, dV) accumulator; "in_flight": (received, works) of the next

    for step, (j, (k_j, v_j, doc_j, pos_j)) in enumerate(_ring_steps([k, v, doc, pos], comm)):
        rows, keys = slice(None), slice(None)
        if pos is not None or j == comm.rank or not causal:
            args = (dout, q, k_j, v_j, out, lse)
            mask = _by_position(doc, doc_j, pos, pos_j) if pos is not None else {"doc_q": doc, "doc_k": doc_j}
            block_causal = causal and pos is None and j == comm.rank
        elif j < comm.rank:  # all our queries, j's first chunk of keys
            keys = slice(0, c)
            args = (dout, q, k_j[:, :, keys], v_j[:, :, keys], out, lse)
            mask, block_causal = {"doc_q": doc, "doc_k": _half(doc_j, keys)}, False
        else:  # our second chunk of queries, all of j's keys
            rows = slice(c, None)
            args = (dout[:, :, rows], q[:, :, rows], k_j, v_j, out[:, :, rows], lse[:, :, rows])
            mask, block_causal = {"doc_q": _half(doc, rows), "doc_k": doc_j}, False
        gk = torch.empty(args[2].shape, device=k.device, dtype=torch.float32)
        gv = torch.empty(args[3].shape, device=v.device, dtype=torch.float32)

        def kv_ready(step=step, keys=keys, gk=gk, gv=gv) -> None:  # called inside backward_block
            if step == 0:
                held["acc"] = (gk, gv)  # the own block's keys: all of them
            else:
                (dk, dv), works = held["in_flight"]
                comm.wait(works)
                dk[:, :, keys] += gk
                dv[:, :, keys] += gv
                held["acc"] = (dk, dv)
            if comm.size > 1:
                home = step == comm.size - 1  # the hop home: the sums are final
                held["in_flight"] = comm.start([t.to(k.dtype) for t in held["acc"]] if home else list(held["acc"]))

        backend.backward_block(*args, block_causal, scale, into=(dq[:, :, rows], gk, gv), add_q=step > 0,
                               kv_ready=kv_ready, **mask)
    if comm.size == 1:
        return dq, *held["acc"]
    (dk, dv), works = held["in_flight"]  # after cp hops each accumulator is home
    comm.wait(works)
    return dq, dk, dv


# ---- the custom ops ----------------------------------------------------------------------
@torch.library.custom_op("dtensor_parallel::ring_attention", mutates_args=())
def ring_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None,
                      positions: torch.Tensor | None, causal: bool, scale: float, group_name: str, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q's dtype, lse fp32 (b, hq, s)) of ring attention over the named group."""
    out, lse = _forward(q, k, v, document_ids, positions, causal, scale, _comm(group_name), get_backend(backend))
    return out.to(q.dtype), lse


@ring_attention_op.register_fake
def _(q, k, v, document_ids, positions, causal, scale, group_name, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("dtensor_parallel::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, document_ids: torch.Tensor | None,
                               positions: torch.Tensor | None, causal: bool, scale: float, group_name: str,
                               backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _backward(dout, q, k, v, out, lse, document_ids, positions, causal, scale, _comm(group_name),
                           get_backend(backend))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, document_ids, positions, causal, scale, group_name, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, document_ids, positions, causal, scale, group_name, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, document_ids, positions)
    ctx.args = (causal, scale, group_name, backend)


def _backward_rule(ctx, dout, _dlse):
    q, k, v, out, lse, document_ids, positions = ctx.saved_tensors
    dq, dk, dv = ring_attention_backward_op(dout.contiguous(), q, k, v, out, lse, document_ids, positions, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


ring_attention_op.register_autograd(_backward_rule, setup_context=_setup_context)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None,
                   group: dist.ProcessGroup | None, backend: str,
                   document_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """q (b, hq, s_local, d), k/v (b, hkv, s_local, d), sequences zigzag-sharded over
    ``group`` (None: one rank, the whole sequence); ``document_ids`` (b, s_local) the
    shard's document ids, or None; ``positions`` (b, s_local) the shard's global positions
    when it was sharded per document (``document_zigzag_indices``; needs ``document_ids``
    and ``causal``); returns (b, hq, s_local, d)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    size = 1 if group is None else dist.get_world_size(group)
    if causal and size > 1 and q.shape[2] % 2:
        raise ValueError(f"local sequence {q.shape[2]} is odd: zigzag needs two equal chunks")
    if document_ids is not None and tuple(document_ids.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"document_ids of shape {tuple(document_ids.shape)} do not match the queries' "
                         f"(batch, sequence) {(q.shape[0], q.shape[2])}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    name = LOCAL if group is None or size == 1 else group.group_name
    docs = None if document_ids is None else document_ids.to(torch.int32).contiguous()
    if positions is not None:
        if docs is None or not causal:
            raise ValueError("ring attention by global positions is for causal attention over documents sharded "
                             "per document: pass document_ids and causal=True with positions")
        positions = positions.expand(docs.shape).to(torch.int32).contiguous()
    return ring_attention_op(q, k, v, docs, positions, bool(causal), scale, name, backend)[0]
