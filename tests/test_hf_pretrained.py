"""A transformers model built on the meta device, parallelized, initialized and loaded from a
``save_pretrained`` folder, each rank reading only its slices (issue 18, item 8)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import transformers  # the test extra: a missing install fails collection instead of skipping
from torch.distributed.tensor import DTensor

from dtensor_parallel import ParallelPlan, build_mesh, parallelize
from dtensor_parallel.checkpoint import safetensors_dir
from dtensor_parallel.checkpoint.hf_pretrained import init_hf_weights, load_pretrained

from .harness import run_distributed
from .hf_parity import hf_config, make_hf_model, reference_step
from .local_ranks import fake_world
from .parity import REL_TOL, assert_grads_match, make_batch, rel_err

PP = {"micro_batch_size": 1}
LAYOUTS = {  # name: (world, mesh, plan)
    "tp2_fsdp2": (4, {"tp": 2, "dp_shard": 2}, {}),  # FSDP x TP: strided shards
    "pp2_tp2_sp": (4, {"pp": 2, "tp": 2}, {"sequence_parallel": True, **PP}),
    "cp2_fsdp2": (4, {"cp": 2, "dp_shard": 2}, {}),
    # MoE: each rank reads its own experts' per-expert tensors (and under TP2 the full experts)
    "ep2_tp2_sp": (4, {"tp": 2, "dp_shard": 2}, {"expert_parallel": 2, "sequence_parallel": True}),
    "ep2_pp2": (4, {"pp": 2, "dp_shard": 2}, {"expert_parallel": 2, **PP}),
}


def _meta_model(arch: str):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config(arch))


def load_and_step(arch: str, folder: str, mesh_kwargs: dict, plan_kwargs: dict) -> float:
    """meta -> parallelize -> init -> load: every tensor equals the saved model's, each rank
    reads no more elements than it holds, and one training step equals the saved model's."""
    ref = make_hf_model(arch)  # the model the folder was saved from (same seed)
    pm = parallelize(_meta_model(arch), build_mesh(**mesh_kwargs), ParallelPlan(**plan_kwargs))
    pm.init_weights(seed=1)
    read = []
    real_open = safetensors_dir.safe_open

    class Counting:  # safe_open, recording the elements of every slice read
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_slice(self, name):
            sl = self.handle.get_slice(name)

            class Slice:
                def __getitem__(self, idx):
                    t = sl[idx]
                    read.append(t.numel())
                    return t
            return Slice()

    safetensors_dir.safe_open = Counting
    try:
        result = load_pretrained(pm, folder)
    finally:
        safetensors_dir.safe_open = real_open
    assert not result.missing, result.missing
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in pm.parameters())
    assert sum(read) == held, f"read {sum(read)} elements, holds {held}"
    got, want = pm.full_state_dict(), ref.state_dict()
    for name, t in want.items():
        assert torch.equal(got[name], t.cpu()), name
    x, y = make_batch(ref.config.vocab_size, 4, 16, seed=1)
    n_micro = pm._micro_batches(4 // pm.dims.dp) if pm.pipeline is not None else 1
    ref_loss = reference_step(ref, x, y, n_micro, pm.dims.dp)
    loss = pm.forward_backward(pm.shard_batch(x), pm.shard_batch(y))
    assert rel_err(loss, ref_loss) <= REL_TOL
    assert_grads_match(pm, ref)  # (tied copies summed: the sync holds the materialized parameters)
    return loss.item()


@pytest.mark.parametrize("arch,layout", [("llama_tied", "tp2_fsdp2"), ("llama_tied", "pp2_tp2_sp"),
                                         ("qwen3", "pp2_tp2_sp"), ("qwen2", "cp2_fsdp2"),
                                         ("mixtral", "ep2_tp2_sp"), ("qwen2_moe", "ep2_pp2")])
def test_load_pretrained_into_shards(arch: str, layout: str, tmp_path) -> None:
    make_hf_model(arch).save_pretrained(tmp_path)
    world, mesh_kwargs, plan_kwargs = LAYOUTS[layout]
    losses = run_distributed(world, load_and_step, arch, str(tmp_path), mesh_kwargs, plan_kwargs)
    assert len(set(losses)) == 1


def init_matches_one_device(arch: str, mesh_kwargs: dict, plan_kwargs: dict) -> None:
    """pm.init_weights gives the weights the same seed gives one device, buffers included
    (the rotary table transformers computes), tied copies equal."""
    pm = parallelize(_meta_model(arch), build_mesh(**mesh_kwargs), ParallelPlan(**plan_kwargs))
    before = [id(p) for p in pm.parameters()]
    pm.init_weights(seed=3)
    assert [id(p) for p in pm.parameters()] == before, "materializing replaced Parameter objects"
    one = _meta_model(arch)
    skip = {n for names in pm.tied_names for n in names[1:]}
    init_hf_weights([one], pm.device, seed=3, skip=skip)  # (the same device: the same random stream)
    got, want = pm.full_state_dict(), one.state_dict()
    assert list(got) == list(want)
    for name, t in want.items():
        assert torch.equal(got[name], t.cpu()), name
    real = transformers.AutoModelForCausalLM.from_config(hf_config(arch))  # transformers' own init
    for name, t in real.named_buffers():
        for m in pm.stage_modules:
            if name in dict(m.named_buffers()):
                assert torch.allclose(dict(m.named_buffers())[name].cpu(), t, rtol=1e-6, atol=0), name
    assert torch.equal(got["model.norm.weight"], torch.ones_like(got["model.norm.weight"]))
    linear = "mlp.experts.gate_up_proj" if "model.layers.0.mlp.experts.gate_up_proj" in got else "mlp.up_proj.weight"
    std = got[f"model.layers.0.{linear}"].std().item()
    assert abs(std - real.config.initializer_range) < 0.1 * real.config.initializer_range
    if "lm_head.weight" in skip:
        assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
        if pm.pipeline is None:  # still one parameter after materializing
            assert pm.module.lm_head.weight is pm.module.model.embed_tokens.weight
    if dist.get_rank() == 0:
        assert not any(t.is_meta for m in pm.stage_modules for t in list(m.parameters()) + list(m.buffers()))


@pytest.mark.parametrize("arch,layout", [("llama_tied", "pp2_tp2_sp"), ("llama_tied", "cp2_fsdp2"),
                                         ("qwen3", "tp2_fsdp2"), ("mixtral", "ep2_tp2_sp")])
def test_init_weights_is_layout_independent(arch: str, layout: str) -> None:
    world, mesh_kwargs, plan_kwargs = LAYOUTS[layout]
    run_distributed(world, init_matches_one_device, arch, mesh_kwargs, plan_kwargs)


def test_load_pretrained_refuses_another_model(tmp_path) -> None:
    fake_world(1)
    make_hf_model("llama").save_pretrained(tmp_path)
    model = make_hf_model("qwen3")
    with pytest.raises(ValueError, match=r"model_type='llama' but this model has 'qwen3'"):
        load_pretrained(model, tmp_path)
    wider = transformers.AutoModelForCausalLM.from_config(hf_config("llama", intermediate_size=128))
    with pytest.raises(ValueError, match=r"intermediate_size=96 but this model has 128"):
        load_pretrained(wider, tmp_path)
    on_meta = parallelize(_meta_model("llama"), build_mesh(), ParallelPlan())
    with pytest.raises(ValueError, match=r"call pm.init_weights\(\)"):
        load_pretrained(on_meta, tmp_path)


def test_load_pretrained_missing_and_extra_tensors(tmp_path) -> None:
    """A folder without a parameter: refused by default, kept at its init with strict=False;
    a folder with a tensor the model lacks: refused by default."""
    from safetensors.torch import load_file, save_file

    ref = make_hf_model("llama")
    ref.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.norm.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    model = copy.deepcopy(ref)
    with torch.no_grad():
        model.model.norm.weight.fill_(7.0)
    with pytest.raises(ValueError, match=r"lacks parameter\(s\) \['model.norm.weight'\]"):
        load_pretrained(model, tmp_path)
    result = load_pretrained(model, tmp_path, strict=False)
    assert result.missing == ["model.norm.weight"] and bool((model.model.norm.weight == 7.0).all())
    tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"holds tensors this model lacks: \['model.layers.9.mlp.up_proj.weight'\]"):
        load_pretrained(model, tmp_path)


