"""The column-parallel ``nn.Linear`` computed on local tensors in eager mode, and
``SwappedLinear``, the base of every Linear that ``apply_tensor_parallel`` swaps in for a
plain one (this one, ``gather_once.FusedColwiseLinear`` and
``matmul_reduce_scatter.FusedRowwiseLinear``).

Under TP a column-parallel layer's input is a ``Replicate`` DTensor (the norm's gathered
output under SP, or a replicated activation) and its weight a ``Shard(0)`` DTensor. ``F.linear``
on the DTensors runs each piece through DTensor's dispatch: the autocast casts, the transpose,
the matmul and its views in forward; the two matmuls, transposes and casts in backward; each a
sharding propagation on the host (measured on CPU, ``benchmarks/tp_host_overhead.py``: about
70 us against 8 us for the local ``F.linear``, 130 us against 25 us under bf16 autocast). The
result is the same local GEMM: rank r computes ``x @ w_r^T``, its ``Shard(-1)`` block of the
output, and in backward ``dx_r = dout_r @ w_r`` (a partial sum over the out features: ``Partial``)
and ``dw_r = dout_r^T x`` (its rows: ``Shard(0)``). Megatron's ``ColumnParallelLinear`` runs
exactly this on plain tensors.

So in eager the layer takes the local tensors out of the DTensors with the gradient placements
DTensor would give them (``to_local(grad_placements=...)``), multiplies them with plain
``F.linear`` (autocast casts the local tensors, as it would the DTensors), and returns the
local ``Shard(-1)`` block as a plain tensor: the style's output hook
(``styles._ColwiseParallel``) passes a plain output on as it is (it installs this layer only
where the output layout is ``Shard(-1)`` and the output is wanted local). The input
gradients of the layers reading one input (q, k, v) still add up as ``Partial`` DTensors and
leave through the norm's single reduce-scatter (or the one conversion back), as before.

Under ``torch.compile`` the layer is ``F.linear`` on the DTensors as before (the compiled
graph is unchanged: AOTAutograd lowers the DTensor ops to the same local ones anyway, and the
host cost is paid once, at trace time); so is any input or weight it does not expect (another
mesh, another layout, a bias not ``Shard(0)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Shard


def _serves(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """A ``Replicate`` input and a ``Shard(0)`` weight (and bias) on one 1-D mesh, in eager."""
    if torch.compiler.is_compiling() or not isinstance(x, DTensor) or not isinstance(w, DTensor):
        return False
    mesh = x.device_mesh
    if mesh.ndim != 1 or w.device_mesh != mesh or not x.placements[0].is_replicate():
        return False
    if w.placements[0] != Shard(0):
        return False
    return b is None or (isinstance(b, DTensor) and b.device_mesh == mesh and b.placements[0] == Shard(0))


def colwise_local_forward(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` of a column-parallel layer: this rank's ``Shard(-1)`` block
    as a plain tensor when :func:`_serves` says so, else the DTensor result of ``F.linear``."""
    w, b = mod.weight, mod.bias
    if not _serves(x, w, b):
        return F.linear(x, w, b)
    xl = x.to_local(grad_placements=[Partial()])  # dx_r = dout_r @ w_r: a partial sum over out features
    wl = w.to_local(grad_placements=[Shard(0)])  # dw_r: this rank's rows, complete
    bl = None if b is None else b.to_local(grad_placements=[Shard(0)])
    return F.linear(xl, wl, bl)  # (..., out_features / tp): Shard(-1), local


class SwappedLinear(nn.Linear):
    """An ``nn.Linear`` subclass that ``apply_tensor_parallel`` puts in a plain Linear's place
    (:meth:`from_linear`): it holds that Linear's own parameters, so names, state dict and
    optimizer state are unchanged; only ``forward`` differs."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs):
        """A ``cls`` (built on the meta device: no memory) holding ``linear``'s parameters;
        ``kwargs`` go to ``cls``'s constructor."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        for name, p in linear.named_parameters(recurse=False):
            new.register_parameter(name, p)
        return new


class LocalColwiseLinear(SwappedLinear):
    """A column-parallel ``nn.Linear`` computed on local tensors in eager
    (:func:`colwise_local_forward`), put in a plain Linear's place when its style wants a
    local ``Shard(-1)`` output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return colwise_local_forward(self, x)
