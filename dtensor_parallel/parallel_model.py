"""ParallelModel: the parallelized module(s) plus the step logic every layout shares.

Batches: each data-parallel rank passes *its own* batch, shape ``(b_local, s)``, as a
TorchTitan or Megatron data loader gives it (``pm.shard_batch(global_batch)`` cuts it out of
a global batch); ranks of one tp group, and all pipeline stages, pass the same batch.

Loss: the global mean token cross entropy, as on one device (with ``plan.fused_loss``
computed from the head's input and weight without the logits: ``loss_head.py``). Each rank divides its sum of
token losses by the *global* number of valid tokens (one all-reduce of a count over dp
before the forward); gradients are summed over dp (see ``data_parallel.py``). So uneven
numbers of valid tokens per rank, or per micro-batch, give exactly the single-device
gradient, which a per-rank mean followed by an average would not.

With pp > 1 this rank holds one module per local pipeline stage (pruned copies of the
model with its original parameter names) and a :class:`PipelineRuntime` drives the
schedule over the micro-batches.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .context_parallel import zigzag_indices
from .context_parallel.sharding import document_zigzag_indices
from .expert_parallel import reduce_expert_grads
from .expert_parallel import statistics as moe_stats
from .grads import gather_full, global_grad_norm, reduce_partial_grads, shard_replicated_grads
from .loss_head import LossHead
from .mesh import ParallelDims, mesh_device, submesh
from .pipeline.runtime import PipelineRuntime
from .plan import ParallelPlan
from .tensor_parallel.loss import IGNORE_INDEX, eager_cross_entropy_sum, loss_context
from .tied import TiedGradSync, to_empty_keeping_ties
from .validation import check_sequence


def takes_position_ids(module: nn.Module) -> bool:
    params = inspect.signature(module.forward).parameters
    return "position_ids" in params


def takes_document_ids(module: nn.Module) -> bool:
    """A forward with a ``document_ids`` argument, or a transformers LM: its forward hands
    unknown keyword arguments down to the attention function, which is ours
    (``plans/hf.py``). Any other ``**kwargs`` might swallow them silently: not taken."""
    from .plans.hf import is_transformers_causal_lm

    return "document_ids" in inspect.signature(module.forward).parameters or is_transformers_causal_lm(module)


def model_class_name(module: nn.Module) -> str:
    """The user's class name (FSDP2 swaps in a subclass named ``FSDP<name>``)."""
    return next((c.__name__ for c in type(module).__mro__ if not c.__module__.startswith("torch.distributed")),
                type(module).__name__)


def check_document_ids(document_ids: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Shape and dtype; ids that do not decrease along each sequence (checked where the
    tensor is on the CPU, as a data loader gives it: on a GPU the check would cost a sync)."""
    if tuple(document_ids.shape) != tuple(input_ids.shape):
        raise ValueError(f"document_ids shape {tuple(document_ids.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}: one document id per token")
    if document_ids.dtype.is_floating_point or document_ids.dtype.is_complex or document_ids.dtype == torch.bool:
        raise ValueError(f"document_ids must be integers, got {document_ids.dtype}")
    if document_ids.device.type == "cpu" and document_ids.shape[1] > 1 \
            and bool((document_ids[:, 1:] < document_ids[:, :-1]).any()):
        row = int((document_ids[:, 1:] < document_ids[:, :-1]).any(1).nonzero()[0])
        raise ValueError(f"document_ids decrease along sequence {row}: packed documents must have ids that "
                         f"never decrease along the sequence (e.g. the cumulative count of document starts)")


def stage_output(out) -> torch.Tensor:
    """What a pipeline stage sends on: the logits of its output, not a view. (A
    transformers LM slices its hidden states before the head, ``h[:, -0:]``, a pass-through
    off the last stage; the zero-bubble schedules ``detach_()`` stage outputs, which a view
    refuses. A view of the whole of its base is the base; any other view is copied.)"""
    t = logits_of(out)
    base = t._base
    if base is None:
        return t
    if base.shape == t.shape and base.stride() == t.stride() and base.storage_offset() == t.storage_offset():
        return base
    return t.clone()


def logits_of(out):
    """The logits of a forward's output: a tensor, a ``ModelOutput`` / dict with ``logits``,
    or a tuple whose first item is the logits (the model's own loss is never asked for:
    labels are not passed to it)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"the model's forward returned {type(out).__name__}"
                     f"{' with keys ' + str(list(out.keys())) if isinstance(out, dict) else ''}: parallelize "
                     f"needs the logits as a tensor, a ModelOutput or dict with 'logits', or a tuple whose first "
                     f"item is the logits")


