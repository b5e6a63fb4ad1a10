"""The norm styles: a norm on the residual stream (``norm``) and a per-head norm on
tensor-parallel heads (``head_norm``). Placements and collectives: the table in ``styles.py``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from .sequence_gather import gather_sequence
from .styles import SEQ_DIM, TPKernels, TPStyle


@dataclass(frozen=True, kw_only=True)
class Norm(TPStyle):
    """A norm (or any parameter-replicated module) on the residual stream.

    Under SP it runs on the sequence shard and all-gathers its output; with
    ``gather_output=False`` the output stays sequence-sharded (a post-norm model whose norm
    output is the residual stream).
    """

    gather_output: bool = True
    sequence_dim: int = SEQ_DIM
    module_types = (nn.Module,)

    def resolve(self, sequence_parallel: bool, kernels: TPKernels = TPKernels()) -> ParallelStyle:
        return _NormParallel(sequence_parallel=sequence_parallel,
                             sequence_dim=self.sequence_dim, gather_output=self.gather_output,
                             defer_gather=sequence_parallel and kernels.gathers_in_colwise)


class _NormParallel(ParallelStyle):
    """``defer_gather``: an output to gather stays a ``Shard(seq)`` DTensor: the column-parallel
    layers reading it gather it (once, ``gather_once.py``), DTensor wherever else it must."""

    def __init__(self, *, sequence_parallel: bool, sequence_dim: int, gather_output: bool,
                 defer_gather: bool = False):
        super().__init__()
        self.input_layout = Shard(sequence_dim) if sequence_parallel else Replicate()
        self.gather_output = gather_output
        self.defer_gather = defer_gather

    @staticmethod
    def _replicate_params(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for p_name, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(p_name, nn.Parameter(distribute_tensor(p, mesh, [Replicate()])))

    def _prepare_input(self, mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x, *rest = inputs
        if isinstance(x, DTensor):
            if x.placements != (self.input_layout,):
                x = x.redistribute(placements=[self.input_layout])
        else:
            x = DTensor.from_local(x, mesh, [self.input_layout], run_check=False)
        return (x, *rest)

    def _prepare_output(self, mod: nn.Module, out: DTensor, mesh: DeviceMesh):
        if self.gather_output and self.defer_gather:
            return out  # Shard(seq): gathered by the column-parallel layers after it
        if self.gather_output and isinstance(self.input_layout, Shard):  # SP: Shard(seq) -> Replicate
            return gather_sequence(out, self.input_layout.dim)  # (DTensor's collectives, less host work)
        if self.gather_output:  # no SP: a no-op whose backward turns the Partial gradient Replicate
            return out.redistribute(placements=[Replicate()])  # stays a DTensor
        return out.to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._replicate_params,
                                 self._prepare_input, self._prepare_output)


@dataclass(frozen=True, kw_only=True)
class HeadNorm(TPStyle):
    """A norm over each head's features applied to tensor-parallel heads (Qwen3's q_norm /
    k_norm, OLMo-style per-head norms): its input is this rank's heads, a plain local
    ``(..., heads/t, head_dim)`` tensor. The weights become ``Replicate`` DTensors and the
    input is read as ``Shard(head_dim - 1)``, so the norm runs on the local heads and each
    weight's gradient is ``Partial`` (every rank saw other heads), summed over tp after
    backward like the SP norms'. The output is local again."""

    heads_dim: int = -2
    module_types = (nn.Module,)

    def resolve(self, sequence_parallel: bool, kernels: TPKernels = TPKernels()) -> ParallelStyle:
        return _HeadNormParallel(heads_dim=self.heads_dim)


class _HeadNormParallel(ParallelStyle):
    def __init__(self, *, heads_dim: int):
        super().__init__()
        self.heads_dim = heads_dim

    def _prepare_input(self, mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x, *rest = inputs
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Shard(self.heads_dim % x.dim())], run_check=False)
        return (x, *rest)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, _NormParallel._replicate_params, self._prepare_input,
                                 lambda mod, out, mesh: out.to_local() if isinstance(out, DTensor) else out)
