"""The default plan of the built-in Llama (and its MoE flavours): data beside the model.

Blocks are ``layers.*``; rules are style names by glob, with style objects only where a
layout differs from a style's default:

- attention: q/k/v colwise, wo rowwise, ``layers.*.attention`` the SDPA call site (the
  ring runs there under context parallelism);
- dense feed-forward: w1/w3 colwise, w2 rowwise, its norms ``norm``;
- MoE layers (expert-tensor-parallel size 1, Megatron-Core's default): the layer runs token
  parallel over tp on the sequence shard (``moe`` style: router replicated, experts left to
  expert parallelism), so the norm before it keeps its output sequence-sharded; a shared
  expert gathers the layer's tokens once and is colwise/rowwise like a dense feed-forward,
  scattering back to the tokens.
"""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleInput

from ..models.llama import Llama
from ..tensor_parallel.styles import Norm, Rowwise


def llama_plan(model: Llama) -> dict:
    """``{"blocks", "rules", "num_heads", "num_kv_heads"}`` for ``ParallelPlan`` fields left None."""
    args = model.args
    n = args.n_layers
    kinds = {moe: [i for i in range(n) if args.is_moe_layer(i) == moe] for moe in (False, True)}

    def per_layer(moe: bool, suffix: str, style) -> dict:
        """One glob if every layer is of this kind, else one name per layer of it."""
        if len(kinds[moe]) == n:
            return {f"layers.*.{suffix}": style}
        return {f"layers.{i}.{suffix}": style for i in kinds[moe]}

    rules = {
        "tok_embeddings": "embedding",
        "layers.*.attention_norm": "norm",
        "layers.*.attention": "attention",
        "layers.*.attention.wq": "colwise",
        "layers.*.attention.wk": "colwise",
        "layers.*.attention.wv": "colwise",
        "layers.*.attention.wo": "rowwise",
        **per_layer(False, "ffn_norm", "norm"),
        **per_layer(False, "feed_forward.w1", "colwise"),
        **per_layer(False, "feed_forward.w3", "colwise"),
        **per_layer(False, "feed_forward.w2", "rowwise"),
        **per_layer(True, "ffn_norm", Norm(gather_output=False)),
        **per_layer(True, "feed_forward", "moe"),
    }
    if args.moe is not None and args.moe.n_shared_experts:
        rules |= {  # the MoE's (tokens, dim) rows are Shard(0) on tp
            "layers.*.feed_forward.shared": PrepareModuleInput(input_layouts=Shard(0),
                                                               desired_input_layouts=Replicate()),
            "layers.*.feed_forward.shared.w1": "colwise",
            "layers.*.feed_forward.shared.w3": "colwise",
            "layers.*.feed_forward.shared.w2": Rowwise(output_layout=Shard(0)),
        }
    rules |= {"norm": "norm", "output": "head"}
    return {"blocks": "layers.*", "rules": rules, "num_heads": args.n_heads, "num_kv_heads": args.n_kv_heads}
