"""transformers' MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE) as our MoE layers, so expert
parallelism, the token-parallel ``moe`` TP style, the dispatch kernels and the balancing
statistics apply to them unchanged.

transformers 5 keeps a sparse MoE block as a router (``gate``: ``weight`` (E, dim)), the
routed experts as two 3-D parameters (``experts.gate_up_proj`` (E, 2F, dim), the gate's
rows then the up projection's; ``experts.down_proj`` (E, dim, F)) and, in Qwen2-MoE, a
shared expert (``shared_expert``, an MLP) scaled by ``sigmoid(shared_expert_gate(x))``.
:func:`adapt_hf_moe_blocks` puts an :class:`HFSparseMoE` in each block's place that holds
the *same submodules* (so every parameter keeps its transformers name and class, and
transformers' own init and ``save_pretrained`` keys still apply) and computes the block
the way our layers do: route in fp32 (``models.moe.route``), permute, grouped experts
(``grouped_glu`` on the fused layout), combine, the shared expert.

What it computes against transformers (fp32: equal; bf16: ours routes in fp32 where
Mixtral's router multiplies in the model's dtype):

- routing: softmax over the experts, top-k, renormalized for Mixtral and for Qwen when
  ``norm_topk_prob``; dropless (transformers' blocks are dropless too);
- **balancing loss, ours, stated**: transformers adds ``router_aux_loss_coef *
  load_balancing_loss_func(...)`` to its loss only when ``output_router_logits`` is set, and
  that function pools every layer's router logits into one Switch loss, ``E * sum_e
  (slots_e / T) * (mean prob_e)``, over the rows of all layers. We keep the loss per layer
  (Megatron's, our MoE's: the same value in every layout, micro-batch by micro-batch) and
  weight it so a one-layer model gets transformers' value exactly: ``load_balance =
  "aux_loss"`` iff ``output_router_logits``, with ``aux_loss_coeff = router_aux_loss_coef *
  top_k / n_moe_layers`` (our slot fraction divides by top_k; the mean over layers keeps
  transformers' scale). The returned language-model loss excludes it, as for our models
  (``pm.moe_stats()`` reports it);
- refused (``ValueError`` before any collective): router jitter noise (random per rank),
  experts stored transposed or with biases (other architectures' layouts).

Only the blocks of ``ADAPTED_BLOCKS`` (with their own router class) are adapted. Other
transformers MoE blocks keep transformers' own code, which is correct under FSDP, DDP, CP
and PP; expert parallelism over them is a ``ValueError`` naming the block
(:func:`check_expert_parallel_support`), and TP finds their expert weights without a rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.moe import MoEArgs, MoELayer, grouped_glu, local_tensor, route, token_local

#: transformers MoE causal LMs with a built-in plan: class name -> per-head q/k norms
HF_MOE_LMS: dict[str, bool] = {
    "MixtralForCausalLM": False,
    "Qwen2MoeForCausalLM": False,
    "Qwen3MoeForCausalLM": True,
}


#: the sparse blocks whose routing the adapter computes as transformers does: block class ->
#: its router's class (softmax, top-k, renormalized or not). Other transformers MoE blocks
#: route otherwise (PhiMoE's sparsemixer, sigmoid scores with correction biases, grouped
#: routing...): they are left as they are (their own code runs, correctly, without EP), never
#: adapted into a silently different routing.
ADAPTED_BLOCKS = {"MixtralSparseMoeBlock": "MixtralTopKRouter", "Qwen2MoeSparseMoeBlock": "Qwen2MoeTopKRouter",
                  "Qwen3MoeSparseMoeBlock": "Qwen3MoeTopKRouter"}


def _is_hf_sparse_block(module: nn.Module) -> bool:
    """A transformers MoE block (routed experts in the fused layout), adaptable or not."""
    experts = getattr(module, "experts", None)
    return (type(module).__module__.startswith("transformers.") and hasattr(experts, "gate_up_proj")
            and hasattr(experts, "down_proj"))


def _is_adaptable(module: nn.Module) -> bool:
    gate = getattr(module, "gate", None)
    return gate is not None and ADAPTED_BLOCKS.get(type(module).__name__) == type(gate).__name__


def other_moe_blocks(model: nn.Module) -> list[str]:
    """Class names of the transformers MoE blocks of ``model`` the adapter does not compute."""
    return sorted({type(m).__name__ for m in model.modules() if _is_hf_sparse_block(m) and not _is_adaptable(m)})


def moe_args_from_hf(config, n_moe_layers: int) -> MoEArgs:
    """Our MoE settings for a transformers MoE config (see the module docstring)."""
    n_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = config.num_experts_per_tok
    hidden = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    norm = getattr(config, "norm_topk_prob", None)
    balance = bool(getattr(config, "output_router_logits", False))
    coeff = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    return MoEArgs(n_experts=n_experts, top_k=top_k, hidden_dim=hidden,
                   route_norm=True if norm is None else bool(norm),  # Mixtral: always renormalized
                   load_balance="aux_loss" if balance and coeff else "none",
                   aux_loss_coeff=coeff * top_k / max(n_moe_layers, 1), capacity_factor=None)


def check_hf_moe_block(name: str, block: nn.Module, config) -> None:
    """What the adapter would not compute as transformers does: refused, naming the fix."""
    jitter = getattr(block, "jitter_noise", None) or getattr(config, "router_jitter_noise", None)
    if jitter:
        raise ValueError(f"{name}: config.router_jitter_noise={jitter} multiplies the tokens by random noise "
                         f"(different on every rank) before routing: not supported under parallelize; set "
                         f"config.router_jitter_noise = 0.0")
    unknown = [n for n, _ in block.named_children() if n not in ("gate", "experts", "shared_expert",
                                                                  "shared_expert_gate")]
    unknown += [n for n, _ in block.named_parameters(recurse=False)]
    if unknown:
        raise ValueError(f"{name}: {type(block).__name__} has {unknown}, which the MoE adapter does not compute "
                         f"(it knows gate, experts, shared_expert and shared_expert_gate)")
    experts = block.experts
    for attr, what in (("is_transposed", "stored transposed"), ("has_bias", "with biases")):
        if getattr(experts, attr, False):
            raise ValueError(f"{name}: experts {what} ({type(experts).__name__}.{attr}) are not supported under "
                             f"parallelize (Mixtral / Qwen-MoE layouts only)")
    e, two_f, dim = experts.gate_up_proj.shape
    if experts.down_proj.shape != (e, dim, two_f // 2):
        raise ValueError(f"{name}: experts.down_proj has shape {tuple(experts.down_proj.shape)}, not "
                         f"{(e, dim, two_f // 2)} as gate_up_proj {tuple(experts.gate_up_proj.shape)} implies")


class HFSparseMoE(MoELayer):
    """A transformers sparse MoE block computed as our MoE layer (module docstring). Holds
    the block's own ``gate``, ``experts`` (and ``shared_expert`` / ``shared_expert_gate``)."""

    expert_weights = ("experts.gate_up_proj", "experts.down_proj")

    def __init__(self, block: nn.Module, args: MoEArgs):
        super().__init__(args)
        for name, child in block.named_children():  # in the block's order: state dicts keep theirs
            self.add_module(name, child)
        for name in ("shared_expert", "shared_expert_gate"):
            if name not in self._modules:
                setattr(self, name, None)
        self.token_parallel_weights = ("gate.weight",) + (
            ("shared_expert_gate.weight",) if self.shared_expert_gate is not None else ())
        self.block_class = type(block).__name__

    def route(self, flat: torch.Tensor, batch: int):
        return route(flat, token_local(self.gate.weight), self.args, batch, self.dispatch)

    def grouped_experts(self):
        gate_up, down = local_tensor(self.experts.gate_up_proj), local_tensor(self.experts.down_proj)
        act = self.experts.act_fn
        return lambda x, counts: grouped_glu(x, gate_up, down, counts, act)

    def shared_output(self, flat: torch.Tensor) -> torch.Tensor | None:
        if self.shared_expert is None:
            return None
        out = self.shared_expert(flat)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(F.linear(flat, token_local(self.shared_expert_gate.weight))) * out
        return out

    def extra_repr(self) -> str:
        return f"adapts {self.block_class}, {self.args.n_experts} experts, top {self.args.top_k}"


