"""Hugging Face ``transformers`` causal LMs through parallelize(), checked inside each rank
against the same model on one device (transformers' own sdpa attention and loss path as
the reference: an independent implementation of everything but the weights).

Tiny random configs, no downloads: 2 layers, 8 heads over 4 kv heads (tp 4 divides both),
head dim 8, vocabulary 128, fp32.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from dtensor_parallel import ParallelPlan, build_mesh, parallelize

from .parity import (REL_TOL, assert_grads_match, case_device, make_batch, make_documents,
                     positions_within_documents, rel_err)

ARCHS = ("llama", "llama_tied", "mistral", "qwen2", "qwen3")  # the built-in dense plans
#: transformers MoE LMs (4 experts, top 2): Mixtral and Qwen2-MoE (its shared expert and
#: gate) with the balancing loss on, Qwen3-MoE (q/k norms, one dense layer) without
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")
#: the rules a user writes for a transformers decoder of the Llama family's module names
USER_RULES = {
    "model.embed_tokens": "embedding", "model.layers.*.input_layernorm": "norm",
    "model.layers.*.self_attn": "attention", "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise", "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise", "model.layers.*.post_attention_layernorm": "norm",
    "model.layers.*.mlp.gate_proj": "colwise", "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise", "model.norm": "norm", "lm_head": "head"}


def hf_config(arch: str, **overrides):
    import transformers

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                  tie_word_embeddings=False, rms_norm_eps=1e-6)
    cls = {"llama": transformers.LlamaConfig, "llama_tied": transformers.LlamaConfig,
           "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "granite": transformers.GraniteConfig,
           "gemma2": transformers.Gemma2Config, "mixtral": transformers.MixtralConfig,
           "qwen2_moe": transformers.Qwen2MoeConfig, "qwen3_moe": transformers.Qwen3MoeConfig}[arch]
    moe = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1)  # (a large
    # coefficient, so the balancing loss's gradient matters in the checks)
    extra = {"llama_tied": {"tie_word_embeddings": True}, "mistral": {"sliding_window": None},
             "qwen3": {"head_dim": 8},
             # no built-in plan: multipliers on the embedding, residuals, attention scores, logits
             "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                         "logits_scaling": 4.0},
             "gemma2": {"head_dim": 8},
             "mixtral": {"num_local_experts": 4, "sliding_window": None, **moe},
             "qwen2_moe": {"num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
                           "norm_topk_prob": True, **moe},
             "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 32, "head_dim": 8, "mlp_only_layers": [0],
                           **moe, "output_router_logits": False}}.get(arch, {})
    return cls(**{**common, **extra, **overrides})


def make_hf_model(arch: str, seed: int = 0, **overrides):
    """A transformers model with random weights; norms (q/k norms too) non-trivial so their
    gradients are tested."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, **overrides),
                                                          attn_implementation="sdpa").float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            if name.endswith("mlp.gate.weight"):  # decisive routing: no near-ties in the top-k
                p.normal_(0.0, 0.5)
    return model.to(case_device())


def reference_step(model, x, y, n_micro: int = 1, dp: int = 1, document_ids=None) -> torch.Tensor:
    """Mean token loss of the global batch on one device, backward. A dense model's gradient
    does not depend on the micro-batches; an MoE model's balancing loss is per micro-batch
    (micro-batch m: chunk m of every dp rank's rows), so they are run as the pipeline runs
    them, each adding its balancing loss / n_micro. ``document_ids``: packed documents,
    given to transformers its own way (positions restarting at each document, no cache),
    for which it builds its own block-diagonal mask."""
    n_tokens = (y != -100).sum()
    total = torch.zeros((), device=x.device)
    per_micro = lambda t: t.view(dp, n_micro, -1, t.shape[-1])  # noqa: E731
    for m in range(n_micro):
        xm, ym = (per_micro(t)[:, m].reshape(-1, t.shape[-1]) for t in (x, y))
        kw = {}
        if document_ids is not None:
            docs_m = per_micro(document_ids)[:, m].reshape(-1, x.shape[-1])
            kw = {"position_ids": positions_within_documents(docs_m), "use_cache": False}
        out = model(input_ids=xm, output_router_logits=True, **kw) if hf_balancing_loss(model) \
            else model(input_ids=xm, **kw)
        loss_sum = F.cross_entropy(out.logits.flatten(0, 1), ym.flatten(), ignore_index=-100, reduction="sum")
        objective = loss_sum / n_tokens
        if hf_balancing_loss(model):
            objective = objective + hf_balancing_loss(model)(out.router_logits) / n_micro
        objective.backward()
        total = total + loss_sum.detach()
    return total / n_tokens


