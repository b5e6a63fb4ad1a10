"""Match module-name globs to modules, check degrees, and apply TP/SP styles.

Globs match dot-separated names segment by segment (``layers.*.attention.wq`` matches
``layers.3.attention.wq`` but not ``layers.3.attention.wq.lora``), so a ``*`` never
crosses a dot. Every check here is local: it runs before any collective, so a bad plan is
the same ``ValueError`` on every rank instead of a hang.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from .styles import (TPKernels, TPStyle, _ColwiseParallel, _GatherOnceColwise, _RowwiseParallel, resolve_style,
                     style_from_rule)


def glob_match(pattern: str, name: str) -> bool:
    p, n = pattern.split("."), name.split(".")
    return len(p) == len(n) and all(fnmatchcase(a, b) for a, b in zip(n, p))


def match_modules(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and glob_match(pattern, n)]


def _near_names(model: nn.Module, pattern: str, k: int = 6) -> str:
    depth = len(pattern.split("."))
    names = [n for n, _ in model.named_modules() if n and len(n.split(".")) == depth]
    return ", ".join(names[:k]) + (" ..." if len(names) > k else "")


def resolve_rules(model: nn.Module, rules: dict[str, object]) -> dict[str, TPStyle | ParallelStyle]:
    """{module name: style} for every module the rules match. Raises on a rule that matches
    nothing or on a module matched by two rules."""
    out: dict[str, TPStyle | ParallelStyle] = {}
    owner: dict[str, str] = {}
    for pattern, rule in rules.items():
        style = style_from_rule(rule)
        matched = match_modules(model, pattern)
        if not matched:
            raise ValueError(
                f"TP rule {pattern!r} matches no module of {type(model).__name__}; module names at "
                f"that depth are: {_near_names(model, pattern) or '(none)'}. Fix the glob or drop the rule")
        for name, module in matched:
            if name in out:
                raise ValueError(f"module {name!r} is matched by two TP rules, {owner[name]!r} and "
                                 f"{pattern!r}: make the globs disjoint")
            if isinstance(style, TPStyle) and not isinstance(module, style.module_types):
                raise ValueError(
                    f"TP rule {pattern!r} gives style {type(style).__name__} to {name!r}, a "
                    f"{type(module).__name__}; it needs a {' or '.join(t.__name__ for t in style.module_types)}")
            out[name], owner[name] = style, pattern
    return out


def check_tp_divisibility(model: nn.Module, styles: dict[str, TPStyle | ParallelStyle], tp: int,
                          num_heads: int | None, num_kv_heads: int | None) -> None:
    """Every sharded size must divide by tp: heads, kv heads, hidden sizes, vocab."""
    if tp == 1:
        return
    for what, n in (("attention heads", num_heads), ("kv heads", num_kv_heads)):
        if n is not None and n % tp:
            raise ValueError(f"tp={tp} does not divide the {n} {what}: choose a tp that divides {n}")
    modules = dict(model.named_modules())
    for name, style in styles.items():
        feature = getattr(style, "sharded_feature", None)
        if feature is None:
            continue
        size = getattr(modules[name], feature)
        if size % tp:
            kind = "vocab" if feature == "num_embeddings" or type(style).__name__ == "VocabHead" else "hidden"
            raise ValueError(
                f"tp={tp} does not divide {name}.{feature}={size} (the {kind} size): choose a tp that "
                f"divides {size}{' or pad the vocabulary to a multiple of tp' if kind == 'vocab' else ''}")


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, styles: dict[str, TPStyle | ParallelStyle],
                          sequence_parallel: bool, kernels: TPKernels = TPKernels()) -> None:
    """Distribute each matched module over ``tp_mesh`` with its style, resolved with the
    plan's kernel choices (styles that resolve to None, such as the attention call site,
    have nothing to do under TP). A plain ``nn.Linear`` whose style asks for the fused
    matmul + reduce-scatter (Triton; or NCCL under selective recompute) is first replaced by
    a ``FusedRowwiseLinear`` holding the same parameters; any other module keeps the unfused
    reduce-scatter. Likewise a plain column-parallel ``nn.Linear`` whose input arrives
    sequence-sharded (``_GatherOnceColwise``, fused) becomes a ``FusedColwiseLinear``, and one
    whose output is wanted as a local ``Shard(-1)`` block a ``LocalColwiseLinear`` (its eager
    forward on local tensors, ``local_linear.py``)."""
    from .gather_once import FusedColwiseLinear
    from .local_linear import LocalColwiseLinear
    from .matmul_reduce_scatter import FusedRowwiseLinear

    plan = {name: resolve_style(style, sequence_parallel, kernels) for name, style in styles.items()}
    for name, style in plan.items():
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            continue
        if isinstance(style, _RowwiseParallel) and style.fused_scatter_dim is not None:
            fused = FusedRowwiseLinear.from_linear(module, scatter_dim=style.fused_scatter_dim, push=style.fused_push)
        elif isinstance(style, _GatherOnceColwise) and style.fused:
            fused = FusedColwiseLinear.from_linear(module, gather_dim=style.input_layouts[0].dim)
        elif isinstance(style, _ColwiseParallel) and style.local_output_block:
            fused = LocalColwiseLinear.from_linear(module)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        model.get_submodule(parent).register_module(attr, fused)
    parallelize_module(model, tp_mesh, {name: style for name, style in plan.items() if style is not None})