class ParallelModel:
    def __init__(self, modules: list[nn.Module], mesh: DeviceMesh, plan: ParallelPlan, dims: ParallelDims,
                 *, loss_parallel: bool, autocast_bf16: bool, pipeline: PipelineRuntime | None = None,
                 state_order: list[str] | None = None, experts: tuple | None = None,
                 tied_sync: TiedGradSync | None = None, tied_names: list[list[str]] | None = None,
                 attention_window: int | None = None, loss_head: LossHead | None = None,
                 loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = eager_cross_entropy_sum):
        self.stage_modules = modules
        self.mesh = mesh
        self.plan = plan
        self.dims = dims
        self.loss_parallel = loss_parallel
        self.pipeline = pipeline
        self._autocast_bf16 = autocast_bf16
        self._dp_mesh = submesh(mesh, "dp") if dims.dp > 1 else None
        # the loss and the token count are summed over every rank holding other tokens
        self._loss_mesh = submesh(mesh, "dp_cp") if dims.dp_cp > 1 else None
        self._cp_mesh = submesh(mesh, "cp") if dims.cp > 1 else None
        self._state_order = state_order
        self._tied_sync = tied_sync  # PP: tied weights' copies on the first and last stage
        self.tied_names = tied_names or []  # names sharing one parameter, the canonical first
        self._attention_window = attention_window  # a sliding window (transformers models)
        # the fused loss (plan.fused_loss): the head hands its input to the loss; None: logits
        self.loss_head = loss_head
        # (model output, labels) -> summed token loss: the fused loss's, or cross entropy on the
        # logits (compiled with the blocks: no fp32 logits kept, tensor_parallel/loss.py)
        self._loss_sum_of = loss_sum
        # full positions for models that would otherwise derive them from the length they
        # see (a sequence shard under SP, a stage's input under PP); CP's zigzag ones always
        self._pass_positions = takes_position_ids(modules[0]) and (
            dims.cp > 1 or plan.sequence_parallel or pipeline is not None)
        self._takes_documents = takes_document_ids(modules[0])
        if pipeline is not None:  # stages exchange tensors: a ModelOutput leaves as its logits
            for m in modules:
                m.register_forward_hook(lambda _m, _inp, out: stage_output(out))
        # ({expert parameter: ranks holding the same shard}, ExpertGroups) or None
        self._experts = experts
        self._moe = moe_stats.moe_layers(modules)
        self._moe_step = moe_stats.share_step(self._moe) if self._moe else None
        if self._moe and pipeline is not None:
            moe_stats.collect_only_inside(self._moe_step, pipeline)

    # ---- nn.Module-like surface -------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The parallelized model (without PP). Under PP use ``stage_modules``."""
        if len(self.stage_modules) != 1 or self.pipeline is not None:
            raise AttributeError("under pipeline parallelism this rank holds several stage modules: "
                                 "use pm.stage_modules")
        return self.stage_modules[0]

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Each parameter once, also where this rank's stage modules share one."""
        seen: set[int] = set()
        for name, p in itertools.chain.from_iterable(m.named_parameters() for m in self.stage_modules):
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def train(self, mode: bool = True) -> "ParallelModel":
        for m in self.stage_modules:
            m.train(mode)
        return self

    def eval(self) -> "ParallelModel":
        return self.train(False)

    def __deepcopy__(self, memo: dict) -> "ParallelModel":
        """A copy of every attribute (modules, their DTensor parameters and gradients), as
        ``copy.deepcopy`` would make it; FSDP's modules refuse with torch's own error. Under PP
        a clear error instead of a pickling failure deep in the schedule."""
        if self.pipeline is not None:
            raise TypeError("a pipelined ParallelModel cannot be deep-copied: its schedule and stages hold "
                            "process groups and communication state. Deep-copy the model before "
                            "parallelize(), or save and load its state with dtensor_parallel's checkpoint")
        twin = object.__new__(type(self))
        memo[id(self)] = twin
        for name, value in self.__dict__.items():
            setattr(twin, name, copy.deepcopy(value, memo))
        return twin

    def zero_grad(self, set_to_none: bool = True) -> None:
        for m in self.stage_modules:
            m.zero_grad(set_to_none=set_to_none)

    @property
    def device(self) -> torch.device:
        return mesh_device(self.mesh)

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: which slice of the global batch it loads."""
        return self._dp_mesh.get_local_rank() if self._dp_mesh is not None else 0

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    def __call__(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None):
        """Forward. Under TP with a vocab-parallel head the logits are a ``Shard(-1)``
        DTensor (``.full_tensor()`` gathers them); under PP only the ranks of the last
        stage get logits, the others None; under CP the logits of this rank's zigzag
        positions (``zigzag_indices``; with documents ``document_zigzag_indices``, per row).
        ``document_ids`` (b, s): packed documents, attention masked at their boundaries
        (``document_attention.py``)."""
        self._check_inputs(input_ids, document_ids=document_ids)
        # only a pipeline splits a forward into micro-batches; otherwise any batch will do
        n_micro = self._micro_batches(input_ids.shape[0]) if self.pipeline is not None else 1
        (input_ids,), model_kwargs = self._context_parallel(input_ids.to(self.device), documents=document_ids)
        no_grad = torch.no_grad() if self.pipeline is not None else contextlib.nullcontext()
        with self._autocast(), no_grad:
            if self.pipeline is not None:
                return self.pipeline.forward(input_ids, n_micro, model_kwargs)
            return logits_of(self.module(input_ids, **model_kwargs))

    # ---- checks (local, before any collective) -----------------------------------------
    def _check_inputs(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                      document_ids: torch.Tensor | None = None) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if document_ids is not None:
            check_document_ids(document_ids, input_ids)
            if not self._takes_documents:
                raise ValueError(f"{model_class_name(self.stage_modules[0])}.forward takes no document_ids: packed "
                                 f"documents need a model that passes them to its attention (add a document_ids=None "
                                 f"argument and call dtensor_parallel.document_causal_attention), or train "
                                 f"without document masking")
        check_sequence(input_ids.shape[1], self.dims, self.plan.sequence_parallel)
        window = self._attention_window
        if window is not None and input_ids.shape[1] > window:
            raise ValueError(f"sequence length {input_ids.shape[1]} is longer than the model's sliding attention "
                             f"window ({window} tokens), which parallelize's causal attention does not apply: "
                             f"cut sequences to at most {window} tokens, or set config.sliding_window = None "
                             f"to train with full causal attention")

    def _micro_batches(self, b_local: int) -> int:
        plan, dp = self.plan, self.dims.dp
        if plan.global_batch_size is not None and b_local * dp != plan.global_batch_size:
            raise ValueError(f"local batch {b_local} * dp({dp}) = {b_local * dp} != global_batch_size"
                             f"({plan.global_batch_size}): pass each dp rank global_batch_size/dp sequences")
        mbs = plan.micro_batch_size or (1 if self.pipeline is not None else b_local)
        if b_local % mbs:
            raise ValueError(f"local batch {b_local} is not a multiple of micro_batch_size({mbs})")
        n_micro = b_local // mbs
        if self.pipeline is not None:
            from .pipeline.schedules import check_schedule
            check_schedule(self.pipeline.schedule_name, self.dims.pp, self.pipeline.virtual, n_micro)
        return n_micro

    def _autocast(self):
        if self._autocast_bf16:
            return torch.autocast(self.mesh.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- training step -----------------------------------------------------------------
    def shard_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (the dp coordinate picks the chunk)."""
        if self._dp_mesh is None:
            return batch
        if batch.shape[0] % self.dims.dp:
            raise ValueError(f"global batch {batch.shape[0]} is not divisible by dp={self.dims.dp}")
        return batch.chunk(self.dims.dp)[self.dp_rank]

    def _loss_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks holding other tokens: dp x cp."""
        if self._loss_mesh is not None:
            dist.all_reduce(t, group=self._loss_mesh.get_group())
        return t

    def _context_parallel(self, input_ids: torch.Tensor, *others: torch.Tensor,
                          documents: torch.Tensor | None = None):
        """Under CP: this rank's zigzag shard of each tensor, and the model's keyword
        arguments: ``position_ids``, the shard's true positions (b, s/cp), which the
        model's RoPE must use, and ``document_ids`` (the shard's); with documents the zigzag
        is per document (``document_zigzag_indices``: balanced work, the rows' shards
        differ). Otherwise the tensors unchanged and, where the layout needs them, the full
        positions."""
        kwargs = {}
        if documents is not None:
            kwargs["document_ids"] = documents.to(device=input_ids.device, dtype=torch.int32)
        if self._cp_mesh is None:
            if self._pass_positions:
                kwargs["position_ids"] = torch.arange(input_ids.shape[1], device=input_ids.device).expand(
                    input_ids.shape[0], -1)
            return (input_ids, *others), kwargs
        cp_rank = self._cp_mesh.get_local_rank()
        if documents is not None:  # each document zigzagged on its own: balanced work (sharding.py)
            idx = document_zigzag_indices(documents, self.dims.cp, cp_rank).to(input_ids.device)  # (b, s/cp)
            shard = {k: v.gather(1, idx) for k, v in kwargs.items()}
            shard["position_ids"] = idx  # the tokens' global positions: RoPE's, and the ring's mask
            return tuple(t.gather(1, idx) for t in (input_ids, *others)), shard
        idx = zigzag_indices(input_ids.shape[1], self.dims.cp, cp_rank, input_ids.device)
        kwargs["position_ids"] = idx.expand(input_ids.shape[0], -1)  # (b, s/cp): splits into micro-batches
        return tuple(t[:, idx] for t in (input_ids, *others)), kwargs

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                         document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward over this rank's batch, in micro-batches; gradients
        accumulate into ``.grad``. Returns the global mean token loss (same on every rank).
        ``document_ids`` (b, s): packed documents (see ``__call__``)."""
        self._check_inputs(input_ids, labels, document_ids)
        n_micro = self._micro_batches(input_ids.shape[0])
        if self._moe:
            moe_stats.start_step(self._moe, self._moe_step, n_micro)
        device = self.device
        (input_ids, labels), model_kwargs = self._context_parallel(input_ids.to(device), labels.to(device),
                                                                   documents=document_ids)
        n_tokens = self._loss_sum((labels != IGNORE_INDEX).sum().to(torch.float32)).clamp_min(1.0)
        if self.pipeline is not None:
            with self._loss_scope(), self._autocast():
                total = self.pipeline.forward_backward(input_ids, labels, n_micro, n_tokens, model_kwargs)
            self._finish_grads()
            return self._loss_sum(self.pipeline.sum_over_pp(total))
        total = torch.zeros((), device=device, dtype=torch.float32)
        micro_kwargs = [{k: v.chunk(n_micro)[i] for k, v in model_kwargs.items()} for i in range(n_micro)]
        for x, y, kwargs in zip(input_ids.chunk(n_micro), labels.chunk(n_micro), micro_kwargs):
            with self._loss_scope(), self._autocast():
                out = logits_of(self.module(x, **kwargs))  # the logits, or the head's input (fused loss)
                loss_sum = self._loss_sum_of(out, y)
                (loss_sum / n_tokens).backward()
            total += loss_sum.detach()
        self._finish_grads()
        return self._loss_sum(total) / n_tokens

    def _loss_scope(self):
        """Around a step's forwards and backwards: the fused loss's head returns its input
        hidden states (``loss_head.py``); else loss-parallel cross entropy where the logits
        are vocab-sharded."""
        if self.loss_head is not None:
            return self.loss_head.hidden_states()
        return loss_context(self.loss_parallel)

    def moe_stats(self) -> dict[str, float]:
        """Load-balancing statistics of the last ``forward_backward`` (empty without MoE
        layers): ``moe_aux_loss`` (the auxiliary loss it trained with, which the returned
        loss does not include), ``moe_max_load`` / ``moe_min_load`` (expert load over the
        mean, averaged over layers). Every rank must call it (it reduces)."""
        return moe_stats.step_stats(self._moe, self._pp_group(), self.device)

    def update_expert_biases(self) -> None:
        """Aux-loss-free balancing: call after the optimizer step (no-op unless the MoE
        args set ``expert_bias``)."""
        moe_stats.update_expert_biases(self._moe)

    def _finish_grads(self) -> None:
        """The reductions FSDP does not do: partial (SP norm) and expert gradients, and
        replicated gradients of sharded weights cut to their shards."""
        reduce_partial_grads(self.parameters())
        shard_replicated_grads(self.parameters())
        if self._experts is not None:
            reduce_expert_grads(*self._experts)
        if self._tied_sync is not None:
            self._tied_sync.sync()

    # ---- gradients, weights ------------------------------------------------------------
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of all gradients over every stage and placement (one all-reduce)."""
        extra = dict(self._experts[0]) if self._experts is not None else {}
        if self._tied_sync is not None:
            extra |= self._tied_sync.replicas()
        return global_grad_norm(self.parameters(), dist.get_world_size() // self.dims.pp, self.device,
                                extra_replicas=extra)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients so their global L2 norm is at most ``max_norm``; returns the
        norm before clipping (no host sync)."""
        total = self.grad_norm()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in self.parameters():
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                groups.setdefault((g.device, g.dtype), []).append(g)
        for grads in groups.values():  # one multi-tensor kernel a (device, dtype), not one per parameter
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        return total

    def _pp_group(self):
        return submesh(self.mesh, "pp").get_group() if self.dims.pp > 1 else None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) tensors of every stage under the model's original names, on
        CPU, on every rank. Every rank must call it (it gathers)."""
        named = itertools.chain.from_iterable(m.state_dict().items() for m in self.stage_modules)
        out = gather_full(named, self._pp_group())
        if self._state_order is not None:
            out = {k: out[k] for k in self._state_order}
        return out

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Full gradients of every parameter (None where a parameter has none), gathered
        like :meth:`full_state_dict`; for checks and debugging."""
        named = ((n, p.grad) for n, p in self.named_parameters() if p.grad is not None)
        return gather_full(named, self._pp_group())

    def init_weights(self, seed: int = 0) -> None:
        """Materialize meta parameters on the mesh's device and initialize them (each rank
        only its shards; the same weights in every layout). Our models: their
        ``init_weights(buffer_device, seed)``; transformers models: transformers' own
        ``_init_weights`` per module (``checkpoint/hf_pretrained.py``)."""
        from .checkpoint.hf_pretrained import init_hf_weights, is_transformers_model

        if all(is_transformers_model(m) for m in self.stage_modules):
            init_hf_weights(self.stage_modules, self.device, seed,
                            skip={n for names in self.tied_names for n in names[1:]})
        else:
            for m in self.stage_modules:
                if not callable(getattr(m, "init_weights", None)) or is_transformers_model(m):
                    raise TypeError(f"{type(m).__name__} has no init_weights(buffer_device, seed); "
                                    f"initialize it yourself")
                if any(p.is_meta for p in m.parameters()):
                    to_empty_keeping_ties(m, self.device)
                m.init_weights(buffer_device=self.device, seed=seed)
        if self._tied_sync is not None:  # tied copies on other stages: equal to the first's
            self._tied_sync.broadcast_weights()
