"""parallelize(model, mesh, plan): an ordered chain of ``apply_*`` steps.

    validate -> TP/SP -> recompute -> compile -> FSDP/HSDP/DDP -> ParallelModel

Why this order:

1. **validate first**: every check is local (shapes, globs, degrees), so a bad plan raises
   the same ``ValueError`` on every rank before any collective can hang.
2. **TP before everything**: it replaces parameters by tp-sharded DTensors and installs
   the input/output redistributions; later steps must see the final parameters.
3. **recompute before compile**: the checkpointed forward is what gets compiled, so the
   compiler sees the recompute region (compiling first would hide it).
4. **compile before FSDP**: FSDP's hooks stay outside the compiled block, where they
   overlap the all-gathers with compute (TorchTitan's order).
5. **FSDP last**: it shards whatever parameters exist, TP's DTensors included, onto the
   data-parallel dims of the same root mesh (2-D FSDP x TP parameters).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .data_parallel import apply_data_parallel, data_parallel_mesh
from .mesh import ParallelDims, submesh
from .parallel_model import ParallelModel
from .plan import ParallelPlan
from .recompute import apply_recompute
from .tensor_parallel import apply_tensor_parallel, check_tp_divisibility, match_modules, resolve_rules
from .tensor_parallel.styles import VocabHead


def resolve_plan(model: nn.Module, plan: ParallelPlan) -> ParallelPlan:
    """Fill the plan's None fields (blocks, rules, heads) from the model's own defaults."""
    defaults = model.parallel_defaults() if hasattr(model, "parallel_defaults") else {}
    filled = {k: defaults[k] for k in ("blocks", "rules", "num_heads", "num_kv_heads")
              if getattr(plan, k) is None and k in defaults}
    return replace(plan, **filled) if filled else plan


def validate(model: nn.Module, dims: ParallelDims, plan: ParallelPlan):
    """All local checks; returns (blocks, tp styles)."""
    if plan.sequence_parallel and dims.tp == 1:
        raise ValueError("sequence_parallel=True needs tp > 1 (SP shards activations over the tp "
                         "ranks): build the mesh with tp >= 2 or set sequence_parallel=False")
    if plan.blocks is None:
        raise ValueError(f"{type(model).__name__} has no parallel_defaults(): name its repeated "
                         f"blocks in the plan, e.g. ParallelPlan(blocks='layers.*', rules={{...}})")
    blocks = [m for _, m in match_modules(model, plan.blocks)]
    if not blocks:
        raise ValueError(f"blocks={plan.blocks!r} matches no module of {type(model).__name__}: "
                         f"give the glob of the repeated blocks, e.g. 'layers.*'")
    if dims.tp > 1 and not plan.rules:
        raise ValueError(f"tp={dims.tp} but the plan has no TP rules for {type(model).__name__}: "
                         f"give rules={{'blocks.*.q': 'colwise', ...}} or build the mesh with tp=1")
    styles = resolve_rules(model, plan.rules or {})
    check_tp_divisibility(model, styles, dims.tp, plan.num_heads, plan.num_kv_heads)
    if plan.micro_batch_size and plan.global_batch_size:
        per_step = plan.micro_batch_size * dims.dp
        if plan.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size({plan.global_batch_size}) is not a multiple of micro_batch_size"
                f"({plan.micro_batch_size}) * dp({dims.dp}) = {per_step}: change one of them")
    if dims.pp > 1 or dims.cp > 1:
        raise NotImplementedError(
            f"pp={dims.pp}, cp={dims.cp}: pipeline and context parallel land in later releases; "
            f"build the mesh with pp=1 and cp=1")
    return blocks, styles


def parallelize(model: nn.Module, mesh: DeviceMesh, plan: ParallelPlan | None = None) -> ParallelModel:
    """Apply the plan's strategies to ``model`` in place and wrap it in a ParallelModel."""
    dims = ParallelDims.from_mesh(mesh)
    plan = resolve_plan(model, plan or ParallelPlan())
    blocks, styles = validate(model, dims, plan)

    loss_parallel = False
    if dims.tp > 1:
        apply_tensor_parallel(model, submesh(mesh, "tp"), styles, plan.sequence_parallel)
        loss_parallel = any(isinstance(s, VocabHead) for s in styles.values())

    apply_recompute(blocks, plan.recompute, plan.recompute_method, plan.recompute_num_layers)

    if plan.compile:
        for block in blocks:
            block.compile()

    dp_mesh = data_parallel_mesh(mesh, dims)
    if dp_mesh is not None:
        apply_data_parallel(model, blocks, dp_mesh, mixed_precision=plan.mixed_precision,
                            reshard_after_forward=plan.reshard_after_forward)

    return ParallelModel(model, mesh, plan, dims, loss_parallel=loss_parallel,
                         autocast_bf16=plan.mixed_precision == "bf16" and dp_mesh is None)
