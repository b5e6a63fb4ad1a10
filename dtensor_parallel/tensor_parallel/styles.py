"""Tensor- and sequence-parallel styles: small classes with keyword-only layouts.

Each style resolves, for a given ``sequence_parallel`` setting, to a
``torch.distributed.tensor.parallel.ParallelStyle`` that distributes one module's
parameters over the tp mesh and converts its inputs and outputs. Placements (Megatron-LM
paper, Shoeybi et al. 2019; SP: Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models"):

========== ==================== ========================== ==================================
style      weight               input -> output            communication (forward / backward)
========== ==================== ========================== ==================================
colwise    Shard(0) (out dim)   Replicate -> Shard(-1)     none / all-reduce of the input grad
rowwise    Shard(1) (in dim)    Shard(-1) -> Replicate     all-reduce / none
           (SP)                 Shard(-1) -> Shard(1)      reduce-scatter / all-gather
embedding  Shard(0) (vocab)     Replicate -> Replicate     all-reduce / none
           (SP)                 Replicate -> Shard(1)      reduce-scatter / all-gather
head       Shard(0) (vocab)     Replicate -> Shard(-1)     logits stay vocab-sharded for the
                                                           loss-parallel cross entropy
norm       Replicate            Shard(1) -> Replicate      all-gather / reduce-scatter (SP)
           (no SP)              Replicate -> Replicate     none; the output is a DTensor so the
                                                           q/k/v (or w1/w3) input grads are
                                                           summed before one all-reduce
moe        router Replicate,    Shard(1) -> Shard(1)       none / none (router grads Partial)
           experts untouched    (no SP) Replicate ->       local slice / all-gather in forward;
                                Shard(1) -> Replicate      all-gather / local slice in backward
head_norm  Replicate            local (b, s, h/t, d) ->    none / none (weight grads Partial,
           (per-head norm:      local, as Shard(heads)     summed over tp after backward)
           Qwen3 q/k norms)
attention  (none)               unchanged                  none: it marks the module whose
                                                           forward calls SDPA, where context
                                                           parallelism runs the ring
========== ==================== ========================== ==================================

The norm gathers its output (instead of each following column-parallel layer gathering
its own input) so a block does one all-gather per norm however many projections read it,
as Megatron does with its fused QKV projection. With the Triton SP kernels
(``TPKernels.gathers_in_colwise``) the norm passes its sequence shard on instead, and the
first column-parallel layer reading it does that one all-gather inside its GEMM
(``gather_once.py``, ``all_gather_matmul.py``); the layers after it reuse the gathered input.

The norm styles live in ``norm_styles.py``. In eager, where the torch kernels serve, the
column-parallel layers run on local tensors (``local_linear.py``), the fused row-parallel
layer takes its input plain, the SP norms run on their local shards (``norm_styles.py``) and
the norm's gather skips ``redistribute``'s planning (``sequence_gather.py``): the same
collectives and GEMMs with less host work per layer
(``benchmarks/tp_host_overhead.py``); compiled blocks keep the DTensor forms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel
from torch.distributed.tensor.placement_types import Placement

from .gather_once import FusedColwiseLinear, gathered_dtensor
from .matmul_reduce_scatter import FusedRowwiseLinear
from .sp_reduce_scatter import redistribute_rowwise_output

SEQ_DIM = 1


@dataclass(frozen=True)
class TPKernels:
    """The plan's kernel choices a style resolves its own ``None`` options with:
    ``reduce_scatter`` ("torch": NCCL through DTensor, or "triton": the symmetric-memory
    kernel) for Partial -> Shard outputs under SP, and ``fused`` (a plain row-parallel
    ``nn.Linear`` runs its matmul and the Triton reduce-scatter as one op). With "torch",
    ``selective_recompute`` fuses too (matmul and NCCL reduce-scatter as one op, eager only),
    so the recompute policy saves the layer's output once (``rowwise_nccl.py``).
    ``fused_colwise``: with "triton", the SP all-gather before the column-parallel layers
    moves from the norm into the first such layer's GEMM (``gather_once.py``)."""

    reduce_scatter: str = "torch"
    fused: bool = True
    selective_recompute: bool = False
    fused_colwise: bool = True

    @property
    def gathers_in_colwise(self) -> bool:
        """Under SP, norms pass their sequence shard on and the column-parallel layers gather it."""
        return self.reduce_scatter == "triton" and self.fused_colwise


