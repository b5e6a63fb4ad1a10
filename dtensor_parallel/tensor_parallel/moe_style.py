"""The MoE layer under tensor parallelism: token parallel over tp (the ``moe`` style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from .styles import SEQ_DIM, TPKernels, TPStyle


@dataclass(frozen=True, kw_only=True)
class MoEParallel(TPStyle):
    """An MoE layer under TP with expert-tensor-parallel size 1 (Megatron-Core's default).

    The MoE runs *token parallel* over tp: each tp rank routes and computes only its own
    sequence shard, as a data-parallel rank would. Its input and output are plain local
    tensors, ``(b, s/tp, d)``: under SP that is the residual stream's own layout (the norm
    before it must not gather: ``Norm(gather_output=False)``); without SP the replicated
    input is sliced to this rank's shard (free; all-gather of its gradient in backward) and
    the output all-gathered (its gradient sliced). So the tp ranks hold distinct tokens in
    both cases and expert parallelism may fold over them (``expert_parallel.py``).

    The router gate becomes a ``Replicate`` DTensor on tp that the router reads as its local
    tensor with a ``Partial`` gradient (each rank saw other tokens), reduced like the SP norm
    weights (FSDP, or ``reduce_partial_grads``). The routed experts are left alone (they are
    EP-sharded or replicated by ``apply_expert_parallel``); a shared expert gets its own
    rules (gather the tokens once, colwise, rowwise back to ``Shard(0)``).
    """

    @property
    def module_types(self) -> tuple[type, ...]:  # type: ignore[override]
        from ..models.moe import MoE  # lazily: the models package imports these styles
        return (MoE,)

    def resolve(self, sequence_parallel: bool, kernels: TPKernels = TPKernels()) -> ParallelStyle:
        return _MoEParallel(sequence_parallel=sequence_parallel)


class TokenParallelLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a tp-``Replicate`` DTensor parameter but *reads* as
    the local tensor, whose gradient goes back as ``Partial`` (summed over tp later). The
    parameter itself (``_parameters['weight']``, ``named_parameters()``) stays the DTensor;
    FSDP sets it through ``_parameters`` too. Used for the MoE router gate, which the
    router multiplies with plain local tokens: the MoE style puts one in the gate's place,
    holding the gate's own parameters (same names)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "TokenParallelLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.register_parameter("weight", linear.weight)
        new.register_parameter("bias", linear.bias)
        return new

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        w = self._parameters.get("weight")
        if w is None:  # (before registration: hasattr must say no)
            raise AttributeError("weight")
        if isinstance(w, DTensor) and w.device_mesh.ndim == 1:  # tp only (or FSDP-unsharded)
            return w.to_local(grad_placements=[Partial()])
        return w


class _MoEParallel(ParallelStyle):
    def __init__(self, *, sequence_parallel: bool):
        super().__init__()
        self.layout = Shard(SEQ_DIM) if sequence_parallel else Replicate()

    def _to_sequence_shard(self, mesh: DeviceMesh, mod: nn.Module, inputs: tuple) -> tuple:
        x, *rest = inputs
        if not isinstance(x, DTensor):
            if self.layout == Shard(SEQ_DIM):
                return inputs  # SP: already this rank's shard
            x = DTensor.from_local(x, mesh, [self.layout], run_check=False)
        if x.placements != (Shard(SEQ_DIM),):
            if x.shape[SEQ_DIM] % mesh.size():
                raise ValueError(f"sequence length {x.shape[SEQ_DIM]} is not divisible by tp={mesh.size()}, "
                                 f"which the MoE layers split their tokens over: pad or cut the sequence to "
                                 f"a multiple of {mesh.size()}")
            x = x.redistribute(placements=[Shard(SEQ_DIM)])  # a local slice; all-gather in backward
        return (x.to_local(), *rest)

    def _from_sequence_shard(self, mesh: DeviceMesh, mod: nn.Module, inputs: tuple, out: torch.Tensor):
        if self.layout == Shard(SEQ_DIM):
            return out
        out = DTensor.from_local(out, mesh, [Shard(SEQ_DIM)], run_check=False)
        return out.redistribute(placements=[self.layout]).to_local()  # all-gather; slice in backward

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        gate = TokenParallelLinear.from_linear(module.router.gate)
        gate.register_parameter("weight", nn.Parameter(distribute_tensor(gate.weight, device_mesh, [Replicate()])))
        module.router.gate = gate
        module.register_forward_pre_hook(lambda m, inp: self._to_sequence_shard(device_mesh, m, inp))
        module.register_forward_hook(lambda m, inp, out: self._from_sequence_shard(device_mesh, m, inp, out))
        return module
