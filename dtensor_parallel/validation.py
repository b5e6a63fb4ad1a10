"""One validation of a layout, before any collective: the API, the trainer's preflight,
the memory estimator, the planner and the dry run all call it.

- :func:`check_degrees`: what the degrees and the plan alone decide (no model): sequence
  parallelism needs tp, expert parallelism divides the ranks it is folded out of, the
  global batch splits into micro-batches over dp.
- :func:`validate_layout`: everything that also needs the model: the plan's blocks and
  rules match modules, tp divides heads, kv heads, hidden and vocab sizes, context
  parallelism has attention call sites and a forward taking ``position_ids``, experts
  divide by ep, tied weights, and the pipeline split; without head counts in the plan, a
  meta-device probe of one block under its tp shapes. Returns the resolved ``Layout``.
- :func:`check_sequence`: a batch's sequence length against cp (zigzag) and SP, at the
  first call with that batch.

Every error is a ``ValueError`` that prints the arithmetic and names the fix; every check
is local, so a bad layout fails the same way on every rank instead of hanging one.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, replace

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .mesh import ParallelDims
from .plan import ParallelPlan
from .tied import check_tied, tied_groups


@dataclass
class Layout:
    """The validated layout: the blocks' names, every matched module's style, the
    pipeline layout (None without PP), and the names of tied parameters (``tied.py``)."""

    block_names: list[str]
    styles: dict
    pipeline: object | None
    tied: list[list[str]]


def resolve_plan(model: nn.Module, plan: ParallelPlan) -> ParallelPlan:
    """Fill the plan's None fields (blocks, rules, heads) from the plan the library knows for
    the model (``dtensor_parallel/plans``)."""
    from .plans import default_plan

    defaults = default_plan(model, plan)
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
        if backend == "sdpa" and device_type not in ("cuda", "cpu"):
            raise ValueError(f"kernels[{family!r}]='sdpa' runs PyTorch's fused attention ops on CUDA or the CPU, "
                             f"not {device_type!r}: use 'torch'")


def check_degrees(dims: ParallelDims, plan: ParallelPlan, *, has_moe: bool | None = None) -> None:
    """The checks that need only the degrees and the plan. ``has_moe``: whether the model
    has MoE layers (None: unknown here, checked with the model)."""
    from .expert_parallel import ep_fold_size

    if plan.sequence_parallel and dims.tp == 1:
        raise ValueError("sequence_parallel=True needs tp > 1 (SP shards activations over the tp "
                         "ranks): build the mesh with tp >= 2 or set sequence_parallel=False")
    ep = plan.expert_parallel
    if ep > 1 and has_moe is False:
        raise ValueError(f"ep={ep} (expert_parallel) needs an MoE model: for the built-in Llama choose [model] "
                         f"flavour debug-moe, mixtral-8x7b or deepseek-v3-shaped, or set ep = 1")
    fold = ep_fold_size(dims)
    if ep > 1 and fold % ep:
        raise ValueError(f"expert_parallel={ep} does not divide dp_shard({dims.dp_shard}) x cp({dims.cp}) x "
                         f"tp({dims.tp}) = {fold}, which EP is folded out of: choose an ep dividing {fold}")
    if plan.micro_batch_size and plan.global_batch_size:
        per_step = plan.micro_batch_size * dims.dp
        if plan.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size({plan.global_batch_size}) is not a multiple of micro_batch_size"
                f"({plan.micro_batch_size}) * dp({dims.dp}) = {per_step}: change one of them")


def check_sequence(seq_len: int, dims: ParallelDims, sequence_parallel: bool) -> None:
    """A sequence length the layout can cut: 2 cp zigzag chunks, then tp SP shards."""
    cp, tp = dims.cp, dims.tp
    if cp > 1 and seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x cp = {2 * cp}, which "
                         f"zigzag context parallelism cuts it into: pad or cut the sequence to a "
                         f"multiple of {2 * cp}")
    if sequence_parallel and (seq_len // cp) % tp:
        raise ValueError(f"sequence length {seq_len // cp}{' per cp rank' if cp > 1 else ''} is not "
                         f"divisible by tp={tp}, which sequence parallelism shards it over: pad or "
                         f"cut the sequence to a multiple of {tp * (2 * cp if cp > 1 else 1)}")


def validate_layout(model: nn.Module, dims: ParallelDims, plan: ParallelPlan) -> Layout:
    """All local checks of the plan on this model and these degrees; the resolved layout."""
    from .expert_parallel import check_expert_layout
    from .pipeline.layout import pipeline_layout
    from .tensor_parallel import check_tp_divisibility, match_modules, resolve_rules
    from .tensor_parallel.shape_probe import probe_tp_shapes

    check_degrees(dims, plan)
    if plan.blocks is None:
        from .plans.hf import HF_CAUSAL_LMS, is_transformers_causal_lm

        known = (f" (built-in plans: {', '.join(HF_CAUSAL_LMS)}; most transformers decoders name theirs "
                 f"'model.layers.*', see dtensor_parallel/plans/hf.py for the rules of that family)"
                 if is_transformers_causal_lm(model) else "")
        raise ValueError(f"the library has no default plan for {type(model).__name__}{known}: name its repeated "
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
    if dims.tp > 1 and (plan.num_heads is None or plan.num_kv_heads is None):
        probe_tp_shapes(model, block_names[0], styles, dims.tp)  # heads unknown: one block on meta
    check_expert_layout(model, dims, plan.expert_parallel, styles)  # (the MoE-specific message first)
    if dims.tp > 1:
        check_tp_coverage(model, styles, dims.tp)
    tied = tied_groups(model)
    check_tied(model, tied, styles, dims.tp, dims.pp, block_names)
    if dims.cp > 1:
        check_context_parallel(model, styles, dims.cp)
    n_micro = (plan.global_batch_size // (plan.micro_batch_size * dims.dp)
               if plan.micro_batch_size and plan.global_batch_size else None)
    layout = pipeline_layout(block_names, dims.pp, plan, n_micro) if dims.pp > 1 else None
    if layout is not None:  # a later stage must hand its input to its first block unchanged
        from .pipeline.stage_probe import check_stage_input

        check_stage_input(model, block_names, layout.blocks_of(1))
    return Layout(block_names, styles, layout, tied)


def check_tp_coverage(model: nn.Module, styles: dict, tp: int) -> None:
    """Under TP every parameter needs a rule for its module (or an ``moe`` rule above it):
    a parameter no style distributes stays a plain tensor on each tp rank while its module
    sees tensor-parallel activations, so its gradient would be one rank's share (a per-head
    norm or a bias on sharded features) and nothing would sum it."""
    from .tensor_parallel.styles import AttentionSite, MoEParallel

    owners = {n for n, st in styles.items() if not isinstance(st, AttentionSite)}
    moe_roots = [n for n, st in styles.items() if isinstance(st, MoEParallel)]
    loose = [f"{mod_name}.{p_name}" if mod_name else p_name
             for mod_name, module in model.named_modules()
             for p_name, _ in module.named_parameters(recurse=False)
             if mod_name not in owners and not any(mod_name.startswith(r + ".") for r in moe_roots)]
    if loose:
        shown = ", ".join(loose[:6]) + (f" and {len(loose) - 6} more" if len(loose) > 6 else "")
        raise ValueError(
            f"tp={tp}: no TP rule covers the module of parameter(s) {shown}. Each would stay a plain "
            f"tensor on every tp rank while its module sees tensor-parallel activations, so its gradient "
            f"would be one rank's share. Give its module a rule: 'colwise'/'rowwise' (linears, their "
            f"biases too), 'norm' (norms on the residual stream), 'head_norm' (norms over each "
            f"head's features, such as q_norm/k_norm), 'embedding' or 'head'")


def check_context_parallel(model: nn.Module, styles: dict, cp: int) -> None:
    """CP needs the attention call sites and a forward that takes the tokens' positions."""
    from .tensor_parallel.styles import AttentionSite

    if not any(isinstance(st, AttentionSite) for st in styles.values()):
        raise ValueError(f"cp={cp} needs the attention call sites of {type(model).__name__}: add a rule "
                         f"{{'<glob of the modules whose forward calls F.scaled_dot_product_attention>': "
                         f"'attention'}}, e.g. {{'blocks.*.attn': 'attention'}}")
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(
            f"cp={cp}: {type(model).__name__}.forward takes no position_ids, so each zigzag shard would "
            f"compute positions 0..s/cp-1 from its own length (silently wrong RoPE). Add a "
            f"position_ids=None argument and use it for the positions (a model without positional "
            f"encodings may simply accept and ignore it)")


def attention_backends(plan: ParallelPlan, mesh: DeviceMesh, say: bool = False):
    """The ring's block kernels, for causal attention and for packed documents: the plan's
    choice for both, or with "auto" the measured table's (``say``: its one log line)."""
    from .context_parallel.backend_choice import AttentionBackends, choose_attention_backend

    backend = plan.kernel_backend("attention")
    if backend == "auto":
        return choose_attention_backend(mesh.device_type, say=say)
    return AttentionBackends(backend, backend, "the plan's choice")


def kernel_backend(plan: ParallelPlan, family: str, mesh: DeviceMesh) -> str:
    """A kernel family's backend with "auto" resolved: attention from the measured table
    (``context_parallel/backend_choice.py``); the others Triton on CUDA, torch elsewhere."""
    backend = plan.kernel_backend(family)
    if backend == "auto" and family == "attention":
        return attention_backends(plan, mesh).plain
    if backend == "auto":
        backend = "triton" if mesh.device_type == "cuda" else "torch"
    return backend