class TPStyle:
    """Base of our styles: ``resolve(sequence_parallel, kernels)`` gives the torch
    ParallelStyle, with the style's own options (its fields) over the plan's."""

    #: which module attribute must divide by tp (checked before any collective)
    sharded_feature: str | None = None
    module_types: tuple[type, ...] = (nn.Linear,)

    def resolve(self, sequence_parallel: bool, kernels: TPKernels = TPKernels()) -> ParallelStyle | None:
        raise NotImplementedError


def _seq_or_replicate(sequence_parallel: bool) -> Placement:
    return Shard(SEQ_DIM) if sequence_parallel else Replicate()


class _ColwiseParallel(ColwiseParallel):
    """torch's ColwiseParallel, but a DTensor input already in the desired layout is used
    as is. torch compares the *annotated* input layout with the desired one and calls
    ``redistribute`` even when the DTensor is already replicated; that no-op's backward
    then all-reduces each projection's input gradient separately (q, k and v: three
    all-reduces). Skipping it lets the three partial gradients add up first and leave
    through the norm's single reduce-scatter (SP) or the one conversion back (no SP).

    A plain ``nn.Linear`` whose output is wanted as a local ``Shard(-1)`` block
    (``local_output_block``) is computed on local tensors in eager (``local_linear.py``): its
    plain output passes the output hook as it is."""

    @property
    def local_output_block(self) -> bool:
        return type(self) is _ColwiseParallel and self.use_local_output and tuple(self.output_layouts) == (Shard(-1),)

    @staticmethod
    def _prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh):
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, device_mesh, input_layouts, run_check=False)
        if tuple(x.placements) != tuple(desired_input_layouts):
            x = x.redistribute(placements=desired_input_layouts, async_op=True)
        return x

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if not isinstance(outputs, DTensor):  # LocalColwiseLinear: already the local Shard(-1) block
            return outputs
        return ColwiseParallel._prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh)


class _GatherOnceColwise(_ColwiseParallel):
    """The column-parallel style when the norm before it passes its sequence shard on
    (``TPKernels.gathers_in_colwise``): a ``FusedColwiseLinear`` (``fused``: put in a plain
    Linear's place by ``apply_tensor_parallel``) takes the ``Shard(1)`` input itself and
    gathers it inside its GEMM; any other module gets the input gathered by DTensor, once for
    all the layers reading it (``gather_once.gathered_dtensor``)."""

    def __init__(self, *, fused: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.fused = fused

    def _prepare_input_fn(self, input_layouts, desired_input_layouts, mod, inputs, device_mesh):
        # bound to the instance (torch binds this with partial(self._prepare_input_fn, ...))
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, device_mesh, input_layouts, run_check=False)
        if isinstance(mod, FusedColwiseLinear) or tuple(x.placements) == tuple(desired_input_layouts):
            return x
        if len(x.placements) == 1 and isinstance(x.placements[0], Shard):
            return gathered_dtensor(x)
        return x.redistribute(placements=desired_input_layouts, async_op=False)


