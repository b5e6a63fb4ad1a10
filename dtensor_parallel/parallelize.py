"""parallelize(model, mesh, plan): the whole story, as an ordered chain of ``apply_*`` steps.

    1. a transformers LM: its MoE blocks computed as our MoE layers (``plans/hf_moe.py``);
       resolve the plan (the model's default plan, ``plans/``) and validate the layout once
       (``validation.py``: degrees, rules, divisibility, CP contract, EP fold, tied weights,
       PP split; a meta-device shape probe where the plan has no head counts; whether blocks
       compile: ``compiling.compiles_blocks``); the fused
       loss: the output head replaced by a ``LossHead`` sharing its weight (``loss_head.py``)
    2. PP: split into this rank's stage modules (``pipeline/split.py``)
    3. for each stage module:
         EP      apply_expert_parallel   (expert_parallel/)  shard experts, inject the dispatcher
                                                             (its exchange in chunks: overlap.py)
         TP/SP   apply_tensor_parallel   (tensor_parallel/)  styles by rule, SP kernels by plan;
                 retie_after_tp          (tied.py)           a tied head takes the embedding's DTensor
         CP      apply_context_parallel  (context_parallel/) ring attention at each attention site
         recompute apply_recompute       (recompute.py)      checkpoint each block
         compile compile_block           (compiling.py)      per block, and the loss (plan.compile,
                                                             "auto": CUDA; never under zero-bubble)
         DP      apply_data_parallel     (data_parallel.py)  FSDP / HSDP / DDP (each block, the
                                                             input embedding and the untied head
                                                             a unit; the root)
    4. the pipeline runtime over the stages (``pipeline/runtime.py``; its P2P on NCCL or on
       the copy engine, chosen in step 1: ``pipeline/p2p_routing.py``), and the sum of a tied
       weight's gradients over the stages holding a copy (``tied.py``)
    5. ``ParallelModel``: forward, forward_backward, gradients, state dicts

Why this order:

1. **validate first**: every check is local (shapes, globs, degrees, layer splits), so a
   bad plan raises the same ``ValueError`` on every rank before any collective can hang.
   The loss head goes in before everything that handles modules (PP copies, TP's styles,
   FSDP), which then treat it as the ``nn.Linear`` it is.
2. **PP split next**: a stage is a pruned copy of the model, and every later step treats
   each stage module exactly as it would treat the whole model (the composable stage).
3. **EP before TP**: experts are not tensor-sharded (expert-tensor-parallel size 1) and the
   MoE layers run token parallel over tp; EP's groups are made once from the mesh, its
   experts sharded per stage. **TP before the rest**: it replaces parameters by
   tp-sharded DTensors and installs the input/output redistributions; later steps must
   see the final parameters.
4. **CP after TP**: it only hooks the attention call sites (no parameters), so it sees the
   modules TP left in place; under SP the site's input is already gathered.
5. **recompute before compile**: the checkpointed forward is what gets compiled, so the
   compiler sees the recompute region (compiling first would hide it).
6. **compile before FSDP**: FSDP's hooks stay outside the compiled block, where they
   overlap the all-gathers with compute (TorchTitan's order).
7. **FSDP last**: it shards whatever parameters exist, TP's DTensors included, onto the
   data-parallel dims of the same root mesh (2-D FSDP x TP parameters).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .compiling import compile_block, compiles_blocks, isolate_compile_cache
from .context_parallel import apply_context_parallel
from .data_parallel import apply_data_parallel, data_parallel_mesh
from .expert_parallel import apply_expert_parallel, build_dispatch, check_experts
from .loss_head import LossHead, install_loss_head, resolve_fused_loss
from .mesh import ParallelDims, mesh_device, submesh
from .parallel_model import ParallelModel
from .pipeline.p2p_routing import choose_pipeline_p2p
from .pipeline.runtime import PipelineRuntime
from .pipeline.split import PassThrough, build_stage_module, stages_using
from .plan import ParallelPlan
from .plans.hf import check_hf_attention, hf_attention_window, is_transformers_causal_lm, prepare_hf_model
from .plans.hf_moe import adapt_hf_moe_blocks, check_expert_parallel_support
from .recompute import apply_recompute
from .tensor_parallel import apply_tensor_parallel
from .tensor_parallel.loss import compiled_cross_entropy_sum, eager_cross_entropy_sum
from .tensor_parallel.sp_reduce_scatter import check_sp_reduce_scatter
from .tensor_parallel.styles import AttentionSite, TPKernels, VocabEmbedding, VocabHead
from .tied import TiedGradSync, retie_after_tp, separate_stage_copies
from .validation import attention_backends, check_kernels, kernel_backend, resolve_plan, validate_layout


def parallelize(model: nn.Module, mesh: DeviceMesh, plan: ParallelPlan | None = None) -> ParallelModel:
    """Apply the plan's strategies to ``model`` and wrap it in a ParallelModel. Without PP
    the model is parallelized in place; with PP each of this rank's stages is a pruned
    copy of it, sharing its parameters. The chain, in order (the module docstring says why):"""
    # 1. resolve and validate the layout once: local checks only, before any collective
    dims = ParallelDims.from_mesh(mesh)
    hf = is_transformers_causal_lm(model)
    if hf:  # what our causal attention would not compute for it (soft-capping, bidirectional);
        check_hf_attention(model)  # its MoE blocks (if any) as our MoE layers, with the same parameters
        adapt_hf_moe_blocks(model)
    plan = plan or ParallelPlan()
    if hf:  # (before the plan's own checks, which would only find no MoE layers to shard)
        check_expert_parallel_support(model, plan.expert_parallel)
    plan = resolve_plan(model, plan)
    check_kernels(plan, mesh.device_type)
    sp_backend = check_sp_reduce_scatter(plan, mesh)  # 'triton' where it cannot run: an error before any collective
    resolved = validate_layout(model, dims, plan)
    block_names, styles, layout = resolved.block_names, resolved.styles, resolved.pipeline
    pp_p2p = (choose_pipeline_p2p(plan.pipeline_p2p, submesh(mesh, "pp").mesh.flatten().tolist(), mesh.device_type,
                                  layout.schedule) if layout is not None else "nccl")  # likewise 'copy_engine'
    compiled = compiles_blocks(plan, mesh.device_type, layout.schedule if layout is not None else None)
    head_name = resolve_fused_loss(model, styles, dims.tp, plan.fused_loss)  # None: the unfused loss
    window = None
    if hf:  # a transformers LM: our causal attention in its registry, no KV cache
        prepare_hf_model(model)
        window = hf_attention_window(model)  # (FSDP renames the class: read it now)
    if head_name is not None:  # the fused loss: a head that can hand its input to the loss
        install_loss_head(model, head_name, plan.fused_loss_chunk_tokens)

    # 2. pipeline stages: this rank's pruned copies of the model (or the model itself)
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
        separate_stage_copies(stage_modules, resolved.tied)  # one rank, two stages: a copy each

    # 3. each stage: EP -> TP/SP -> CP -> recompute -> compile -> DP
    dp_mesh = data_parallel_mesh(mesh, dims)
    dispatch, expert_groups = build_dispatch(model, mesh, dims, plan.expert_parallel,
                                             kernel_backend(plan, "moe_dispatch", mesh), plan.moe_recv_bound,
                                             plan.moe_dispatch_chunks)
    expert_params: dict = {}  # {expert parameter: ranks holding the same shard}
    attention = attention_backends(plan, mesh, say=True) if dims.cp > 1 else None  # (one log line)
    loss_parallel = False
    for module, names in zip(stage_modules, stage_blocks):
        present = {n: st for n, st in styles.items() if _present(module, n)}
        blocks = [module.get_submodule(n) for n in names]
        stage_experts = {}
        if dispatch is not None:  # EP: experts sharded over ep, the dispatcher injected
            stage_experts = apply_expert_parallel(check_experts(module, 1), expert_groups, dispatch)
            expert_params |= stage_experts
        if dims.tp > 1 and present:  # TP / SP
            apply_tensor_parallel(module, submesh(mesh, "tp"), present, plan.sequence_parallel,
                                  TPKernels(reduce_scatter=sp_backend, fused=plan.fused_rowwise,
                                            selective_recompute=plan.recompute == "selective"))
            loss_parallel |= any(isinstance(st, VocabHead) for st in present.values())
            retie_after_tp(module, resolved.tied)  # the head takes the embedding's DTensor again
        sites = {}
        if dims.cp > 1:  # CP: ring attention at each attention call site
            sites = {n: module.get_submodule(n) for n, st in present.items() if isinstance(st, AttentionSite)}
            apply_context_parallel(sites, submesh(mesh, "cp").get_group(), attention.plain,
                                   document_backend=attention.documents)
        apply_recompute(blocks, plan.recompute, plan.recompute_method, plan.recompute_num_layers,
                        plan.selective_policy)
        if compiled:  # per block, after recompute (it compiles the checkpointed forward)
            isolate_compile_cache()  # (a warm cache shared by the ranks served one rank another's graphs)
            for block in blocks:
                compile_block(block, has_ring=any(_holds(block, site) for site in sites.values()))
        if dp_mesh is not None:  # FSDP / HSDP / DDP, last: it shards TP's DTensors too
            apply_data_parallel(module, blocks, dp_mesh, mixed_precision=plan.mixed_precision,
                                reshard_after_forward=plan.reshard_after_forward,
                                ignored_params=set(stage_experts) or None,
                                embeddings=_untied(module, present, resolved.tied, VocabEmbedding),
                                heads=_untied(module, present, resolved.tied, VocabHead))

    # 4. the pipeline runtime (tied weights: the stages' copies sum their gradients),
    # 5. the model every layout shares
    pipeline = tied_sync = None
    # the fused loss's head: on the last stage (the others hold a pass-through in its place)
    loss_head = next((m for sm in stage_modules for m in sm.modules() if isinstance(m, LossHead)), None)
    loss_sum = (loss_head.output_loss_sum if loss_head is not None
                else compiled_cross_entropy_sum() if compiled else eager_cross_entropy_sum)
    if layout is not None:
        pipeline = PipelineRuntime(stage_modules, stage_ids, layout.n_stages, submesh(mesh, "pp"),
                                   layout.schedule, mesh_device(mesh), loss_sum=loss_sum,
                                   sm_carveout=plan.pipeline_sm_carveout, p2p=pp_p2p)
        if resolved.tied:
            all_blocks = [layout.blocks_of(s) for s in range(layout.n_stages)]
            using = [set().union(*(stages_using(model, block_names, all_blocks, n) for n in names))
                     for names in resolved.tied]  # a copy on each of these stages
            tied_sync = TiedGradSync.build(resolved.tied, stage_modules, [layout.ranks_of(u) for u in using],
                                           [len(u) for u in using], mesh)
    return ParallelModel(stage_modules, mesh, plan, dims, loss_parallel=loss_parallel,
                         autocast_bf16=plan.mixed_precision == "bf16" and dp_mesh is None,
                         pipeline=pipeline, state_order=state_order, tied_sync=tied_sync,
                         tied_names=resolved.tied,
                         attention_window=window, loss_head=loss_head, loss_sum=loss_sum,
                         experts=(expert_params, expert_groups) if expert_groups is not None else None)


def _untied(module: nn.Module, present: dict, tied: list[list[str]], style_type: type) -> list[nn.Module]:
    """The input embeddings (or output heads) that FSDP can shard as units of their own: a
    tied one shares its weight with the other, and the two must stay in one unit (the root)."""
    tied_names = {n for group in tied for n in group}
    out = []
    for name, style in present.items():
        if isinstance(style, style_type) and not any(n.startswith(name + ".") for n in tied_names):
            out.append(module.get_submodule(name))
    return out


def _holds(block: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in block.modules())


def _present(module: nn.Module, name: str) -> bool:
    """Whether this stage holds the named module (not another stage's pass-through)."""
    try:
        return not isinstance(module.get_submodule(name), PassThrough)
    except AttributeError:
        return False
