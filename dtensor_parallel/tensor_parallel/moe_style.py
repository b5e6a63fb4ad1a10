"""The MoE layer under tensor parallelism: token parallel over tp (the ``moe`` style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
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

    The router's weights (the layer's ``token_parallel_weights``) become ``Replicate``
    DTensors on tp that the layer reads as local tensors with a ``Partial`` gradient
    (``models.moe.token_local``: each rank saw other tokens), reduced like the SP norm
    weights (FSDP, or ``reduce_partial_grads``). The routed experts are left alone (they are
    EP-sharded or replicated by ``apply_expert_parallel``); a shared expert gets its own
    rules (gather the tokens once, colwise, rowwise back to ``Shard(0)``).
    """

    @property
    def module_types(self) -> tuple[type, ...]:  # type: ignore[override]
        from ..models.moe import MoELayer  # lazily: the models package imports these styles
        return (MoELayer,)

    def resolve(self, sequence_parallel: bool, kernels: TPKernels = TPKernels()) -> ParallelStyle:
        return _MoEParallel(sequence_parallel=sequence_parallel)


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
        for name in module.token_parallel_weights:  # the router's: read locally (models.moe.token_local)
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            w = getattr(owner, attr)
            owner.register_parameter(attr, nn.Parameter(distribute_tensor(w, device_mesh, [Replicate()]),
                                                        requires_grad=w.requires_grad))
        module.register_forward_pre_hook(lambda m, inp: self._to_sequence_shard(device_mesh, m, inp))
        module.register_forward_hook(lambda m, inp, out: self._from_sequence_shard(device_mesh, m, inp, out))
        return module
