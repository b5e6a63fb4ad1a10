"""The eager loss (``tensor_parallel/loss.py``): the chunked cross entropy equals
``F.cross_entropy`` on the fp32 upcast, loss and gradient, against an fp64 reference, with
ignored labels, a ragged last chunk, -inf logits (a padded vocabulary) and bf16 logits; it
keeps no fp32 copy of the logits for backward. The layouts' parity tests run it as every
eager model's loss, and TP's DTensor logits down the loss-parallel path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dtensor_parallel.tensor_parallel.loss import (IGNORE_INDEX, chunked_cross_entropy_sum, cross_entropy_sum,
                                                   eager_cross_entropy_sum, loss_context)

from .kernel_checks import check_against_torch

INTERPRET = not torch.cuda.is_available()  # (tests/conftest.py turns the interpreter on without a GPU)


def _case(dtype: torch.dtype, n: int = 37, v: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(1, n, v, generator=g) * 3).to(dtype)
    logits[0, 5, 40:] = float("-inf")  # a padded vocabulary's columns
    labels = torch.randint(0, 40, (1, n), generator=g)
    labels[0, [0, 7, 8]] = IGNORE_INDEX
    return logits, labels


def _loss_and_grad(fn, logits, labels):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, labels)
    (loss * 0.37).backward()  # a scale, as forward_backward divides by the token count
    return loss.detach(), x.grad


@pytest.mark.parametrize("kernel,chunk", [("torch", 1), ("torch", 8), ("torch", 37), ("torch", 100), ("triton", None)])
def test_fp32_equals_cross_entropy(kernel: str, chunk: int | None) -> None:
    """The torch chunks (ragged and whole) and the Triton kernels (interpreter on CPU)."""
    logits, labels = _case(torch.float32)
    want = _loss_and_grad(cross_entropy_sum, logits, labels)
    got = _loss_and_grad(lambda x, y: chunked_cross_entropy_sum(x, y, chunk_tokens=chunk, kernel=kernel),
                         logits, labels)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-7)
    assert got[1][0, [0, 7, 8]].abs().sum() == 0  # ignored tokens: no gradient


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_bf16_against_an_fp64_reference(kernel: str) -> None:
    logits, labels = _case(torch.bfloat16, n=64, v=300)
    ref = _loss_and_grad(lambda x, y: F.cross_entropy(x.double().flatten(0, 1), y.flatten(), reduction="sum",
                                                      ignore_index=IGNORE_INDEX), logits, labels)
    unchunked = _loss_and_grad(cross_entropy_sum, logits, labels)
    got = _loss_and_grad(lambda x, y: chunked_cross_entropy_sum(x, y, chunk_tokens=16, kernel=kernel), logits, labels)
    assert got[1].dtype == torch.bfloat16
    check_against_torch("loss", got[0], unchunked[0], ref[0], atol=1e-6)
    # Triton 3.6's interpreter casts fp32 to bf16 by truncation (measured: every value equals
    # the truncated one), the GPU to nearest; a truncation errs by up to one bf16 unit, 2^-8
    check_against_torch("grad", got[1], unchunked[1], ref[1], atol=4e-3 if kernel == "triton" and INTERPRET else 1e-3)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_saves_the_logits_and_no_fp32_copy(kernel: str) -> None:
    """What autograd keeps for backward: the bf16 logits themselves and O(tokens) floats."""
    n = 64  # (small: the interpreter runs the Triton form a program at a time)
    logits, labels = _case(torch.bfloat16, n=n, v=300)
    x = logits.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        chunked_cross_entropy_sum(x, labels, chunk_tokens=32, kernel=kernel)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16 and big[0].data_ptr() == x.data_ptr()
    assert sum(t.numel() * t.element_size() for t in saved if t.numel() < x.numel()) <= n * 16  # 14 B a token


def test_all_tokens_ignored() -> None:
    logits, labels = _case(torch.float32)
    labels[:] = IGNORE_INDEX
    loss, grad = _loss_and_grad(eager_cross_entropy_sum, logits, labels)
    assert loss.item() == 0.0 and grad.abs().sum() == 0


def _vocab_parallel(v: int) -> tuple[float, float, bool]:
    """Rank-local: TP2's vocabulary-sharded logits through eager_cross_entropy_sum against
    F.cross_entropy of the whole logits: (loss error, gradient error, took the chunked path)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import dtensor_parallel.tensor_parallel.loss as loss_mod

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    logits, labels = _case(torch.float32, n=29, v=v)
    want = _loss_and_grad(cross_entropy_sum, logits, labels)
    chunked = []
    real = loss_mod.chunked_cross_entropy_sum
    loss_mod.chunked_cross_entropy_sum = lambda *a, **k: chunked.append(1) or real(*a, **k)
    try:
        x = distribute_tensor(logits, mesh, [Shard(-1)]).detach().requires_grad_()
        with loss_context(True):  # as ParallelModel enters it under TP, forward and backward
            loss = eager_cross_entropy_sum(x, labels)
            (loss * 0.37).backward()
    finally:
        loss_mod.chunked_cross_entropy_sum = real
    grad = x.grad.full_tensor()
    return (abs(loss.item() - want[0].item()) / abs(want[0].item()),
            ((grad - want[1]).norm() / want[1].norm()).item(), bool(chunked))


@pytest.mark.parametrize("v,chunked", [(50, True), (51, False)])
def test_vocab_parallel_shards_on_two_ranks(v: int, chunked: bool) -> None:
    """Even shards take the chunked loss with the all-gathered statistics; uneven ones stay
    with DTensor's loss-parallel cross entropy. Both equal the whole logits' loss."""
    from .harness import run_distributed

    for loss_err, grad_err, took in run_distributed(2, _vocab_parallel, v):
        assert took == chunked
        assert loss_err < 1e-6 and grad_err < 1e-6, (loss_err, grad_err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_at_a_vocabulary_of_llama3() -> None:
    """bf16 logits of 1024 tokens of a 128256 vocabulary: the Triton kernels against the
    torch chunks and the fp64 reference, loss and gradient (the GPU rounds to nearest)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(1, 1024, 128256, device="cuda", generator=g) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 128256, (1, 1024), device="cuda", generator=g)
    labels[0, :7] = IGNORE_INDEX
    ref = _loss_and_grad(lambda x, y: F.cross_entropy(x.double().flatten(0, 1), y.flatten(), reduction="sum",
                                                      ignore_index=IGNORE_INDEX), logits, labels)
    torch_path = _loss_and_grad(lambda x, y: chunked_cross_entropy_sum(x, y, kernel="torch"), logits, labels)
    got = _loss_and_grad(lambda x, y: chunked_cross_entropy_sum(x, y, kernel="triton"), logits, labels)
    check_against_torch("loss", got[0], torch_path[0], ref[0], atol=1e-6)
    check_against_torch("grad", got[1], torch_path[1], ref[1], atol=1e-3)