def hf_balancing_loss(model):
    """The balancing loss our MoE layers train a transformers MoE model with (None when its
    config has it off), computed with transformers' own ``load_balancing_loss_func`` one
    layer at a time, their mean times ``router_aux_loss_coef`` (``plans/hf_moe.py`` says why)."""
    import importlib

    cfg = model.config
    if not getattr(cfg, "output_router_logits", False):
        return None
    lbl = importlib.import_module(type(model).__module__).load_balancing_loss_func
    n_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    k = cfg.num_experts_per_tok

    def loss(router_logits) -> torch.Tensor:
        coeff = cfg.router_aux_loss_coef / len(router_logits)
        return sum(coeff * lbl((logits,), n_experts, k) for logits in router_logits)
    return loss


def hf_one_step_parity(arch: str, mesh_kwargs: dict, plan_kwargs: dict, batch: int = 4, seq: int = 16,
                       steps: int = 1, layers: int = 2, documents: bool = False) -> float:
    """Loss, every gradient and the gradient norm equal to the single-device model's, then
    every parameter after an AdamW step; ``steps`` > 1: the losses of that many steps track
    one device."""
    torch._dynamo.reset()  # a pooled worker's earlier cases must not use up the recompile limit
    ref = make_hf_model(arch, num_hidden_layers=layers)
    model = copy.deepcopy(ref)
    pm = parallelize(model, build_mesh(**mesh_kwargs), ParallelPlan(**plan_kwargs))
    ep = plan_kwargs.get("expert_parallel", 1)
    if ep > 1:  # expert parallel is real: each rank holds 1/ep of every expert weight
        experts = [p for n, p in pm.named_parameters() if ".experts." in n]
        assert all(p.to_local().shape[0] == p.shape[0] // ep for p in experts), "experts not sharded"
    # eps: Adam's first steps are about lr * sign(g), so with a tiny eps an element whose
    # gradient is near zero moves by noise; 1e-5 keeps the comparison about the gradients.
    # MoE models: 1e-4. Their attention gradients have elements of a few 1e-6 (measured:
    # Mixtral, v_proj of layer 1, TP2+SP x EP2), where g / (|g| + 1e-5) turns a 5e-3
    # relative rounding difference of the element into 1e-5 of the parameter's norm
    lr = 1e-2 if steps == 1 else 3e-3  # (several steps: the rate tests/parity.py trains with)
    eps = 1e-4 if arch in MOE_ARCHS else 1e-5
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.1, eps=eps)
    opt = torch.optim.AdamW(pm.parameters(), lr=lr, weight_decay=0.1, eps=eps)
    loss = None
    n_micro = pm._micro_batches(batch // pm.dims.dp) if pm.pipeline is not None else 1
    for step in range(steps):
        x, y = make_batch(ref.config.vocab_size, batch, seq, seed=1 + step)
        docs = make_documents(batch, seq, seed=2 + step) if documents else None
        ref_loss = reference_step(ref, x, y, n_micro, pm.dims.dp, document_ids=docs)
        loss = pm.forward_backward(pm.shard_batch(x), pm.shard_batch(y),
                                   document_ids=None if docs is None else pm.shard_batch(docs.cpu()))
        assert rel_err(loss, ref_loss) <= REL_TOL, f"step {step}: loss {loss.item()} != reference {ref_loss.item()}"
        if step == 0:
            assert_grads_match(pm, ref)
            ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
            assert rel_err(pm.grad_norm(), ref_norm) <= REL_TOL, "gradient norm"
        opt_ref.step()
        opt_ref.zero_grad()
        opt.step()
        pm.zero_grad()
    got, want = pm.full_state_dict(), ref.state_dict()
    for name, t in want.items():
        if name in got:
            tol = REL_TOL if steps == 1 else 1e-4  # (the training-parity tolerance of tests/parity.py)
            assert rel_err(got[name], t) <= tol, f"{name} after {steps} steps: {rel_err(got[name], t):.2e}"
    missing = set(dict(ref.named_parameters())) - set(got)
    assert not missing, f"parameters missing from the parallel model: {missing}"
    return loss.item()
