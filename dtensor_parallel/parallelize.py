"""parallelize(model, mesh, plan): an ordered chain of ``apply_*`` steps.

    validate -> PP split -> (per stage) TP/SP -> recompute -> compile -> FSDP/HSDP/DDP
             -> ParallelModel (with a pipeline schedule when pp > 1)

Why this order:

1. **validate first**: every check is local (shapes, globs, degrees, layer splits), so a
   bad plan raises the same ``ValueError`` on every rank before any collective can hang.
2. **PP split next**: a stage is a pruned copy of the model, and every later step treats
   each stage module exactly as it would treat the whole model (the composable stage).
3. **TP before everything else**: it replaces parameters by tp-sharded DTensors and installs
   the input/output redistributions; later steps must see the final parameters. EP's
   groups are built before it and its experts sharded just before it, per stage: experts
   are not tensor-sharded (expert-tensor-parallel size 1), and the MoE layers run token
   parallel over tp (``expert_parallel.py``).
4. **recompute before compile**: the checkpointed forward is what gets compiled, so the
   compiler sees the recompute region (compiling first would hide it).
5. **compile before FSDP**: FSDP's hooks stay outside the compiled block, where they
   overlap the all-gathers with compute (TorchTitan's order).
6. **FSDP last**: it shards whatever parameters exist, TP's DTensors included, onto the
   data-parallel dims of the same root mesh (2-D FSDP x TP parameters).
"""

from __future__ import annotations

import os
from dataclasses import replace

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .data_parallel import apply_data_parallel, data_parallel_mesh
from .expert_parallel import (apply_expert_parallel, build_expert_groups, check_expert_layout, check_experts,
                              needs_expert_groups)
from .mesh import ParallelDims, mesh_device, submesh
from .parallel_model import ParallelModel
from .pipeline.layout import pipeline_layout
from .pipeline.runtime import PipelineRuntime
from .pipeline.split import build_stage_module
from .plan import ParallelPlan
from .recompute import apply_recompute
from .tensor_parallel import apply_tensor_parallel, check_tp_divisibility, match_modules, resolve_rules
from .tensor_parallel.sp_reduce_scatter import apply_sp_reduce_scatter, check_sp_reduce_scatter
from .tensor_parallel.styles import VocabHead


def resolve_plan(model: nn.Module, plan: ParallelPlan) -> ParallelPlan:
    """Fill the plan's None fields (blocks, rules, heads) from the model's own defaults."""
    defaults = model.parallel_defaults() if hasattr(model, "parallel_defaults") else {}
    filled = {k: defaults[k] for k in ("blocks", "rules", "num_heads", "num_kv_heads")
              if getattr(plan, k) is None and k in defaults}
    return replace(plan, **filled) if filled else plan