def tied_step_save_load(root: str, save_layout: str, load_layout: str):
    """One AdamW step in ``save_layout``, saved; loaded into ``load_layout``: every parameter
    and optimizer moment equal, the tied copy's moments those of the one parameter."""
    import warnings

    from dtensor_parallel.checkpoint import load_checkpoint, optimizer_state_dict, save_checkpoint
    from dtensor_parallel.grads import gather_full

    layouts = {"pp2": ({"pp": 2}, {"micro_batch_size": 1}), "fsdp2": ({"dp_shard": 2}, {}),
               "zbv": ({"pp": 2}, {"micro_batch_size": 1, "pipeline_schedule": "zbv"})}

    def build(layout):
        mesh_kwargs, plan_kwargs = layouts[layout]
        pm = parallelize(make_hf_model("llama_tied", num_hidden_layers=4), build_mesh(**mesh_kwargs),
                         ParallelPlan(**plan_kwargs))
        return pm, torch.optim.AdamW(pm.parameters(), lr=1e-2)

    def full_optimizer(pm, opt):
        named = ((f"{n}.{k}", v) for n, st in optimizer_state_dict(pm, opt).items() for k, v in st.items())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return gather_full(named, pm._pp_group())

    pm, opt = build(save_layout)
    x, y = make_batch(128, 4, 16, seed=1)
    pm.forward_backward(pm.shard_batch(x), pm.shard_batch(y))
    opt.step()
    want_opt, want_model = full_optimizer(pm, opt), pm.full_state_dict()
    save_checkpoint(root, 1, pm, opt)
    pm2, opt2 = build(load_layout)
    load_checkpoint(root, pm2, opt2)
    got_opt, got_model = full_optimizer(pm2, opt2), pm2.full_state_dict()
    assert set(got_opt) == set(want_opt) and "model.embed_tokens.weight.exp_avg" in got_opt
    assert not any(k.startswith("lm_head.weight") for k in got_opt)  # one name for the tied weight
    for k, v in want_opt.items():
        assert torch.equal(got_opt[k], v), k
    for k, v in want_model.items():
        assert torch.equal(got_model[k], v), k
    for p, state in opt2.state.items():  # every copy has its own moments (no shared tensor)
        for q, other in opt2.state.items():
            if p is not q:
                assert all(state[k] is not other[k] for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("save_layout,load_layout", [("pp2", "fsdp2"), ("fsdp2", "pp2"), ("pp2", "zbv")])
def test_tied_optimizer_state_reshards_across_pipeline_layouts(save_layout: str, load_layout: str, tmp_path) -> None:
    run_distributed(2, tied_step_save_load, str(tmp_path / "ckpt"), save_layout, load_layout)
