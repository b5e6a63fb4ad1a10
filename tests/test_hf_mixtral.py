"""transformers' Mixtral checkpoints into our MoE Llama and back (issue 19, item 4): a folder
saved by transformers (one tensor per expert, ``block_sparse_moe`` names) imported into a
layout with experts sharded over ep, logits equal to transformers' on the same folder;
export (from the parallel model, and from a training checkpoint through the CLI's code)
read back by ``from_pretrained`` with no missing or unexpected keys, logits equal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers  # the test extra: a missing install fails collection instead of skipping
from torch.distributed.tensor import DTensor

from dtensor_parallel import ParallelPlan, build_mesh, parallelize
from dtensor_parallel.checkpoint import export_hf, hf_config, import_hf, model_args_from_hf, save_checkpoint
from dtensor_parallel.checkpoint.hf_from_checkpoint import export_checkpoint_to_hf
from dtensor_parallel.models import Llama
from dtensor_parallel.models.moe import MoE

from .harness import run_distributed

TOKENS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))


def _transformers_mixtral(path: Path) -> transformers.MixtralForCausalLM:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        output_router_logits=True, router_aux_loss_coef=0.02, tie_word_embeddings=False)
    model = transformers.MixtralForCausalLM(config).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            if n.endswith("mlp.gate.weight"):  # decisive routing
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return model


def test_mixtral_config_becomes_our_moe_flavour(tmp_path):
    _transformers_mixtral(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert any(".block_sparse_moe.experts.3.w2.weight" in k for k in _keys(tmp_path))  # transformers' layout
    args = model_args_from_hf(tmp_path)
    m = args.moe
    assert (m.n_experts, m.top_k, m.hidden_dim, m.score_func, m.route_norm, m.n_shared_experts) == (
        4, 2, 32, "softmax", True, 0)
    assert (m.load_balance, m.aux_loss_coeff) == ("aux_loss", pytest.approx(0.02 * 2 / 2))
    assert args.rope_theta == saved["rope_parameters"]["rope_theta"] and args.n_dense_layers == 0
    back = hf_config(args, torch.float32)  # and back: the numbers transformers reads
    for key in ("model_type", "num_local_experts", "num_experts_per_tok", "intermediate_size",
                "output_router_logits", "router_aux_loss_coef"):
        assert back[key] == pytest.approx(saved[key]), key


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys += list(h.keys())
    return keys


def _import_export(hf_dir: str, out: str, ckpt: str) -> torch.Tensor:
    """EP2 x TP2 + SP: import (each rank reads its experts), logits, export, and a training
    checkpoint of the same layout."""
    with torch.device("meta"):
        model = Llama(model_args_from_hf(hf_dir))
    pm = parallelize(model, build_mesh(tp=2, dp_shard=2),
                     ParallelPlan(expert_parallel=2, sequence_parallel=True))
    pm.init_weights(seed=7)
    import_hf(pm, hf_dir)
    w1 = next(m for m in pm.module.modules() if isinstance(m, MoE)).w1
    assert isinstance(w1, DTensor) and w1.to_local().shape[0] == 2  # 2 of the 4 experts here
    with torch.no_grad():
        logits = pm(TOKENS)
    logits = (logits.full_tensor() if isinstance(logits, DTensor) else logits).detach()
    export_hf(pm, out, max_shard_bytes=40_000)
    save_checkpoint(ckpt, 1, pm)
    return logits


def test_mixtral_import_export_in_ep2_tp2(tmp_path):
    theirs = _transformers_mixtral(tmp_path / "hf")
    with torch.no_grad():
        want = theirs(TOKENS).logits
    results = run_distributed(4, _import_export, str(tmp_path / "hf"), str(tmp_path / "out"), str(tmp_path / "ckpt"))
    for got in results:
        assert (got - want).norm() <= 1e-5 * want.norm(), f"{(got - want).norm() / want.norm():.2e}"
    export_checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "cli_out", dtype="fp32", max_shard_bytes=40_000)
    for out in ("out", "cli_out"):
        back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / out, dtype=torch.float32,
                                                                        output_loading_info=True)
        assert type(back).__name__ == "MixtralForCausalLM"
        assert not info["missing_keys"] and not info["unexpected_keys"], (out, info)
        assert back.config.router_aux_loss_coef == pytest.approx(0.02) and back.config.output_router_logits
        with torch.no_grad():
            again = back(TOKENS).logits
        assert (again - want).norm() <= 1e-5 * want.norm(), out
        assert len(list((tmp_path / out).glob("*.safetensors"))) > 2  # sharded


def test_moe_flavours_mixtral_cannot_express_are_refused(tmp_path):
    from dtensor_parallel.models import llama3_args

    with torch.device("meta"):
        model = Llama(llama3_args("deepseek-v3-shaped"))
    with pytest.raises(ValueError, match=r"dense layers .* shared experts .* score_func='sigmoid'.* expert bias"):
        export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
