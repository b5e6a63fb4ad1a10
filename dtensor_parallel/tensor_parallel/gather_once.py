"""One sequence all-gather per norm output under SP, done by the column-parallel layers that
read it, fused into the first one's GEMM.

Under SP a norm's output is sequence-sharded (``Shard(1)``) and the column-parallel layers after
it (q, k, v; w1, w3) need it whole. Without the fused kernels the norm gathers its own output
(``styles.Norm``): one all-gather, and every layer reads the ``Replicate`` DTensor. With
``kernels['sp_reduce_scatter']`` resolved to ``"triton"`` the norm passes its ``Shard(1)`` output
on, and the first column-parallel layer that reads it gathers it inside its own GEMM
(``all_gather_matmul.py``, the copy engine pulling peers' shards while the GEMM of the chunks
already here runs). The gathered tensor is kept on the input DTensor, so the next layers that
read the same input multiply it without communicating::

    x = attention_norm(h)   # Shard(1) DTensor
    wq(x)                   # all_gather_matmul(x_r, wq_r) -> q_r, gathered; x keeps gathered
    wk(x), wv(x)            # gathered @ wk_r^T, gathered @ wv_r^T: local GEMMs

The leader is whichever layer reads the input first (q and w1 in Llama: the largest GEMMs, so
the most to hide the gather behind).

Why on the input tensor: the gathered tensor lives exactly as long as the input does (a
recomputed forward makes a new input, which gathers again), and dynamo traces an attribute on a
tensor made inside the compiled block as block-local state, while an attribute on a module or a
shared object is a side effect that activation checkpointing under ``torch.compile`` rejects.
(A mode that re-wraps module inputs, as ``CommDebugMode`` does, hands each layer a new input
object: each then gathers for itself, correct but unshared.)

Gradients: a follower's local GEMM gives its partial sum of the gathered input's gradient (this
rank's N rows only); autograd adds the followers' partials into the op's second output's
gradient, and the op's backward adds the leader's own (``dout @ w``) chunk by chunk and
reduce-scatters the total once (fused: ``all_gather_matmul_input_grad``), as the norm's one
all-gather did in backward before.

When the op cannot serve a call (``all_gather_matmul.cannot_serve``: a dtype, a group size, the
fake process group; all ranks decide alike), one log line per reason says why and DTensor's
all-gather (NCCL) serves it, still once per input: the cache then holds the ``Replicate``
DTensor and the followers use ``F.linear`` on DTensors. A column-parallel module that is not a
plain ``nn.Linear`` (or a ``Colwise(fused=False)`` rule) shares that DTensor gather too
(``styles._GatherOnceColwise``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..warn_once import warn_once
from .all_gather_matmul import all_gather_matmul, cannot_serve
from .local_linear import SwappedLinear

logger = logging.getLogger(__name__)

_LOCAL = "_dtp_gathered_local"  # the op's gathered local tensor (followers compute locally)
_DTENSOR = "_dtp_gathered"  # DTensor's all-gather, a Replicate DTensor


def _is_shard(placements: tuple, dim: int, ndim: int) -> bool:
    return len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim % ndim == dim


def gathered_dtensor(x: DTensor) -> DTensor:
    """``x`` as a ``Replicate`` DTensor: DTensor's all-gather, once per ``x`` (kept on it).
    Synchronous, as the norm's own gather was (its backward reduce-scatters the summed
    gradients of every layer that read it)."""
    g = getattr(x, _DTENSOR, None)
    if g is None:
        g = x.redistribute(placements=[Replicate()] * x.device_mesh.ndim, async_op=False)
        setattr(x, _DTENSOR, g)
    return g


def _log_once(reason: str) -> None:
    warn_once(logger, reason, "the fused all-gather + column-parallel matmul cannot serve a call (%s): DTensor's "
              "all-gather (NCCL) serves it, once for the layers that read the same input", reason)


def colwise_forward(mod: nn.Linear, x: torch.Tensor, dim: int) -> torch.Tensor:
    """The forward of a column-parallel Linear whose input arrives sharded on ``dim`` (a
    ``Shard(dim)`` DTensor on a 1-D mesh): the gathered input kept on ``x`` if a layer before
    gathered it, else the fused op (which leaves it there), else DTensor's gather (logged).
    Any other input (a ``Replicate`` DTensor, another mesh) is plain ``F.linear`` on DTensors."""
    w, b = mod.weight, mod.bias
    if (not isinstance(x, DTensor) or not isinstance(w, DTensor) or x.device_mesh.ndim != 1
            or w.device_mesh != x.device_mesh or not _is_shard(x.placements, dim % x.ndim, x.ndim)
            or not _is_shard(w.placements, 0, 2)
            or (b is not None and (not isinstance(b, DTensor) or not _is_shard(b.placements, 0, 1)))):
        return F.linear(x, w, b)
    mesh, dim = x.device_mesh, dim % x.ndim
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    wl = w.to_local(grad_placements=[Shard(0)])  # its gradient: this rank's rows, complete
    bl = None if b is None else b.to_local(grad_placements=[Shard(0)])
    local = getattr(x, _LOCAL, None)
    if local is not None and local.dtype == compute_dtype and (autocast or wl.dtype == local.dtype):
        out = F.linear(local, wl, bl)  # a follower: its partial input gradient joins the op's
        return DTensor.from_local(out, mesh, [Shard(out.ndim - 1)], run_check=False)
    if getattr(x, _DTENSOR, None) is not None:
        return F.linear(gathered_dtensor(x), w, b)
    xl = x.to_local(grad_placements=[Shard(dim)])  # its gradient: this rank's sequence shard
    if autocast:  # what F.linear does under autocast
        xl, wl = xl.to(compute_dtype), wl.to(compute_dtype)
    reason = cannot_serve(xl, wl, dim, mesh.get_group())
    if reason is not None:
        _log_once(reason)
        return F.linear(gathered_dtensor(x), w, b)
    with torch.autocast(device_type, enabled=False):
        out, gathered = all_gather_matmul(xl, wl, dim, mesh.get_group())
    setattr(x, _LOCAL, gathered)
    if bl is not None:
        out = out + bl.to(out.dtype)
    return DTensor.from_local(out, mesh, [Shard(out.ndim - 1)], run_check=False)


class FusedColwiseLinear(SwappedLinear):
    """A column-parallel ``nn.Linear`` whose input arrives sequence-sharded and is gathered
    inside its GEMM, or taken already gathered from the input (:func:`colwise_forward`);
    parameters, state dict and all else are nn.Linear's. ``apply_tensor_parallel`` puts one in
    a plain Linear's place (holding that Linear's own parameters) under
    ``styles._GatherOnceColwise`` with ``fused=True``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, gather_dim: int = 1, **kw):
        super().__init__(in_features, out_features, bias, **kw)
        self.gather_dim = gather_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return colwise_forward(self, x, self.gather_dim)
