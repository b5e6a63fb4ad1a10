"""Tied parameters: one ``Parameter`` used by two modules (the input embedding and the
output head: ``tie_word_embeddings=True`` in Llama 3.2 1B/3B, small Qwen and Gemma models).

One device sums both uses' gradients into the one tensor. Each strategy keeps that true:

- **FSDP / DDP / CP**: the parameter stays one object; the embedding and the head sit in
  the root FSDP unit, which shards it once.
- **TP**: torch's styles replace each module's parameters by new DTensors, so the two
  modules would end up with two parameters that train apart. The vocab-parallel embedding
  and head both shard the weight ``Shard(0)`` over tp (the vocabulary rows), so after TP
  the head is given the embedding's DTensor again (:func:`retie_after_tp`) and autograd
  sums the two uses, as Megatron's vocab-parallel tied embedding does. Any other pair of
  styles would need two layouts of one tensor: refused before any collective.
- **PP**: the embedding lives on the first stage, the head on the last, each stage with a
  copy of the weight (both start from the one tensor the model was built with). After each
  backward the copies' gradients are summed over the pp ranks holding them (one
  all-reduce, Megatron's "embedding group") so both copies take the same optimizer step
  and stay equal; the gradient norm counts the parameter once. Copies on one rank (the V
  schedule puts the first and last stage on pp rank 0) are summed locally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one Parameter, in registration order (the first is the canonical
    name, the one a checkpoint saves); only groups of two or more."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _owner(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def check_tied(model: nn.Module, groups: list[list[str]], styles: dict, tp: int, pp: int,
               block_names: list[str]) -> None:
    """Tied weights under TP need the vocab-parallel embedding and head (one ``Shard(0)``
    layout for both); under PP they must live outside the pipelined blocks (the stage
    of a block is not where another stage can sum its gradient). Local, before any
    collective."""
    from .tensor_parallel.styles import VocabEmbedding, VocabHead

    for names in groups:
        shown = " and ".join(names)
        if tp > 1:
            off = [n for n in names if not isinstance(styles.get(_owner(n)), (VocabEmbedding, VocabHead))]
            if off:
                got = {n: type(styles.get(_owner(n))).__name__ if _owner(n) in styles else "no rule" for n in off}
                raise ValueError(
                    f"{shown} are one parameter (tied weights, e.g. tie_word_embeddings=True); under tp={tp} "
                    f"both uses must shard it the same way, over the vocabulary: give their modules the rules "
                    f"'embedding' and 'head' (vocab-parallel, weight Shard(0)). Got {got}. Or untie them "
                    f"before parallelize (for a transformers model: config.tie_word_embeddings=False and "
                    f"model.lm_head.weight = nn.Parameter(model.get_input_embeddings().weight.detach().clone()))")
        if pp > 1:
            inside = [n for n in names if any(n.startswith(b + ".") for b in block_names)]
            if inside:
                raise ValueError(
                    f"{shown} are one parameter used inside the pipelined blocks ({inside[0]}); under "
                    f"pp={pp} its copies would sit on different stages inside the schedule. Only weights "
                    f"tied outside the blocks (input embedding and output head) are supported: untie the "
                    f"shared block weights or use pp=1")


def to_empty_keeping_ties(module: nn.Module, device: torch.device) -> None:
    """``module.to_empty(device)`` that keeps every Parameter object: each one's storage is
    swapped in place (``torch.utils.swap_tensors``). A plain ``to_empty`` from meta to CUDA
    replaces a parameter by a new Parameter object per module that uses it, which silently
    unties tied weights and leaves stale every reference taken before (the tied copies'
    gradient sum, the expert-parallel gradient groups, an optimizer built first); from meta
    to CPU it happens to keep them, so only GPUs would show it. Ties are asserted after."""
    groups = tied_groups(module)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        module.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    for names in groups:
        first = module.get_parameter(names[0])
        if any(module.get_parameter(n) is not first for n in names[1:]):
            raise RuntimeError(f"materializing untied {names}")


def separate_stage_copies(stage_modules: list[nn.Module], groups: list[list[str]]) -> None:
    """PP: a rank running two stages that both use a tied weight (the V schedule's first and
    last stage) gets a copy per stage module, as on two ranks: each stage is
    parallelized (TP, FSDP) as its own root, which one shared tensor would break."""
    for names in groups:
        seen: set[int] = set()
        for m in stage_modules:
            for name in names:
                if not _has_param(m, name):
                    continue
                p = m.get_parameter(name)
                if id(p) in seen:
                    copy = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    for other in names:  # the stage's other uses share its copy
                        if _has_param(m, other) and m.get_parameter(other) is p:
                            setattr(m.get_submodule(_owner(other)), other.rpartition(".")[2], copy)
                    p = copy
                seen.add(id(p))


def retie_after_tp(module: nn.Module, groups: list[list[str]]) -> None:
    """Give every present use of a tied parameter the same (first present) DTensor again.
    The styles checked by :func:`check_tied` shard both copies identically from the same
    tensor, so they hold the same values and layout; this is asserted."""
    for names in groups:
        present = [n for n in names if _has_param(module, n)]
        if len(present) < 2:
            continue
        first = module.get_parameter(present[0])
        for name in present[1:]:
            other = module.get_parameter(name)
            if other is first:
                continue
            if getattr(other, "placements", None) != getattr(first, "placements", None) or other.shape != first.shape:
                raise RuntimeError(f"tied {name} and {present[0]} came out of TP with different layouts: "
                                   f"{getattr(other, 'placements', None)} vs {getattr(first, 'placements', None)}")
            owner = module.get_submodule(_owner(name))
            setattr(owner, name.rpartition(".")[2], first)


def _has_param(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
        return True
    except AttributeError:
        return False


class TiedGradSync:
    """Sums tied copies' gradients over the pp ranks holding them (see the module
    docstring). ``copies``: per group, this rank's distinct copies (empty on ranks that hold
    none); ``group``: per group, the process group of the pp ranks holding copies (None
    when one rank holds them all)."""

    def __init__(self, copies: list[list[nn.Parameter]], groups: list, n_copies: list[int], srcs: list[int]):
        self.copies = copies
        self.groups = groups
        self.n_copies = n_copies
        self.srcs = srcs  # per group: the global rank whose copy is the canonical one

    @classmethod
    def build(cls, names_groups: list[list[str]], stage_modules: list[nn.Module], holder_pp_ranks: list[list[int]],
              n_copies: list[int], mesh: DeviceMesh) -> "TiedGradSync":
        """``holder_pp_ranks[i]``: the pp ranks whose stages hold a use of group i (every
        rank computes the same list, so the groups are created in the same order);
        ``n_copies[i]``: how many stages hold a copy of it."""
        copies, groups, srcs = [], [], []
        pp_size = mesh.size(mesh.mesh_dim_names.index("pp"))
        my_rank = dist.get_rank()
        for names, holders in zip(names_groups, holder_pp_ranks):
            local: list[nn.Parameter] = []
            for m in stage_modules:
                for n in names:
                    if _has_param(m, n):
                        p = m.get_parameter(n)
                        if all(p is not q for q in local):
                            local.append(p)
            copies.append(local)
            group, src = _holder_group(mesh, holders, pp_size, my_rank) if len(holders) > 1 else (None, my_rank)
            groups.append(group)
            srcs.append(src)
        return cls(copies, groups, n_copies, srcs)

    def replicas(self) -> dict[nn.Parameter, int]:
        """{copy: number of copies over the stages}: the gradient norm divides by it."""
        return {p: n for local, n in zip(self.copies, self.n_copies) for p in local}

    @torch.no_grad()
    def sync(self) -> None:
        """After backward (FSDP's reduce-scatter done): every copy's gradient becomes the sum
        of all copies' gradients (a copy without one counts as zero)."""
        for local, group in zip(self.copies, self.groups):
            if not local or (len(local) == 1 and group is None):
                continue
            total = torch.zeros_like(_local(local[0]))
            for p in local:
                if p.grad is not None:
                    total += _local(p.grad)
            if group is not None:
                dist.all_reduce(total, group=group)
            for p in local:
                if p.grad is not None:
                    _local(p.grad).copy_(total)
                elif isinstance(p, DTensor):
                    p.grad = DTensor.from_local(total.clone(), p.device_mesh, p.placements, shape=p.shape,
                                                stride=p.stride(), run_check=False)
                else:
                    p.grad = total.clone()


    @torch.no_grad()
    def broadcast_weights(self) -> None:
        """Make every copy equal to the canonical one (the first stage's): after an init
        that initialized only that one."""
        for local, group, src in zip(self.copies, self.groups, self.srcs):
            if not local:
                continue
            first = _local(local[0])
            if group is not None:
                dist.broadcast(first, src=src, group=group)
            for p in local[1:]:
                _local(p).copy_(first)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _holder_group(mesh: DeviceMesh, holders: list[int], pp_size: int, my_rank: int):
    """(process group, global rank of its first holder) of this rank's column of the pp
    dim restricted to ``holders``. With every pp rank a holder, the group is the pp group
    itself; otherwise one new group per column, created by every rank in the same order
    (Megatron's embedding groups)."""
    from .mesh import submesh

    pp_dim = mesh.mesh_dim_names.index("pp")
    columns = mesh.mesh.movedim(pp_dim, 0).reshape(pp_size, -1)
    column = next(c for c in range(columns.shape[1]) if my_rank in columns[:, c].tolist())
    src = int(columns[min(holders), column])
    if sorted(holders) == list(range(pp_size)):
        return submesh(mesh, "pp").get_group(), src
    mine = None
    for c in range(columns.shape[1]):
        ranks = [int(columns[h, c]) for h in sorted(holders)]
        g = dist.new_group(ranks)
        if c == column:
            mine = g
    return mine, src
