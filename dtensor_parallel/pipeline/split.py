"""Cutting a model into pipeline stages.

A stage is a pruned copy of the whole model: the blocks of other stages are removed from
their container (``ModuleDict`` or ``ModuleList``; the remaining keys keep their indices,
so parameter names stay those of the full model), and the modules with parameters before
the blocks (embedding) live only on the first stage, those after (final norm, head) only on
the last; elsewhere they become :class:`PassThrough` modules that return their first
input. Modules without parameters (rotary embeddings, buffers) stay on every stage. So an
unmodified ``forward`` runs on each stage: a Hugging Face ``LlamaModel`` embeds with a
pass-through (the hidden states come in where the token ids would), builds its rotary
table, runs this stage's layers, and its final norm and head pass the hidden states on.
Parameters are not copied: each stage holds the original tensors.

Layer counts are checked before anything is built: a count that does not split as asked
is a ``ValueError`` with the arithmetic, never a dropped or duplicated layer (Megatron once
ran an 80-layer model at PP16 x VP2 with 64 layers).
"""

from __future__ import annotations

import copy

from torch import nn


def stage_layer_counts(n_layers: int, n_stages: int, *, layers_per_stage: list[int] | None = None,
                       first_stage_layers: int | None = None,
                       last_stage_layers: int | None = None) -> list[int]:
    """Blocks per stage (stage order, not rank order); their sum is exactly ``n_layers``."""
    if layers_per_stage is not None:
        if first_stage_layers is not None or last_stage_layers is not None:
            raise ValueError("give either layers_per_stage or first/last_stage_layers, not both")
        if len(layers_per_stage) != n_stages:
            raise ValueError(f"layers_per_stage has {len(layers_per_stage)} entries but there are "
                             f"{n_stages} stages (pp x virtual stages): give one count per stage")
        if sum(layers_per_stage) != n_layers:
            raise ValueError(f"layers_per_stage {layers_per_stage} sums to {sum(layers_per_stage)}, "
                             f"but the model has {n_layers} layers: every layer must be placed once")
        counts = list(layers_per_stage)
    else:
        first = first_stage_layers
        last = last_stage_layers
        ends = [c for c in (first, last) if c is not None]
        middle_stages = n_stages - len(ends)
        rest = n_layers - sum(ends)
        if n_stages == 1:
            if ends and sum(ends) != n_layers:
                raise ValueError(f"one stage holds all {n_layers} layers; drop first/last_stage_layers")
            return [n_layers]
        if rest < 0 or (middle_stages == 0 and rest != 0):
            raise ValueError(f"first/last_stage_layers ({first}, {last}) leave {rest} of {n_layers} layers "
                             f"for {middle_stages} other stages: adjust them")
        if middle_stages and rest % middle_stages:
            what = (f"{n_layers} layers" if not ends
                    else f"{n_layers} layers - first/last stage layers {sum(ends)} = {rest} layers")
            raise ValueError(
                f"{what} do not split evenly over {middle_stages} stages ({rest} / {middle_stages} = "
                f"{rest / middle_stages:.2f}): change pp or virtual stages, or give "
                f"first_stage_layers/last_stage_layers or an explicit layers_per_stage list")
        each = rest // middle_stages if middle_stages else 0
        counts = [each] * n_stages
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
    for i, c in enumerate(counts):
        if c < 0 or (c == 0 and 0 < i < n_stages - 1):
            raise ValueError(f"stage {i} would get {c} layers: middle stages need at least one layer")
    return counts


def virtual_stages_from_layers(n_layers: int, pp: int, layers_per_virtual_stage: int) -> int:
    """Megatron's ``--num-layers-per-virtual-pipeline-stage`` as virtual stages per rank."""
    per_rank = pp * layers_per_virtual_stage
    if n_layers % per_rank:
        raise ValueError(
            f"{n_layers} layers / (pp {pp} x {layers_per_virtual_stage} layers per virtual stage) = "
            f"{n_layers / per_rank:.2f} virtual stages per rank: not an integer, so some layers would "
            f"be dropped (Megatron's 80 layers at PP16 x VP2 ran as 64). Choose layers per virtual "
            f"stage dividing {n_layers // pp if n_layers % pp == 0 else n_layers} per rank")
    return n_layers // per_rank


def stages_of_rank(pp_rank: int, pp: int, virtual: int, style: str) -> list[int]:
    """Stage indices held by one pp rank. ``loop``: r, r+pp, r+2pp ... (interleaved 1F1B);
    ``v``: r and 2pp-1-r (the V shape of ZBV / DualPipeV, two stages a rank)."""
    if style == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual)]


def split_pre_post(model: nn.Module, container_name: str) -> tuple[list[str], list[str]]:
    """Top-most modules that run before / after the blocks' container, by registration
    order (embedding before; final norm and head after)."""
    pre: list[str] = []
    post: list[str] = []
    seen = False

    def walk(module: nn.Module, prefix: str) -> None:
        nonlocal seen
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == container_name:
                seen = True
            elif container_name.startswith(full + "."):
                walk(child, full + ".")
            else:  # parameterless ones too (a dropout after the embedding runs once)
                (post if seen else pre).append(full)

    walk(model, "")
    return pre, post


def blocks_container(block_names: list[str]) -> str:
    parents = {n.rsplit(".", 1)[0] if "." in n else "" for n in block_names}
    if len(parents) != 1 or "" in parents:
        raise ValueError(f"pipeline parallel needs the blocks in one container module (a ModuleList "
                         f"or ModuleDict such as 'layers'); the blocks have parents {sorted(parents)}")
    return parents.pop()


def stages_using(model: nn.Module, block_names: list[str], stage_blocks: list[list[str]], param_name: str) -> set[int]:
    """The stages whose module keeps the module of ``param_name``: its block's stage, the
    first stage for modules before the blocks, the last for those after, every stage for
    parameters of the model's own (non-module) attributes."""
    for stage, blocks in enumerate(stage_blocks):
        if any(param_name.startswith(b + ".") for b in blocks):
            return {stage}
    pre, post = split_pre_post(model, blocks_container(block_names))
    if any(param_name.startswith(m + ".") for m in pre):
        return {0}
    if any(param_name.startswith(m + ".") for m in post):
        return {len(stage_blocks) - 1}
    return set(range(len(stage_blocks)))


class PassThrough(nn.Module):
    """Another stage's module (embedding, final norm, head) on this stage: returns its first
    input, so the model's forward needs no change."""

    def forward(self, x, *args, **kwargs):
        return x


def _set(model: nn.Module, name: str, value: nn.Module | None) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, value)


def build_stage_module(model: nn.Module, block_names: list[str], keep_blocks: list[str],
                       is_first: bool, is_last: bool) -> nn.Module:
    """A pruned copy of ``model`` holding ``keep_blocks`` (and the embedding / head when
    first / last). Parameters and buffers are shared with ``model``, not copied."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    stage = copy.deepcopy(model, memo)
    container = blocks_container(block_names)
    pre, post = split_pre_post(model, container)
    holder = stage.get_submodule(container)
    keep = {n.rsplit(".", 1)[1] for n in keep_blocks}
    for key in list(holder._modules):
        if key not in keep:
            del holder._modules[key]  # ModuleList/ModuleDict iterate _modules.values()
    for name in (pre if not is_first else []) + (post if not is_last else []):
        if any(True for _ in model.get_submodule(name).parameters()):  # parameterless ones stay
            _set(stage, name, PassThrough())
    return stage