def adapt_hf_moe_blocks(model: nn.Module) -> int:
    """Replace every transformers sparse MoE block of ``model`` by an :class:`HFSparseMoE`
    holding its submodules (local, before any collective; idempotent). Turns off
    ``config.output_router_logits`` once its setting is read: transformers would otherwise
    record router logits our layers do not produce. Returns the number of MoE layers."""
    config = model.config
    blocks = [(n, m) for n, m in model.named_modules() if _is_hf_sparse_block(m) and _is_adaptable(m)]
    adapted = sum(isinstance(m, HFSparseMoE) for m in model.modules())
    if not blocks:
        return adapted
    for name, block in blocks:
        check_hf_moe_block(name, block, config)
    args = moe_args_from_hf(config, len(blocks) + adapted)
    for name, block in blocks:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, HFSparseMoE(block, args))
    config.output_router_logits = False
    return len(blocks) + adapted


def feed_forward_rules(model: nn.Module) -> dict:
    """TP rules of each decoder layer's feed-forward: dense (gate/up colwise, down rowwise)
    or MoE (token parallel over tp, the norm before it keeping the sequence shard; a shared
    expert gathering the layer's tokens once, colwise/rowwise, scattering back). One glob
    where every layer is of one kind, else one name per layer."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput

    from ..tensor_parallel.styles import Norm, Rowwise

    layers = model.model.layers
    moe = [isinstance(layer.mlp, MoELayer) for layer in layers]
    uniform = len(set(moe)) == 1

    def at(i: int, suffix: str) -> str:
        return f"model.layers.{'*' if uniform else i}.{suffix}"

    rules: dict = {}
    for i, layer in enumerate(layers):
        if not moe[i]:
            rules |= {at(i, "post_attention_layernorm"): "norm", at(i, "mlp.gate_proj"): "colwise",
                      at(i, "mlp.up_proj"): "colwise", at(i, "mlp.down_proj"): "rowwise"}
            continue
        rules |= {at(i, "post_attention_layernorm"): Norm(gather_output=False), at(i, "mlp"): "moe"}
        if layer.mlp.shared_expert is not None:  # the layer's (tokens, dim) rows are Shard(0) on tp
            rules |= {at(i, "mlp.shared_expert"): PrepareModuleInput(input_layouts=Shard(0),
                                                                     desired_input_layouts=Replicate()),
                      at(i, "mlp.shared_expert.gate_proj"): "colwise",
                      at(i, "mlp.shared_expert.up_proj"): "colwise",
                      at(i, "mlp.shared_expert.down_proj"): Rowwise(output_layout=Shard(0))}
    return rules


def check_expert_parallel_support(model: nn.Module, ep: int) -> None:
    """EP over MoE blocks the adapter does not compute: a ValueError naming them (local)."""
    others = other_moe_blocks(model)
    if ep > 1 and others:
        raise ValueError(f"expert_parallel={ep}: {type(model).__name__}'s MoE blocks ({', '.join(others)}) route "
                         f"in ways our MoE layer does not compute (supported: Mixtral, Qwen2-MoE, Qwen3-MoE), so "
                         f"their experts cannot be sharded; set expert_parallel=1 (transformers' own blocks then "
                         f"run under FSDP, DDP, CP and PP)")
