"""The norm styles: a norm on the residual stream (``norm``) and a per-head norm on
tensor-parallel heads (``head_norm``). Placements and collectives: the table in ``styles.py``.

Eager SP norms on local tensors. Under SP a residual-stream norm runs on this rank's sequence
shard with replicated weights. Through DTensor each of its element-wise ops (an RMSNorm has
eight: the cast, the square, the mean, the epsilon, the rsqrt, two products, the cast back)
is a sharding propagation on the host, again in the selective recompute, and again for each
op of its backward. The result is the same local computation: a norm over the last dim treats
every token alone, so rank r's output is the norm of its shard, and a weight's gradient is this
rank's partial sum over its tokens (``Partial``, summed over tp after backward like any SP
norm's: ``grads.reduce_partial_grads``). So in eager, for the norms known to work token by token
(:func:`per_token_norm`), the forward runs on the local shard with the weights' local tensors
(``to_local(grad_placements=[Partial()])``) and returns a ``Shard(seq)`` DTensor, as DTensor
would: the same kernels in the same order, bit for bit, with a few conversions instead of the
ops' dispatch. Under ``torch.compile``, without SP, and for other modules, the DTensor forms
run as before.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from .sequence_gather import gather_sequence
from .styles import SEQ_DIM, TPKernels, TPStyle


def per_token_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a norm over the last dim only (each token alone): torch's
    LayerNorm / RMSNorm over one trailing dim (transformers' LMs use ``nn.LayerNorm`` itself),
    our RMSNorm, and transformers' ``*RMSNorm`` classes (their forward normalizes
    ``hidden_states`` over the last dim). Not transformers' other ``*LayerNorm`` classes: some
    normalize the channels of a channels-first image (ConvNeXt's)."""
    from ..models.llama import RMSNorm

    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return len(module.normalized_shape) == 1
    if type(module) is RMSNorm:
        return True
    cls = type(module)
    return cls.__module__.startswith("transformers.") and cls.__name__.endswith("RMSNorm")


#: the attribute marking a norm whose forward takes its sequence shard plain in eager: its
#: (tp mesh, sequence dim)
LOCAL_NORM = "_dtp_local_norm"


def _local_norm_forward(self: nn.Module, x, *args, **kwargs):
    """The norm's forward on its local sequence shard in eager (module docstring), bound to the
    norm as its ``forward`` (``types.MethodType``); the class's forward on DTensors wherever
    that does not apply."""
    mesh, seq_dim = getattr(self, LOCAL_NORM)
    # (the class's forward called with self: torch 2.11's Dynamo cannot trace function.__get__,
    # a graph break in every compiled SP block)
    shard, params, forward = Shard(seq_dim), self._parameters, type(self).forward
    plain = not isinstance(x, DTensor)  # (the input hook passes a plain shard on)
    if (torch.compiler.is_compiling() or args or kwargs
            or not (plain or (x.device_mesh == mesh and x.placements == (shard,)))
            or not all(isinstance(p, DTensor) and p.device_mesh == mesh and p.placements == (Replicate(),)
                       for p in params.values() if p is not None)):
        x = DTensor.from_local(x, mesh, [shard], run_check=False) if plain else x
        return forward(self, x, *args, **kwargs)
    held = dict(params)  # (FSDP's unsharded parameters, under 2-D FSDP x TP)
    for name, p in held.items():
        if p is not None:
            params[name] = p.to_local(grad_placements=[Partial()])  # this rank's tokens' share
    try:
        # (an alias of a plain input: the norm's own uses of it sum their gradients first,
        # then join the residual's, in the order DTensor's conversion gives; bit for bit)
        out = forward(self, x.view_as(x) if plain else x.to_local())
    finally:
        params.update(held)
    return DTensor.from_local(out, mesh, [shard], run_check=False)  # (SP: the sequence divides evenly)


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
        if getattr(mod, LOCAL_NORM, False) and not isinstance(x, DTensor) and not torch.compiler.is_compiling():
            return inputs  # its forward runs on the plain shard (module docstring)
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
        module = distribute_module(module, device_mesh, self._replicate_params,
                                   self._prepare_input, self._prepare_output)
        if (isinstance(self.input_layout, Shard) and device_mesh.ndim == 1 and per_token_norm(module)
                and "forward" not in module.__dict__):  # (not a forward someone else set on the instance)
            setattr(module, LOCAL_NORM, (device_mesh, self.input_layout.dim))
            module.forward = types.MethodType(_local_norm_forward, module)
        return module


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
