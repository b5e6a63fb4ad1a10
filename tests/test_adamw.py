"""AdamW with bf16 moments (``dtensor_parallel/adamw.py``, ``triton_kernels/adamw.py``):
fp32 moments are torch's AdamW; the kernel (interpreter on CPU) matches the torch path;
the stochastic rounding is unbiased, lands on a neighbour, depends on the value only and
keeps the second moment moving where rounding to nearest freezes it; checkpoints move
between the dtypes. The layouts' parity is in ``test_parity_gloo.py``."""

from __future__ import annotations

import pytest
import torch

from dtensor_parallel.adamw import AdamW, rounding_keys, round_to_bf16, state_dtype_of

from .kernel_checks import DEVICE


def _params(seed: int = 0, device: str = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 19), (300,), (5, 7, 3)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def _run(opt_cls, params, steps: int, seed: int = 1, **kwargs) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = opt_cls(params, lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(p.device)
        opt.step()
    return opt


def test_fp32_moments_are_torch_adamw() -> None:
    ours, ref = _params(), _params()
    opt = _run(AdamW, ours, 6, state_dtype="fp32", kernel="torch")
    ref_opt = _run(torch.optim.AdamW, ref, 6, foreach=False)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
    for p, q in zip(ours, ref):
        s, r = opt.state[p], ref_opt.state[q]
        assert set(s) == set(r) == {"step", "exp_avg", "exp_avg_sq"}
        assert s["step"].item() == r["step"].item() == 6.0
        torch.testing.assert_close(s["exp_avg_sq"], r["exp_avg_sq"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
def test_kernel_matches_the_torch_path(state_dtype: str) -> None:
    ours, ref = _params(device=DEVICE), _params(device=DEVICE)
    opt = _run(AdamW, ours, 4, state_dtype=state_dtype, kernel="triton")
    ref_opt = _run(AdamW, ref, 4, state_dtype=state_dtype, kernel="torch")
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = opt.state[p][key], ref_opt.state[q][key]
            assert a.dtype == b.dtype == state_dtype_of(state_dtype)
            if state_dtype == "bf16":  # the same fp32 values round the same way; an fp32 last-bit
                same = (a == b).float().mean().item()  # difference (FMA) may pick other bits
                assert same >= 0.99, f"{key}: only {same:.3f} of the moments are bit-equal"
                torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=0.0)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_kernel_refuses_what_it_cannot_update() -> None:
    p = torch.nn.Parameter(torch.randn(8, 8).t())  # not contiguous
    p.grad = torch.randn(8, 8).t()
    with pytest.raises(ValueError, match="not contiguous.*kernel='auto'"):
        AdamW([p], kernel="triton").step()
    AdamW([p], kernel="auto").step()  # the torch path takes it


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above x in magnitude (truncation, and one unit up)."""
    bits = x.view(torch.int32)
    down = (bits & ~0xFFFF).view(torch.float32)
    up = ((bits & ~0xFFFF) + 0x10000).view(torch.float32)
    return down, up


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g) * torch.logspace(-6, 3, 64)
    down, up = _neighbours(x)
    draws = torch.stack([round_to_bf16(x, rounding_keys(step)[1]).float() for step in range(1, 4001)])
    assert ((draws == down) | (draws == up)).all(), "a rounding landed off the two neighbours"
    frac = (x - down) / (up - down)  # the chance of rounding up
    got = (draws == up).float().mean(0)
    assert (got - frac).abs().max() < 0.04, f"rounded up {got} times vs the exact fraction {frac}"
    assert round_to_bf16(down, 123).float().equal(down), "a bf16 value must round to itself"


def test_rounding_keeps_nan_inf_and_sign() -> None:
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -1.5, 0.0, -0.0])
    r = round_to_bf16(x, 77).float()
    assert torch.isnan(r[0]) and r[1] == float("inf") and r[2] == -float("inf") and r[3] == -1.5
    assert r[4] == 0 and r[5] == 0 and torch.signbit(r[5])


def test_rounding_depends_on_the_value_not_its_position() -> None:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(4096, generator=torch.Generator().manual_seed(4))
    key = rounding_keys(9)[0]
    assert round_to_bf16(x[perm], key).equal(round_to_bf16(x, key)[perm])


def test_second_moment_keeps_decaying_where_nearest_rounding_freezes_it() -> None:
    """beta2 = 0.999 and a gradient that falls to zero: v must decay as 0.999^t. Rounding to
    nearest leaves v where it was (0.999 v is within half a bf16 unit of v)."""
    beta2, steps = 0.999, 2000
    v0 = torch.full((20000,), 1.0)
    exact = v0 * beta2 ** steps
    stochastic = v0.to(torch.bfloat16)
    nearest = v0.to(torch.bfloat16)
    for t in range(1, steps + 1):
        stochastic = round_to_bf16(stochastic.float() * beta2, rounding_keys(t)[1])
        nearest = (nearest.float() * beta2).to(torch.bfloat16)
    assert nearest.float().equal(v0), "rounding to nearest was expected to freeze v here"
    mean = stochastic.float().mean()
    assert abs(mean / exact[0] - 1) < 0.02, f"stochastic rounding: mean v {mean} vs {exact[0]}"


def test_state_dtype_choices() -> None:
    assert state_dtype_of("bf16") is torch.bfloat16 and state_dtype_of("fp32") is torch.float32
    with pytest.raises(ValueError, match="choose 'fp32'.*'bf16'"):
        state_dtype_of("fp8")


def test_moments_cast_when_loaded_from_the_other_dtype() -> None:
    """A torch AdamW state dict (fp32 moments) loads into the bf16 optimizer and back."""
    ref = _params()
    ref_opt = _run(torch.optim.AdamW, ref, 3, foreach=False)
    ours = _params()
    with torch.no_grad():
        for p, q in zip(ours, ref):
            p.copy_(q)
    opt = AdamW(ours, lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype="bf16")
    opt.load_state_dict(ref_opt.state_dict())
    for p in ours:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, q in zip(ours, ref):
        s = opt.state[p]
        assert s["exp_avg"].dtype == torch.bfloat16 and s["step"].item() == 4.0
        torch.testing.assert_close(s["exp_avg_sq"].float(), ref_opt.state[q]["exp_avg_sq"] * 0.95,
                                   rtol=2 ** -6, atol=0.0)  # the cast, then the step's rounding


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
def test_gpu_kernel_matches_the_torch_path_and_torch_adamw(state_dtype: str) -> None:
    """Sizes of a model (a 4M-element matrix and odd tails), 5 steps: the kernel against the
    torch path (the same update and rounding) and, for fp32 moments, torch's fused AdamW."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(2048, 2049), (4096,), (1, 7), (333, 65)]
    mk = lambda: [torch.nn.Parameter(torch.randn(s, device="cuda", generator=torch.Generator(  # noqa: E731
        device="cuda").manual_seed(i))) for i, s in enumerate(shapes)]
    ours, ref, fused = mk(), mk(), mk()
    kw = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opts = [AdamW(ours, state_dtype=state_dtype, kernel="triton", **kw),
            AdamW(ref, state_dtype=state_dtype, kernel="torch", **kw), torch.optim.AdamW(fused, fused=True, **kw)]
    for _ in range(5):
        grads = [torch.randn(s, device="cuda", generator=g) * 1e-2 for s in shapes]
        for params, opt in zip((ours, ref, fused), opts):
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()
    for p, q, f in zip(ours, ref, fused):
        if state_dtype == "fp32":
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(p, f, rtol=1e-5, atol=1e-6)
        else:  # a moment rounded the other way (an fp32 last-bit difference, measured 5 of 4.2M
            # elements) moves its weight by a bf16 unit of the update: lr * 2^-8 * O(1)
            torch.testing.assert_close(p, q, rtol=0.0, atol=5e-5)
            far = ((p - q).abs() > 1e-6).float().mean().item()  # (the last bits differ in 64%: FMA)
            assert far < 1e-4, f"{far:.2e} of the weights differ by more than their rounding"
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = opts[0].state[p][key], opts[1].state[q][key]
            assert a.dtype == state_dtype_of(state_dtype)
            if state_dtype == "fp32":  # (FMA contraction: last bits differ, 54% bit-equal measured)
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
            else:
                same = (a == b).float().mean().item()
                assert same >= 0.999, f"{key}: {same:.5f} of the moments bit-equal to the torch path"
