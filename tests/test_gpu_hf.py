"""transformers causal LMs through parallelize() on GPUs through NCCL, against the same model
on one device (``pytest -m gpu``; needs 2 CUDA devices): context parallelism with both ring
kernels, eager and compiled, and the compiled TP2+SP and FSDP2 layouts (issue 18).

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

LAYOUTS = {  # name: (mesh, plan)
    "cp2_torch": ({"cp": 2}, {}),
    "cp2_triton": ({"cp": 2}, {"kernels": {"attention": "triton"}}),
    "cp2_torch_compile": ({"cp": 2}, {"compile": True}),
    "cp2_triton_compile": ({"cp": 2}, {"kernels": {"attention": "triton"}, "compile": True}),
    "cp2_triton_selective": ({"cp": 2}, {"kernels": {"attention": "triton"}, "recompute": "selective"}),
    "tp2_sp_compile": ({"tp": 2}, {"sequence_parallel": True, "compile": True}),
    "fsdp2_compile": ({"dp_shard": 2}, {"compile": True}),
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