def check_kernels(plan: ParallelPlan, device_type: str) -> None:
    """Triton kernels need a GPU, or Triton's interpreter (TRITON_INTERPRET=1, for tests)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for family, backend in plan.kernels.items():
        if backend == "triton" and device_type != "cuda" and not interpreted:
            raise ValueError(f"kernels[{family!r}]='triton' needs CUDA devices, but the mesh is on "
                             f"{device_type!r}: use kernels='torch' (or 'auto', which picks torch off GPU)")


def validate(model: nn.Module, dims: ParallelDims, plan: ParallelPlan):
    """All local checks; returns (block names, tp styles, pipeline layout or None)."""
    if plan.sequence_parallel and dims.tp == 1:
        raise ValueError("sequence_parallel=True needs tp > 1 (SP shards activations over the tp "
                         "ranks): build the mesh with tp >= 2 or set sequence_parallel=False")
    if plan.blocks is None:
        raise ValueError(f"{type(model).__name__} has no parallel_defaults(): name its repeated "
                         f"blocks in the plan, e.g. ParallelPlan(blocks='layers.*', rules={{...}})")
    block_names = [n for n, _ in match_modules(model, plan.blocks)]
    if not block_names:
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
    n_micro = (plan.global_batch_size // (plan.micro_batch_size * dims.dp)
               if plan.micro_batch_size and plan.global_batch_size else None)
    layout = pipeline_layout(block_names, dims.pp, plan, n_micro) if dims.pp > 1 else None
    check_expert_layout(model, dims, plan.expert_parallel, styles)
    return block_names, styles, layout


def parallelize(model: nn.Module, mesh: DeviceMesh, plan: ParallelPlan | None = None) -> ParallelModel:
    """Apply the plan's strategies to ``model`` and wrap it in a ParallelModel. Without PP
    the model is parallelized in place; with PP each of this rank's stages is a pruned
    copy of it, sharing its parameters."""
    dims = ParallelDims.from_mesh(mesh)
    plan = resolve_plan(model, plan or ParallelPlan())
    check_kernels(plan, mesh.device_type)
    sp_backend = check_sp_reduce_scatter(plan, mesh)  # 'triton' where it cannot run: an error before any collective
    block_names, styles, layout = validate(model, dims, plan)

    state_order = None
    if layout is None:
        stage_ids, stage_modules, stage_blocks = [0], [model], [block_names]
    else:
        state_order = list(model.state_dict())
        pp_rank = submesh(mesh, "pp").get_local_rank()
        stage_ids = layout.stages_of(pp_rank)
        stage_blocks = [layout.blocks_of(s) for s in stage_ids]
        stage_modules = [build_stage_module(model, block_names, blocks, is_first=s == 0,
                                            is_last=s == layout.n_stages - 1)
                         for s, blocks in zip(stage_ids, stage_blocks)]

    loss_parallel = False
    dp_mesh = data_parallel_mesh(mesh, dims)
    expert_groups, expert_params = None, []
    if needs_expert_groups(dims, plan.expert_parallel, bool(check_experts(model, 1))):
        expert_groups = build_expert_groups(mesh, dims, plan.expert_parallel)
    dispatch = plan.kernel_backend("moe_dispatch")
    if dispatch == "auto":
        dispatch = "triton" if mesh.device_type == "cuda" else "torch"
    for module in stage_modules:
        for moe in check_experts(module, 1):
            moe.dispatch_backend = dispatch
    for module, names in zip(stage_modules, stage_blocks):
        present = {n: st for n, st in styles.items() if _present(module, n)}
        stage_experts = (apply_expert_parallel(check_experts(module, 1), expert_groups)
                         if expert_groups is not None else [])
        expert_params += stage_experts
        loss_parallel |= _parallelize_stage(module, [module.get_submodule(n) for n in names],
                                            mesh, dims, plan, present, dp_mesh, set(stage_experts), sp_backend)

    pipeline = None
    if layout is not None:
        pipeline = PipelineRuntime(stage_modules, stage_ids, layout.n_stages, submesh(mesh, "pp"),
                                   layout.schedule, mesh_device(mesh))
    return ParallelModel(stage_modules, mesh, plan, dims, loss_parallel=loss_parallel,
                         autocast_bf16=plan.mixed_precision == "bf16" and dp_mesh is None,
                         pipeline=pipeline, state_order=state_order,
                         experts=(expert_params, expert_groups) if expert_groups is not None else None)


def _present(module: nn.Module, name: str) -> bool:
    try:
        return module.get_submodule(name) is not None
    except AttributeError:
        return False


def _parallelize_stage(module: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh, dims: ParallelDims,
                       plan: ParallelPlan, styles: dict, dp_mesh: DeviceMesh | None,
                       expert_params: set[nn.Parameter], sp_backend: str) -> bool:
    """The chain on one module (the whole model, or one pipeline stage). Returns whether
    its output is vocab-sharded logits (loss parallel)."""
    loss_parallel = False
    if dims.tp > 1 and styles:
        apply_tensor_parallel(module, submesh(mesh, "tp"), styles, plan.sequence_parallel)
        apply_sp_reduce_scatter(module, styles, sp_backend)
        loss_parallel = any(isinstance(s, VocabHead) for s in styles.values())

    apply_recompute(blocks, plan.recompute, plan.recompute_method, plan.recompute_num_layers)

    if plan.compile:
        for block in blocks:
            block.compile()

    if dp_mesh is not None:
        apply_data_parallel(module, blocks, dp_mesh, mixed_precision=plan.mixed_precision,
                            reshard_after_forward=plan.reshard_after_forward,
                            ignored_params=expert_params or None)
    return loss_parallel
