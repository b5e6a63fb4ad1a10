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

from .parity import REL_TOL, assert_grads_match, case_device, make_batch, rel_err

ARCHS = ("llama", "llama_tied", "mistral", "qwen2", "qwen3")  # the built-in plans
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
           "gemma2": transformers.Gemma2Config}[arch]
    extra = {"llama_tied": {"tie_word_embeddings": True}, "mistral": {"sliding_window": None},
             "qwen3": {"head_dim": 8},
             # no built-in plan: multipliers on the embedding, residuals, attention scores, logits
             "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                         "logits_scaling": 4.0},
             "gemma2": {"head_dim": 8}}.get(arch, {})
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
    return model.to(case_device())


def reference_step(model, x, y) -> torch.Tensor:
    """Mean token loss of the global batch on one device, backward (micro-batches as a
    pipeline runs them make no difference to a dense model's gradient)."""
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach()


def hf_one_step_parity(arch: str, mesh_kwargs: dict, plan_kwargs: dict, batch: int = 4, seq: int = 16,
                       steps: int = 1, layers: int = 2) -> float:
    """Loss, every gradient and the gradient norm equal to the single-device model's, then
    every parameter after an AdamW step; ``steps`` > 1: the losses of that many steps track
    one device."""
    ref = make_hf_model(arch, num_hidden_layers=layers)
    model = copy.deepcopy(ref)
    pm = parallelize(model, build_mesh(**mesh_kwargs), ParallelPlan(**plan_kwargs))
    # eps 1e-5: Adam's first steps are about lr * sign(g), so with a tiny eps an element whose
    # gradient is near zero moves by noise; 1e-5 keeps the comparison about the gradients
    lr = 1e-2 if steps == 1 else 3e-3  # (several steps: the rate tests/parity.py trains with)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.1, eps=1e-5)
    opt = torch.optim.AdamW(pm.parameters(), lr=lr, weight_decay=0.1, eps=1e-5)
    loss = None
    for step in range(steps):
        x, y = make_batch(ref.config.vocab_size, batch, seq, seed=1 + step)
        ref_loss = reference_step(ref, x, y)
        loss = pm.forward_backward(pm.shard_batch(x), pm.shard_batch(y))
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
