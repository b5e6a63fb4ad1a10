"""Hugging Face Llama safetensors: import into one device and into TP2 x FSDP2, FSDP4 (shards
that cut heads) and PP2 x TP2, logits equal to the same weights run by Hugging Face's
conventions (rotate_half RoPE on permuted q/k rows, re-implemented here), export back to
equal tensors; bad checkpoints rejected with the file or tensor named, nothing changed.

The test checkpoints are built here, as Hugging Face's ``convert_llama_weights_to_hf.py``
writes them: HF names, q/k rows permuted, several shards and ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from dtensor_parallel import ParallelPlan, build_mesh, parallelize
from dtensor_parallel.checkpoint import export_hf, hf_config, import_hf, model_args_from_hf
from dtensor_parallel.models import Llama

from .harness import run_distributed
from .parity import TINY_LLAMA

# head_dim 16, so FSDP4 cuts wk (2 kv heads x 16 rows) in the middle of a head
ARGS = replace(TINY_LLAMA, n_heads=4, n_kv_heads=2)


def _ours(seed: int = 0, args=ARGS) -> Llama:
    torch.manual_seed(seed)
    model = Llama(args)
    model.init_weights(buffer_device="cpu", seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _hf_state(model: Llama) -> dict[str, torch.Tensor]:
    """Hugging Face's converter, written out independently of the library."""
    a = model.args

    def permute(w, n_heads, dim1, dim2):  # convert_llama_weights_to_hf.py
        return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)

    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(a.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[q + "self_attn.q_proj.weight"] = permute(sd[p + "attention.wq.weight"], a.n_heads, a.dim, a.dim)
        out[q + "self_attn.k_proj.weight"] = permute(sd[p + "attention.wk.weight"], a.n_kv_heads,
                                                     a.n_kv_heads * a.head_dim, a.dim)
        out[q + "self_attn.v_proj.weight"] = sd[p + "attention.wv.weight"]
        out[q + "self_attn.o_proj.weight"] = sd[p + "attention.wo.weight"]
        out[q + "mlp.gate_proj.weight"] = sd[p + "feed_forward.w1.weight"]
        out[q + "mlp.up_proj.weight"] = sd[p + "feed_forward.w3.weight"]
        out[q + "mlp.down_proj.weight"] = sd[p + "feed_forward.w2.weight"]
        out[q + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def write_hf(path: Path, sd: dict[str, torch.Tensor], args, n_shards: int = 3,
             dtype: torch.dtype = torch.float32) -> Path:
    path.mkdir(parents=True)
    names = list(sd)
    files = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map = {n: files[i * n_shards // len(names)] for i, n in enumerate(names)}
    for f in files:
        save_file({n: sd[n].to(dtype) for n in names if weight_map[n] == f}, str(path / f), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(hf_config(args, dtype)))
    return path


def hf_logits(sd: dict[str, torch.Tensor], config: dict, tokens: torch.Tensor) -> torch.Tensor:
    """LlamaForCausalLM's forward, by its conventions: rotate_half RoPE, repeat_kv GQA."""
    d, h, kvh = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd, eps, s = d // h, config["rms_norm_eps"], tokens.shape[1]
    sd = {k: v.float() for k, v in sd.items()}

    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    inv_freq = 1.0 / (config["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(s, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().float(), emb.sin().float()  # (s, hd)

    def rope(x):  # x: (b, heads, s, hd)
        rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)  # rotate_half
        return x * cos + rot * sin

    x = sd["model.embed_tokens.weight"][tokens]
    b = x.shape[0]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = norm(x, sd[p + "input_layernorm.weight"])
        q = (y @ sd[p + "self_attn.q_proj.weight"].T).view(b, s, h, hd).transpose(1, 2)
        k = (y @ sd[p + "self_attn.k_proj.weight"].T).view(b, s, kvh, hd).transpose(1, 2)
        v = (y @ sd[p + "self_attn.v_proj.weight"].T).view(b, s, kvh, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = (t.repeat_interleave(h // kvh, dim=1) for t in (k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + att @ sd[p + "self_attn.o_proj.weight"].T
        y = norm(x, sd[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(y @ sd[p + "mlp.gate_proj.weight"].T) * (y @ sd[p + "mlp.up_proj.weight"].T)) @ \
            sd[p + "mlp.down_proj.weight"].T
    return norm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def _tokens() -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _read_hf(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for f in sorted(set(index.values())):
        part = load_file(str(path / f))
        assert set(part) == {n for n, g in index.items() if g == f}
        out.update(part)
    return out


# ---- one device -----------------------------------------------------------------------------
def test_hf_round_trip_one_device(tmp_path):
    ref = _ours()
    src = _hf_state(ref)
    path = write_hf(tmp_path / "hf", src, ARGS)
    model = Llama(model_args_from_hf(path))  # the model that config.json describes
    model.init_weights(buffer_device="cpu", seed=5)
    import_hf(model, path)
    _assert_same_tensors(model.state_dict(), ref.state_dict())
    tokens = _tokens()
    ours = model(tokens)
    assert torch.equal(ours, ref(tokens))
    theirs = hf_logits(src, json.loads((path / "config.json").read_text()), tokens)
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max(), "q/k rotary permutation is wrong"
    out = export_hf(model, tmp_path / "out", max_shard_bytes=40_000)
    _assert_same_tensors(_read_hf(out), src)
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    # bf16 on disk (as Meta's releases): bf16 -> fp32 parameters -> bf16 is exact
    bf = write_hf(tmp_path / "bf16", src, ARGS, n_shards=2, dtype=torch.bfloat16)
    import_hf(model, bf)
    out16 = export_hf(model, tmp_path / "out16", dtype=torch.bfloat16, max_shard_bytes=1 << 30)
    assert sorted(p.name for p in out16.iterdir()) == ["config.json", "model.safetensors"]
    _assert_same_tensors(load_file(str(out16 / "model.safetensors")), {k: v.bfloat16() for k, v in src.items()})
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        export_hf(model, out16)


# ---- distributed layouts --------------------------------------------------------------------
LAYOUTS = {
    "tp2_fsdp2": ({"tp": 2, "dp_shard": 2}, {"sequence_parallel": True}),
    "fsdp4": ({"dp_shard": 4}, {}),  # wk's 32 rows in boxes of 8: half a head each
    "pp2_tp2": ({"pp": 2, "tp": 2}, {"micro_batch_size": 1}),
}


def _hf_distributed(path: str, out_root: str, layout: str):
    mesh_kwargs, plan_kwargs = LAYOUTS[layout]
    with torch.device("meta"):
        model = Llama(ARGS)
    pm = parallelize(model, build_mesh(**mesh_kwargs), ParallelPlan(**plan_kwargs))
    pm.init_weights(seed=11)
    import_hf(pm, path)
    full = pm.full_state_dict()
    logits = None
    if pm.pipeline is None:
        with torch.no_grad():
            logits = pm(_tokens())
        logits = (logits.full_tensor() if isinstance(logits, DTensor) else logits).detach()
    export_hf(pm, Path(out_root) / layout, max_shard_bytes=30_000)
    return full, logits


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_import_export_any_layout(tmp_path, layout):
    ref = _ours()
    src = _hf_state(ref)
    path = write_hf(tmp_path / "hf", src, ARGS)
    results = run_distributed(4, _hf_distributed, str(path), str(tmp_path / "out"), layout)
    _assert_same_tensors(results[0][0], ref.state_dict())
    if results[0][1] is not None:
        want = ref(_tokens())
        theirs = hf_logits(src, json.loads((path / "config.json").read_text()), _tokens())
        for _, logits in results:
            assert (logits - want).abs().max() <= 1e-5 * want.abs().max()
            assert (logits - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    out = tmp_path / "out" / layout
    assert len(list(out.glob("*.safetensors"))) > 2  # sharded (each pp stage writes its own files)
    _assert_same_tensors(_read_hf(out), src)


# ---- bad input ------------------------------------------------------------------------------
def _rejects(model: Llama, path: Path, match: str) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        import_hf(model, path)
    _assert_same_tensors(model.state_dict(), before)  # nothing written


def test_hf_bad_checkpoints(tmp_path):
    src = _hf_state(_ours())
    model = _ours(seed=1)
    wide = replace(ARGS, dim=96)
    path = write_hf(tmp_path / "wide", _hf_state(_ours(args=wide)), wide)
    _rejects(model, path, r"config.json: hidden_size=96 but this model has 64: the checkpoint is of another model")
    (path / "config.json").unlink()  # without a config, the shapes say it
    _rejects(model, path, r"tensor 'model.embed_tokens.weight' has shape \[128, 96\] in .*model-00001-of-00003"
                          r".safetensors but our 'tok_embeddings.weight' has \[128, 64\]")
    deep = replace(ARGS, n_layers=5)
    _rejects(model, write_hf(tmp_path / "deep", _hf_state(_ours(args=deep)), deep), "num_hidden_layers=5")
    path = write_hf(tmp_path / "missing", src, ARGS)
    (path / "model-00002-of-00003.safetensors").unlink()
    _rejects(model, path, r"safetensors shard .*model-00002-of-00003.safetensors is missing")
    path = write_hf(tmp_path / "truncated", src, ARGS)
    f = path / "model-00003-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _rejects(model, path, r"model-00003-of-00003.safetensors is truncated: \d+ bytes, but tensor "
                          r"'model.layers.3.[a-z_.]+' is stored up to byte")
    path = write_hf(tmp_path / "absent", {k: v for k, v in src.items() if "layers.2.mlp.up_proj" not in k}, ARGS)
    _rejects(model, path, r"tensor 'model.layers.2.mlp.up_proj.weight' \(our 'layers.2.feed_forward.w3.weight'\) "
                          r"is not in the Hugging Face checkpoint")


# ---- configs saved by transformers itself: both RoPE formats, every RoPE type we compute ------
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    # Llama 3.1's scaling with a short original context, so that it moves most frequencies
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
}


def _transformers_llama(tmp_path: Path, rope: dict, legacy: bool):
    """A LlamaForCausalLM saved by transformers; ``legacy``: its config.json rewritten in
    transformers 4's format (top-level rope_theta, rope_scaling with the old 'type' key)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_parameters=dict(rope), tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_theta"] == rope["rope_theta"]  # transformers 5 writes this format
    if legacy:
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        kind = params.pop("rope_type")
        cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize("legacy", [False, True], ids=["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_import_hf_rope_matches_transformers(tmp_path, rope: str, legacy: bool):
    """Logits of our Llama built from the folder's config and imported equal transformers' on
    the same folder, fp32; the legacy config gives transformers itself the same logits."""
    import transformers

    hf = _transformers_llama(tmp_path, ROPES[rope], legacy)
    args = model_args_from_hf(tmp_path)
    assert args.rope_theta == ROPES[rope]["rope_theta"]
    assert args.rope_scaling_factor == ROPES[rope].get("factor")
    model = Llama(args)
    model.init_weights(buffer_device="cpu", seed=1)
    import_hf(model, tmp_path)
    tokens = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(tokens).logits
        got = model(tokens)
        assert (got - want).norm() <= 1e-5 * want.norm(), f"{(got - want).norm() / want.norm():.2e}"
        if legacy:  # transformers reads the old format as it wrote the new one
            again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)(tokens).logits
            assert torch.allclose(again, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("change,match", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                          "original_max_position_embeddings": 16}}, r"rope_parameters.rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, r"rope_type='dynamic'"),
    ({"rope_parameters": {"rope_type": "default"}}, r"rope_parameters has no rope_theta"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 0.5}},
     r"rope_parameters.partial_rotary_factor=0.5 is not part of 'linear' RoPE"),
    ({"rope_parameters": None, "rope_scaling": {"type": "llama3", "factor": 8.0}}, r"lacks '\w+_freq_factor'|lacks"),
    ({"attention_bias": True}, r"attention_bias=True, but our Llama has attention_bias=False"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
])
def test_import_hf_refuses_configs_it_would_compute_differently(tmp_path, change: dict, match: str):
    _transformers_llama(tmp_path, ROPES["default"], legacy=False)
    model = Llama(model_args_from_hf(tmp_path))  # built before the config changes
    model.init_weights(buffer_device="cpu", seed=1)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        model_args_from_hf(tmp_path)
    with pytest.raises(ValueError, match=match):  # and an import into the model built before
        import_hf(model, tmp_path)


@pytest.mark.parametrize("legacy", [False, True], ids=["rope_parameters", "rope_scaling"])
def test_import_hf_refuses_another_rope_base(tmp_path, legacy: bool):
    """A model built with theta 10000 does not take a checkpoint of theta 500000 (either format)."""
    _transformers_llama(tmp_path, ROPES["default"], legacy=legacy)
    model = Llama(model_args_from_hf(tmp_path, rope_theta=10000.0))
    model.init_weights(buffer_device="cpu", seed=1)
    with pytest.raises(ValueError, match=r"RoPE rope_theta=500000.0 but this model has 10000.0"):
        import_hf(model, tmp_path)
