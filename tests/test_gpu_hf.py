"""transformers causal LMs through parallelize() on GPUs through NCCL, against the same model
on one device (``pytest -m gpu``; needs 2 CUDA devices): context parallelism with both ring
kernels, eager and compiled, and the compiled TP2+SP and FSDP2 layouts (issue 18); the tied
embeddings under TP and PP, and meta-device init with pretrained weights.

Run through the device tool: ``python -m pytest -m gpu tests/test_gpu_hf.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from .harness import run_distributed  # noqa: E402
from .hf_parity import hf_one_step_parity  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

LAYOUTS = {  # name: (mesh, plan); the plan's default compile="auto" compiles on CUDA
    "cp2_torch_eager": ({"cp": 2}, {"compile": False}),
    "cp2_triton_eager": ({"cp": 2}, {"kernels": {"attention": "triton"}, "compile": False}),
    "cp2_torch": ({"cp": 2}, {}),
    "cp2_triton": ({"cp": 2}, {"kernels": {"attention": "triton"}}),
    "cp2_triton_selective": ({"cp": 2}, {"kernels": {"attention": "triton"}, "recompute": "selective"}),
    "tp2_sp": ({"tp": 2}, {"sequence_parallel": True}),
    "fsdp2": ({"dp_shard": 2}, {}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gpu_hf_llama_one_step_parity(layout: str) -> None:
    mesh_kwargs, plan_kwargs = LAYOUTS[layout]
    # each rank asserts loss, every gradient and every parameter after AdamW against one device
    losses = run_distributed(2, hf_one_step_parity, "llama", mesh_kwargs, plan_kwargs, backend="nccl")
    assert len(set(losses)) == 1, losses


# tied embeddings (Llama 3.2 1B/3B): one vocab-parallel DTensor under TP, copies whose
# gradients are summed over the pp ranks (NCCL all-reduce) under PP, both copies on rank 0
# under ZBV
TIED = {
    "tp2_sp": ({"tp": 2}, {"sequence_parallel": True}, 2),
    "pp2": ({"pp": 2}, {"micro_batch_size": 1}, 2),
    "pp2_zbv": ({"pp": 2}, {"micro_batch_size": 1, "pipeline_schedule": "zbv"}, 4),
}


@pytest.mark.parametrize("layout", list(TIED))
def test_gpu_hf_tied_llama_one_step_parity(layout: str) -> None:
    mesh_kwargs, plan_kwargs, layers = TIED[layout]
    losses = run_distributed(2, hf_one_step_parity, "llama_tied", mesh_kwargs, plan_kwargs, layers=layers,
                             backend="nccl")
    assert len(set(losses)) == 1, losses


@pytest.mark.parametrize("arch,mesh_kwargs,plan_kwargs", [
    ("llama_tied", {"pp": 2}, {"micro_batch_size": 1}),  # the tied copy broadcast over NCCL
    ("qwen3", {"tp": 2}, {"sequence_parallel": True}),
])
def test_gpu_hf_meta_init_and_load_pretrained(arch: str, mesh_kwargs: dict, plan_kwargs: dict, tmp_path) -> None:
    from .hf_parity import make_hf_model
    from .test_hf_pretrained import init_matches_one_device, load_and_step

    make_hf_model(arch).save_pretrained(tmp_path)
    run_distributed(2, init_matches_one_device, arch, mesh_kwargs, plan_kwargs, backend="nccl")
    losses = run_distributed(2, load_and_step, arch, str(tmp_path), mesh_kwargs, plan_kwargs, backend="nccl")
    assert len(set(losses)) == 1, losses


# transformers MoE models: their sparse blocks as our MoE layers, experts over NCCL all-to-all
MOE = {
    "mixtral_ep2": ("mixtral", {"dp_shard": 2}, {"expert_parallel": 2}),
    "mixtral_ep2_triton": ("mixtral", {"dp_shard": 2}, {"expert_parallel": 2, "kernels": {"moe_dispatch": "triton"}}),
    "qwen2_moe_ep2_tp2_sp": ("qwen2_moe", {"tp": 2}, {"expert_parallel": 2, "sequence_parallel": True}),
}


@pytest.mark.parametrize("layout", list(MOE))
def test_gpu_hf_moe_one_step_parity(layout: str) -> None:
    arch, mesh_kwargs, plan_kwargs = MOE[layout]
    losses = run_distributed(2, hf_one_step_parity, arch, mesh_kwargs, plan_kwargs, backend="nccl")
    assert len(set(losses)) == 1, losses


def test_gpu_grouped_glu_bf16_matches_fp64() -> None:
    """The fused-layout experts through torch._grouped_mm (bf16 on CUDA: transformers' gate_up
    (E, 2F, dim) and down (E, dim, F) read transposed), output and gradients against the
    per-expert loop in fp64, within bf16 rounding."""
    from dtensor_parallel.models.moe import grouped_glu

    g = torch.Generator(device="cuda").manual_seed(0)
    e, dim, f = 4, 256, 128
    counts = torch.tensor([40, 0, 88, 128], device="cuda")
    x = torch.randn(int(counts.sum()), dim, device="cuda", generator=g)
    gate_up = torch.randn(e, 2 * f, dim, device="cuda", generator=g) / dim ** 0.5
    down = torch.randn(e, dim, f, device="cuda", generator=g) / f ** 0.5
    ins = [t.to(torch.bfloat16).requires_grad_() for t in (x, gate_up, down)]
    ref = [t.detach().double().requires_grad_() for t in ins]
    out = grouped_glu(*ins, counts)
    want = grouped_glu(*ref, counts)  # (fp64: the per-expert loop)
    dy = torch.randn_like(want)
    out.backward(dy.to(out.dtype))
    want.backward(dy)
    assert (out.double() - want).norm() <= 1e-2 * want.norm()
    for a, b in zip(ins, ref):
        assert (a.grad.double() - b.grad).norm() <= 1e-2 * b.grad.norm()
