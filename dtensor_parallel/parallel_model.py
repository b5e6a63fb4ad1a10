"""ParallelModel: the parallelized module plus the step logic every layout shares.

Batches: each data-parallel rank passes *its own* batch, shape ``(b_local, s)``, as a
TorchTitan or Megatron data loader gives it (``pm.shard_batch(global_batch)`` cuts it out of
a global batch); ranks of one tp group pass the same batch.

Loss: the global mean token cross entropy, as on one device. Each rank divides its sum of
token losses by the *global* number of valid tokens (one all-reduce of a count over dp
before the forward); gradients are summed over dp (see ``data_parallel.py``). So uneven
numbers of valid tokens per rank, or per micro-batch, give exactly the single-device
gradient, which a per-rank mean followed by an average would not.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from .mesh import ParallelDims, submesh
from .plan import ParallelPlan
from .tensor_parallel.loss import IGNORE_INDEX, cross_entropy_sum, loss_context


class ParallelModel:
    def __init__(self, module: nn.Module, mesh: DeviceMesh, plan: ParallelPlan, dims: ParallelDims,
                 *, loss_parallel: bool, autocast_bf16: bool):
        self.module = module
        self.mesh = mesh
        self.plan = plan
        self.dims = dims
        self.loss_parallel = loss_parallel
        self._autocast_bf16 = autocast_bf16
        self._dp_mesh = submesh(mesh, "dp") if dims.dp > 1 else None

    # ---- nn.Module-like surface -------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    def named_parameters(self):
        return self.module.named_parameters()

    def train(self, mode: bool = True) -> "ParallelModel":
        self.module.train(mode)
        return self

    def eval(self) -> "ParallelModel":
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.module.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.module.state_dict()

    @property
    def device(self) -> torch.device:
        if self.mesh.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.mesh.device_type)

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: which slice of the global batch it loads."""
        return self._dp_mesh.get_local_rank() if self._dp_mesh is not None else 0

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    def __call__(self, input_ids: torch.Tensor):
        """Forward. Under TP with a vocab-parallel head the logits are a ``Shard(-1)``
        DTensor; ``.full_tensor()`` gathers them."""
        self._check_inputs(input_ids)
        with self._autocast():
            return self.module(input_ids)

    # ---- checks (local, before any collective) -----------------------------------------
    def _check_inputs(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        seq = input_ids.shape[1]
        if self.plan.sequence_parallel and seq % self.dims.tp:
            raise ValueError(f"sequence length {seq} is not divisible by tp={self.dims.tp}, which "
                             f"sequence parallelism shards it over: pad or cut the sequence to a "
                             f"multiple of {self.dims.tp}")

    def _micro_batches(self, b_local: int) -> int:
        plan, dp = self.plan, self.dims.dp
        if plan.global_batch_size is not None and b_local * dp != plan.global_batch_size:
            raise ValueError(f"local batch {b_local} * dp({dp}) = {b_local * dp} != global_batch_size"
                             f"({plan.global_batch_size}): pass each dp rank global_batch_size/dp sequences")
        mbs = plan.micro_batch_size or b_local
        if b_local % mbs:
            raise ValueError(f"local batch {b_local} is not a multiple of micro_batch_size({mbs})")
        return b_local // mbs

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

    def _dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self._dp_mesh is not None:
            dist.all_reduce(t, group=self._dp_mesh.get_group())
        return t

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward and backward over this rank's batch, in micro-batches; gradients
        accumulate into ``.grad``. Returns the global mean token loss (same on every rank)."""
        self._check_inputs(input_ids, labels)
        n_micro = self._micro_batches(input_ids.shape[0])
        device = self.device
        input_ids, labels = input_ids.to(device), labels.to(device)
        n_tokens = self._dp_sum((labels != IGNORE_INDEX).sum().to(torch.float32)).clamp_min(1.0)
        total = torch.zeros((), device=device, dtype=torch.float32)
        for x, y in zip(input_ids.chunk(n_micro), labels.chunk(n_micro)):
            with loss_context(self.loss_parallel), self._autocast():
                loss_sum = cross_entropy_sum(self.module(x), y)
                (loss_sum / n_tokens).backward()
            total += loss_sum.detach()
        self._reduce_partial_grads()
        return self._dp_sum(total) / n_tokens

    @torch.no_grad()
    def _reduce_partial_grads(self) -> None:
        """Turn ``Partial`` gradients into ``Replicate`` ones, one collective per group.

        Under SP the weights of the norms are replicated but see only their sequence
        shard, so their gradients come out as per-rank partial sums (``Partial`` on tp).
        FSDP reduces them itself; without FSDP they would stay partial, and every later
        op on them (clipping, the optimizer) would all-reduce each one implicitly. Like
        Megatron's all-reduce of the sequence-parallel layernorm gradients, they are
        flattened into one buffer and all-reduced once, after the last micro-batch.
        """
        groups: dict[tuple, list[nn.Parameter]] = {}
        for p in self.module.parameters():
            g = p.grad
            if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
                groups.setdefault((g.device_mesh, tuple(g.placements)), []).append(p)
        for (mesh, placements), params in groups.items():
            locals_ = [p.grad.to_local() for p in params]
            flat = torch.cat([t.reshape(-1) for t in locals_])
            for dim, pl in enumerate(placements):
                if pl.is_partial():
                    dist.all_reduce(flat, group=mesh.get_group(dim))
            reduced = [Replicate() if pl.is_partial() else pl for pl in placements]
            for p, piece in zip(params, flat.split([t.numel() for t in locals_])):
                p.grad = DTensor.from_local(piece.view_as(p.grad.to_local()), mesh, reduced,
                                            run_check=False)

    # ---- gradients, weights ------------------------------------------------------------
    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of all gradients, whatever their placements, with one all-reduce.

        Each rank adds the squares of its local gradient shards, divided by how many ranks
        hold a copy of that shard (the product of the mesh sizes over which the gradient is
        ``Replicate``; for a plain tensor, every rank of the model replica), then one
        all-reduce sums over the world. Reducing DTensor norms instead costs one collective
        per (mesh, placements) group and per mesh dim.
        """
        world = dist.get_world_size()
        replica = world // self.dims.pp  # ranks that hold one pipeline stage's parameters
        sq = torch.zeros((), device=self.device, dtype=torch.float32)
        for p in self.module.parameters():
            g = p.grad
            if g is None:
                continue
            if isinstance(g, DTensor):
                copies = 1
                for size, placement in zip(g.device_mesh.shape, g.placements):
                    if placement.is_partial():
                        raise RuntimeError(f"gradient with Partial placement {g.placements}: "
                                           f"reduce it before taking the norm")
                    copies *= size if placement.is_replicate() else 1
                local = g.to_local()
            else:
                copies, local = replica, g
            sq += local.float().pow(2).sum() / copies
        if world > 1:
            dist.all_reduce(sq)
        return sq.sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients so their global L2 norm is at most ``max_norm``; returns the
        norm before clipping."""
        total = self.grad_norm()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in self.module.parameters():
            if p.grad is not None:
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                g.mul_(coef)
        return total

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) tensors under the model's original names, on CPU. Every rank
        must call it (it gathers)."""
        out = {}
        with warnings.catch_warnings():
            # FSDP x TP parameters (_StridedShard, Shard) gather in two steps; torch warns
            warnings.filterwarnings("ignore", message="While redistributing from")
            for name, t in self.module.state_dict().items():
                if isinstance(t, DTensor):
                    t = t.full_tensor()
                out[name] = t.detach().cpu()
        return out

    def init_weights(self, seed: int = 0) -> None:
        """Materialize meta parameters on the mesh's device and initialize them (each rank
        only its shards). Needs the model's ``init_weights()``."""
        if not hasattr(self.module, "init_weights"):
            raise TypeError(f"{type(self.module).__name__} has no init_weights(); initialize it yourself")
        if any(p.is_meta for p in self.module.parameters()):
            self.module.to_empty(device=self.device)
        self.module.init_weights(buffer_device=self.device, seed=seed)