class _RowwiseParallel(RowwiseParallel):
    """torch's RowwiseParallel with a synchronous output redistribution, through the
    reduce-scatter backend this style instance holds.

    torch redistributes with ``async_op=True``, so the local output is an
    ``AsyncCollectiveTensor``. When that output enters a ``torch.compile``-d block, the
    gradient coming back out of the compiled graph reaches the redistribution as a plain
    tensor and its backward fails (seen with torch 2.13, 2026-11-26). A synchronous
    redistribution gives a plain tensor; on GPU the wait is a stream wait, not a host
    block, and the very next op (the residual add) needs the result anyway.

    ``fused_scatter_dim``: set when a plain ``nn.Linear`` under this style runs the fused
    matmul + reduce-scatter (``apply_tensor_parallel`` gives it a ``FusedRowwiseLinear``),
    communicating by ``fused_push``: "copy" (Triton), or "nccl" with the torch backend under
    selective recompute (``save_once``).
    """

    def __init__(self, *, reduce_scatter: str = "torch", fused: bool = False, save_once: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.reduce_scatter, self.fused, self.save_once = reduce_scatter, fused, save_once

    @property
    def fused_push(self) -> str:
        return "copy" if self.reduce_scatter == "triton" else "nccl"

    @property
    def fused_scatter_dim(self) -> int | None:
        target = self.output_layouts[0]
        if self.fused and isinstance(target, Shard) and (self.reduce_scatter == "triton" or self.save_once):
            return target.dim
        return None

    def _prepare_input_fn(self, input_layouts, desired_input_layouts, mod, inputs, device_mesh):
        # bound to the instance; a plain input of the fused layer stays plain in eager (it reads
        # it as its Shard(-1) block: rowwise_forward), sparing a DTensor round trip
        if (not torch.compiler.is_compiling() and self.fused_scatter_dim is not None
                and isinstance(mod, FusedRowwiseLinear) and not isinstance(inputs[0], DTensor)
                and tuple(input_layouts) == tuple(desired_input_layouts) == (Shard(-1),)):
            return inputs
        return RowwiseParallel._prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh)

    def _prepare_output_fn(self, output_layouts, use_local_output, mod, outputs, device_mesh):
        # bound to the instance (torch binds this with partial(self._prepare_output_fn, ...))
        if not isinstance(outputs, DTensor):  # the fused layer's plain Shard(scatter dim) block
            return outputs if use_local_output else DTensor.from_local(outputs, device_mesh, output_layouts,
                                                                        run_check=False)
        if tuple(outputs.placements) != tuple(output_layouts):
            # Partial -> Shard(seq) may take the Triton reduce-scatter (sp_reduce_scatter.py)
            outputs = redistribute_rowwise_output(outputs, output_layouts, self.reduce_scatter)
        return outputs.to_local() if use_local_output else outputs


@dataclass(frozen=True, kw_only=True)
class Colwise(TPStyle):
    """Column-parallel linear. ``input_layout=None``: Shard(1) under SP (a local input is
    then sequence-sharded and gathered here), Replicate otherwise. Under SP with the Triton
    kernels (``TPKernels.gathers_in_colwise``) the input arrives sequence-sharded from the norm
    and is gathered once for all the layers reading it: ``fused`` (``None``: True) inside a
    plain Linear's GEMM (``all_gather_matmul.py``), False by DTensor's all-gather."""

    input_layout: Placement | None = None
    output_layout: Placement = Shard(-1)
    use_local_output: bool = True
    fused: bool | None = None
    sharded_feature = "out_features"

    def resolve(self, sequence_parallel: bool, kernels: TPKernels = TPKernels()) -> ParallelStyle:
        if sequence_parallel and kernels.gathers_in_colwise and self.input_layout in (None, Shard(SEQ_DIM)):
            return _GatherOnceColwise(input_layouts=Shard(SEQ_DIM), output_layouts=self.output_layout,
                                      use_local_output=self.use_local_output, fused=self.fused is not False)
        return _ColwiseParallel(
            input_layouts=self.input_layout or _seq_or_replicate(sequence_parallel),
            output_layouts=self.output_layout, use_local_output=self.use_local_output)


@dataclass(frozen=True, kw_only=True)
class Rowwise(TPStyle):
    """Row-parallel linear. ``output_layout=None``: Shard(1) under SP (reduce-scatter),
    Replicate otherwise (all-reduce). ``reduce_scatter`` ("torch" or "triton") and
    ``fused`` (matmul and Triton reduce-scatter as one op, for a plain ``nn.Linear``; with
    "torch", matmul and NCCL reduce-scatter as one op under selective recompute):
    ``None`` takes the plan's (``kernels['sp_reduce_scatter']``, ``fused_rowwise``)."""

    input_layout: Placement = Shard(-1)
    output_layout: Placement | None = None
    use_local_output: bool = True
    reduce_scatter: str | None = None
    fused: bool | None = None
    sharded_feature = "in_features"

    def resolve(self, sequence_parallel: bool, kernels: TPKernels = TPKernels()) -> ParallelStyle:
        return _RowwiseParallel(
            input_layouts=self.input_layout,
            output_layouts=self.output_layout or _seq_or_replicate(sequence_parallel),
            use_local_output=self.use_local_output,
            reduce_scatter=self.reduce_scatter or kernels.reduce_scatter,
            fused=kernels.fused if self.fused is None else self.fused,
            save_once=kernels.selective_recompute)


