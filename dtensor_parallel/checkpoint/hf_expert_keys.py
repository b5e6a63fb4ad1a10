"""Where a transformers MoE model's tensors are in a ``save_pretrained`` folder.

transformers 5 holds a block's routed experts as two fused 3-D parameters,
``experts.gate_up_proj`` (E, 2F, dim) and ``experts.down_proj`` (E, dim, F), but
``save_pretrained`` writes them back in the checkpoint layout of the Hub (its conversion
mapping, reversed): one 2-D tensor per expert and projection, and for Mixtral the block
under its old name ``block_sparse_moe`` (measured with transformers 5.17 and 5.24):

=========  ==========================================  ======================
Mixtral    ``model.layers.L.block_sparse_moe.``         ``experts.e.w1/w3/w2.weight``
Qwen-MoE   ``model.layers.L.mlp.``                      ``experts.e.gate_proj/up_proj/down_proj.weight``
=========  ==========================================  ======================

(w1 / gate_proj: the gate (F, dim); w3 / up_proj: the up projection (F, dim); w2 /
down_proj (dim, F).) A folder holding the fused tensors under the model's own names is read
as well. Each read is a box of one stored tensor into a box of the rank's local tensor, so
an expert-parallel rank opens only its own experts' tensors.
"""

from __future__ import annotations

#: model_type -> ((module name in memory, its name in the folder) or None, (gate, up, down) names)
EXPERT_LAYOUTS: dict[str, tuple[tuple[str, str] | None, tuple[str, str, str]]] = {
    "mixtral": ((".mlp.", ".block_sparse_moe."), ("w1", "w3", "w2")),
    "qwen2_moe": (None, ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": (None, ("gate_proj", "up_proj", "down_proj")),
}
FUSED = (".experts.gate_up_proj", ".experts.down_proj")


def stored_names(name: str, model_type: str | None) -> list[str]:
    """The names a model tensor may have in a folder: its own, then the Hub layout's."""
    rename = EXPERT_LAYOUTS.get(model_type or "", (None,))[0]
    if rename is not None and rename[0] in name:
        return [name, name.replace(rename[0], rename[1], 1)]
    return [name]


def per_expert_reads(name: str, shape: tuple[int, ...], box: tuple[tuple[int, ...], tuple[int, ...]],
                     model_type: str | None) -> list[tuple[str, tuple[int, ...], tuple, tuple]] | None:
    """For a fused expert parameter ``name`` of global ``shape`` whose local box is ``box``
    (offsets, sizes): ``[(stored key, its shape, its slices, slices of the local tensor)]``,
    one per expert and projection the box covers; None for any other tensor."""
    if model_type not in EXPERT_LAYOUTS or not name.endswith(FUSED):
        return None
    _, (gate, up, down) = EXPERT_LAYOUTS[model_type]
    prefix = stored_names(name, model_type)[-1].rsplit(".", 1)[0]  # ...mlp.experts (as stored)
    (o0, o1, o2), (s0, s1, s2) = box
    reads = []
    for e in range(o0, o0 + s0):
        if name.endswith(".gate_up_proj"):  # (E, 2F, dim): rows [0, F) the gate's, [F, 2F) the up's
            f = shape[1] // 2
            for half, proj in enumerate((gate, up)):
                r0, r1 = max(o1, half * f), min(o1 + s1, (half + 1) * f)
                if r0 < r1:
                    reads.append((f"{prefix}.{e}.{proj}.weight", (f, shape[2]),
                                  (slice(r0 - half * f, r1 - half * f), slice(o2, o2 + s2)),
                                  (e - o0, slice(r0 - o1, r1 - o1), slice(0, s2))))
        else:  # down_proj (E, dim, F)
            reads.append((f"{prefix}.{e}.{down}.weight", tuple(shape[1:]),
                          (slice(o1, o1 + s1), slice(o2, o2 + s2)), (e - o0, slice(0, s1), slice(0, s2))))
    return reads


def expert_keys(name: str, n_experts: int, model_type: str | None) -> list[str]:
    """Every stored key a fused expert parameter reads from (the folder's tensors that
    belong to the model); [] for any other tensor."""
    if model_type not in EXPERT_LAYOUTS or not name.endswith(FUSED):
        return []
    _, (gate, up, down) = EXPERT_LAYOUTS[model_type]
    prefix = stored_names(name, model_type)[-1].rsplit(".", 1)[0]
    projs = (gate, up) if name.endswith(".gate_up_proj") else (down,)
    return [f"{prefix}.{e}.{p}.weight" for e in range(n_experts) for p in projs]