@dataclass(frozen=True, kw_only=True)
class VocabEmbedding(TPStyle):
    """Vocab-parallel embedding: rows (tokens) sharded; out-of-shard tokens give zeros and
    the partial sums are reduced (scattered on the sequence under SP)."""

    output_layout: Placement | None = None
    sharded_feature = "num_embeddings"
    module_types = (nn.Embedding,)

    def resolve(self, sequence_parallel: bool, kernels: TPKernels = TPKernels()) -> ParallelStyle:
        # its masked partial sum keeps DTensor's own reduce-scatter (sp_reduce_scatter._scatter_dim)
        return _RowwiseParallel(
            input_layouts=Replicate(),
            output_layouts=self.output_layout or _seq_or_replicate(sequence_parallel),
            use_local_output=True)


@dataclass(frozen=True, kw_only=True)
class VocabHead(TPStyle):
    """Vocab-parallel output head: logits stay ``Shard(-1)`` DTensors for the
    loss-parallel cross entropy (no gather of the full vocabulary)."""

    input_layout: Placement | None = None
    sharded_feature = "out_features"

    def resolve(self, sequence_parallel: bool, kernels: TPKernels = TPKernels()) -> ParallelStyle:
        return _VocabHeadParallel(
            input_layouts=self.input_layout or _seq_or_replicate(sequence_parallel),
            output_layouts=Shard(-1), use_local_output=False)


class _VocabHeadParallel(_ColwiseParallel):
    """The colwise head, except that a plain tensor output passes through as it is: the
    hidden states a ``LossHead`` returns for the fused loss (``loss_head.py``); and a DTensor
    input in another layout (the final norm's sequence shard under
    ``TPKernels.gathers_in_colwise``) is gathered synchronously, as that norm did otherwise."""

    @staticmethod
    def _prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh):
        x = inputs[0]
        if isinstance(x, DTensor) and tuple(x.placements) != tuple(desired_input_layouts):
            return x.redistribute(placements=desired_input_layouts, async_op=False)
        return _ColwiseParallel._prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh)

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if not isinstance(outputs, DTensor):
            return outputs
        return ColwiseParallel._prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh)


@dataclass(frozen=True, kw_only=True)
class AttentionSite(TPStyle):
    """The module whose ``forward`` calls ``F.scaled_dot_product_attention``: the attention
    call site. Tensor parallelism leaves it alone (its projections have their own rules);
    context parallelism runs ring attention there (``context_parallel/attention.py``)."""

    module_types = (nn.Module,)

    def resolve(self, sequence_parallel: bool, kernels: TPKernels = TPKernels()) -> None:  # type: ignore[override]
        return None


from .moe_style import MoEParallel  # noqa: E402 - it builds on the classes above
from .norm_styles import HeadNorm, Norm  # noqa: E402 - likewise

STYLE_NAMES: dict[str, type[TPStyle]] = {
    "attention": AttentionSite,
    "head_norm": HeadNorm,
    "colwise": Colwise,
    "rowwise": Rowwise,
    "embedding": VocabEmbedding,
    "head": VocabHead,
    "norm": Norm,
    "moe": MoEParallel,
}


def style_from_rule(rule: str | TPStyle | ParallelStyle) -> TPStyle | ParallelStyle:
    """A rule value (a style name or a style object) as a style object."""
    if isinstance(rule, str):
        if rule not in STYLE_NAMES:
            raise ValueError(f"unknown style {rule!r}: use one of {sorted(STYLE_NAMES)} or a style object")
        return STYLE_NAMES[rule]()
    if isinstance(rule, (TPStyle, ParallelStyle)):
        return rule
    raise TypeError(f"a rule maps to a style name or a style object, got {rule!r}")


def resolve_style(style: TPStyle | ParallelStyle, sequence_parallel: bool,
                  kernels: TPKernels = TPKernels()) -> ParallelStyle | None:
    return style.resolve(sequence_parallel, kernels) if isinstance(style, TPStyle) else style


def is_tensor_parallel_head(style: TPStyle | ParallelStyle) -> bool:
    return isinstance(style, VocabHead)


__all__ = ["AttentionSite", "HeadNorm", "TPKernels", "Colwise", "Rowwise", "VocabEmbedding", "VocabHead", "Norm", "MoEParallel", "TPStyle",
           "STYLE_NAMES", "style_from_rule", "resolve_style"]
