"""The fused linear + cross entropy (``fused_cross_entropy.py``) and ``plan.fused_loss``
(``loss_head.py``): the op against ``F.cross_entropy`` on materialized logits; the fused
model step against the unfused single-device one (loss and every gradient) on one device
and on gloo layouts; no (tokens, vocab) tensor ever allocated; refusals before any
collective."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils._python_dispatch import TorchDispatchMode

from dtensor_parallel import ParallelPlan, build_mesh, parallelize
from dtensor_parallel.fused_cross_entropy import linear_cross_entropy_sum, linear_cross_entropy_sum_ref
from dtensor_parallel.loss_head import LossHead

from .harness import run_distributed
from .local_ranks import fake_world
from .hf_parity import hf_one_step_parity, make_hf_model
from .parity import REL_TOL, assert_grads_match, make_batch, make_model, one_step_parity, reference_step, rel_err


def _problem(n: int, d: int, v: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.2] = -100
    return h, w, y


def _loss_and_grads(fn, h, w, y, scale: float = 1.7):
    loss = fn(h, w, y)
    gh, gw = torch.autograd.grad(loss * scale, (h, w))  # a grad_output other than 1
    return loss.detach(), gh, gw


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 5, 37, 64, None])
def test_op_matches_cross_entropy(dtype: torch.dtype, tol: float, chunk: int | None) -> None:
    """37 tokens (not a multiple of 5 or 64), a fifth of them ignored."""
    h, w, y = _problem(37, 24, 50, dtype)
    want = _loss_and_grads(linear_cross_entropy_sum_ref, h, w, y)
    got = _loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk_tokens=chunk), h, w, y)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, want):
        assert a.dtype == b.dtype, name
        assert rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.2e}"


def test_op_all_ignored_and_unused_grads() -> None:
    h, w, y = _problem(9, 8, 11, torch.float32)
    y[:] = -100
    loss, gh, gw = _loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk_tokens=4), h, w, y)
    assert loss.item() == 0.0 and gh.abs().max() == 0 and gw.abs().max() == 0
    h2 = h.detach()  # no gradient wanted for the hidden states: only the weight's is made
    (gw2,) = torch.autograd.grad(linear_cross_entropy_sum(h2, w, torch.zeros(9, dtype=torch.long)), (w,))
    assert gw2.shape == w.shape


def test_op_bf16_within_bf16_rounding() -> None:
    """bf16 inputs: the fused op is as close to the fp64 truth as the unfused bf16 path is
    (err <= 2 err(unfused bf16) + atol), with gradients in the inputs' dtype."""
    h, w, y = _problem(67, 32, 300, torch.float64, seed=3)
    truth = _loss_and_grads(linear_cross_entropy_sum_ref, h, w, y)
    hb, wb = (t.detach().to(torch.bfloat16).requires_grad_() for t in (h, w))
    unfused = _loss_and_grads(linear_cross_entropy_sum_ref, hb, wb, y)
    fused = _loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk_tokens=16), hb, wb, y)
    assert fused[1].dtype == fused[2].dtype == torch.bfloat16
    for name, f, u, t in zip(("loss", "grad hidden", "grad weight"), fused, unfused, truth):
        assert rel_err(f, t) <= 2 * rel_err(u, t) + 1e-3, f"{name}: {rel_err(f, t):.2e} vs {rel_err(u, t):.2e}"


def test_op_under_autocast_computes_like_the_unfused_head() -> None:
    h, w, y = _problem(20, 16, 40, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _loss_and_grads(lambda a, b, c: linear_cross_entropy_sum_ref(a.bfloat16(), b.bfloat16(), c), h, w, y)
        got = _loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk_tokens=6), h, w, y)
    assert got[1].dtype == got[2].dtype == torch.float32  # back through the casts to the fp32 leaves
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, want):
        assert rel_err(a, b) <= 1e-2, f"{name}: {rel_err(a, b):.2e}"


class _LargestWithVocab(TorchDispatchMode):
    """The largest number of elements of any tensor an op returns that has a dimension of
    the vocabulary's size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and self.vocab in t.shape:
                self.largest = max(self.largest, t.numel())
        return out


def test_op_never_materializes_the_logits() -> None:
    n, d, v, chunk = 64, 16, 96, 8
    h, w, y = _problem(n, d, v, torch.float32)
    with _LargestWithVocab(v) as fused:
        _loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk_tokens=chunk), h, w, y)
    with _LargestWithVocab(v) as unfused:  # the check sees the logits where they are made
        _loss_and_grads(linear_cross_entropy_sum_ref, h, w, y)
    assert unfused.largest == n * v
    assert fused.largest == max(chunk * v, v * d) < n * v  # one chunk's logits, the weight's gradient


def test_model_step_never_materializes_the_logits() -> None:
    """Our Llama's whole forward_backward with the fused loss: no (tokens, vocab) tensor
    (256 tokens > dim 64, so the embedding's (vocab, dim) gradient is smaller)."""
    fake_world(1)
    x, y = make_batch(128, 8, 32)
    for fused, bound in ((True, lambda m: m < 256 * 128), (False, lambda m: m == 256 * 128)):
        pm = parallelize(make_model("llama"), build_mesh(), ParallelPlan(fused_loss=fused,
                                                                         fused_loss_chunk_tokens=32))
        with _LargestWithVocab(128) as seen:
            pm.forward_backward(x, y)
        assert bound(seen.largest), f"fused_loss={fused}: largest vocab tensor {seen.largest}"


@pytest.mark.parametrize("chunk", [7, None])
def test_llama_one_device(chunk: int | None) -> None:
    fake_world(1)
    ref = make_model("llama")
    pm = parallelize(copy.deepcopy(ref), build_mesh(), ParallelPlan(fused_loss=True, fused_loss_chunk_tokens=chunk))
    assert isinstance(pm.module.output, LossHead) and pm.loss_head is pm.module.output
    x, y = make_batch(128, 4, 16)
    want = reference_step(ref, x, y)
    assert rel_err(pm.forward_backward(x, y), want) <= REL_TOL
    assert_grads_match(pm, ref)
    assert rel_err(pm(x), ref(x)) <= REL_TOL  # inference: real logits
    assert list(pm.full_state_dict()) == list(ref.state_dict())  # the same names


def test_transformers_tied_one_device() -> None:
    """LlamaForCausalLM with tie_word_embeddings: the one weight gets both uses' gradients."""
    fake_world(1)
    assert hf_one_step_parity("llama_tied", {}, {"fused_loss": True, "fused_loss_chunk_tokens": 9}) > 0


def _distributed_case(kind: str, mesh_kwargs: dict, plan_kwargs: dict) -> float:
    plan_kwargs = {"fused_loss": True, "fused_loss_chunk_tokens": 5, **plan_kwargs}  # True: fused or raise
    if kind == "llama":
        return one_step_parity("llama", mesh_kwargs, plan_kwargs, batch=4)
    return hf_one_step_parity("llama_tied", mesh_kwargs, plan_kwargs)


# world 2: (kind, build_mesh kwargs, plan kwargs). One layout per distinct path of the loss:
# sharded parameters, sequence shards, the vocab-parallel op with its hidden gradient reduced
# by all-reduce (tp2) and by reduce-scatter (SP), the pipeline's last stage under the schedule
# that splits the backward (zbv), and tied embeddings. (DDP and 1F1B add no path of their own;
# dropped to keep CI under its time.)
LAYOUTS = {
    "llama-fsdp2": ("llama", {"dp_shard": 2}, {}),
    "llama-cp2": ("llama", {"cp": 2}, {}),
    "llama-tp2": ("llama", {"tp": 2}, {}),
    "llama-pp2_zbv": ("llama", {"pp": 2}, {"micro_batch_size": 1, "pipeline_schedule": "zbv"}),
    "hf_tied-tp2_sp": ("hf", {"tp": 2}, {"sequence_parallel": True}),
    "hf_tied-fsdp2": ("hf", {"dp_shard": 2}, {}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_loss_parity(layout: str) -> None:
    """The fused step equals the unfused single-device step: loss, every gradient, the norm."""
    kind, mesh_kwargs, plan_kwargs = LAYOUTS[layout]
    losses = run_distributed(2, _distributed_case, kind, mesh_kwargs, plan_kwargs)
    assert len(set(losses)) == 1, f"ranks disagree on the global loss: {losses}"


def _op_vocab_parallel() -> None:
    """The op on vocabulary shards (rank r: rows [r V/2, (r+1) V/2)), the hidden gradient
    summed over ranks, against the unfused op on the whole weight."""
    rank, world = dist.get_rank(), dist.get_world_size()
    h, w, y = _problem(23, 12, 40, torch.float64)
    want = _loss_and_grads(linear_cross_entropy_sum_ref, h, w, y)
    rows = 40 // world
    w_local = w.detach()[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    loss, gh, gw = _loss_and_grads(lambda a, b, c: linear_cross_entropy_sum(
        a, b, c, chunk_tokens=4, vocab_group=dist.group.WORLD, vocab_start=rank * rows), h, w_local, y)
    dist.all_reduce(gh)
    assert rel_err(loss, want[0]) <= 1e-12 and rel_err(gh, want[1]) <= 1e-12
    assert rel_err(gw, want[2][rank * rows:(rank + 1) * rows]) <= 1e-12


def test_op_vocab_parallel() -> None:
    run_distributed(2, _op_vocab_parallel)


# ---- refusals: ValueErrors from parallelize, before any collective ---------------------

class _BiasHead(nn.Module):
    """A user's model whose head has a bias."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8)])
        self.head = nn.Linear(8, 32, bias=True)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


class _ScaledLogits(_BiasHead):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 32, bias=False)

    def forward(self, x):
        return super().forward(x) * 0.5


def _raises_before_collectives(model, mesh, plan, match: str) -> None:
    with CommDebugMode() as comm, pytest.raises(ValueError, match=match):
        parallelize(model, mesh, plan)
    assert comm.get_total_counts() == 0
    assert all(not hasattr(p, "device_mesh") for p in model.parameters()), "model was modified"


def test_refusals() -> None:
    fake_world(2)  # under tp=2: refused before any collective
    rules = {"embed": "embedding", "blocks.*": "colwise", "head": "head"}
    plan = dict(blocks="blocks.*", rules=rules, num_heads=2, num_kv_heads=2)
    _raises_before_collectives(_BiasHead(), build_mesh(tp=2), ParallelPlan(fused_loss=True, **plan),
                               r"fused_loss=True: the output head 'head' has a bias")
    _raises_before_collectives(_ScaledLogits(), build_mesh(tp=2),
                               ParallelPlan(fused_loss=True, **{**plan, "rules": {**rules, "head": "colwise"}}),
                               r"no output head is known for _ScaledLogits: give it the rule .head.")
    fake_world(1)
    plan = dict(blocks="blocks.*", rules={"head": "head"})
    mesh = build_mesh()
    pm = parallelize(_BiasHead(), mesh, ParallelPlan(fused_loss="auto", **plan))  # auto: unfused
    assert pm.loss_head is None and type(pm.module.head) is nn.Linear
    with pytest.raises(ValueError, match=r"no output head is known for _BiasHead: give it the rule 'head'"):
        parallelize(_BiasHead(), mesh, ParallelPlan(fused_loss=True, blocks="blocks.*"))
    granite = make_hf_model("granite")  # logits_scaling = 4
    with pytest.raises(ValueError, match=r"config.logits_scaling=4.0 transforms the logits"):
        parallelize(granite, mesh, ParallelPlan(fused_loss=True, blocks="model.layers.*"))
    with pytest.raises(ValueError, match=r"fused_loss='yes': choose True, False or 'auto'"):
        ParallelPlan(fused_loss="yes")
    with pytest.raises(ValueError, match=r"fused_loss_chunk_tokens=0 must be a positive int"):
        ParallelPlan(fused_loss_chunk_tokens=0)


def test_transformed_logits_are_refused_at_the_first_step() -> None:
    """A forward that changes the head's output (here a scale) cannot be seen from the
    config: the first forward_backward refuses it (the same on every rank)."""
    fake_world(1)
    pm = parallelize(_ScaledLogits(), build_mesh(), ParallelPlan(fused_loss=True, blocks="blocks.*",
                                                                  rules={"head": "head"}))
    x = torch.randint(0, 32, (2, 8))
    with pytest.raises(ValueError, match=r"transforms the output head's result"):
        pm.forward_backward(x, x)
    assert pm(x).shape == (2, 8, 32)


# ---- the memory estimator follows the fused path ----------------------------------------

def test_memory_estimator_counts_a_chunk_not_the_logits() -> None:
    """8B shape, 8K tokens, FSDP2 bf16: the loss peak is one chunk of fp32 logits (and their
    bf16 matmul output) plus the fp32 sum of the head's weight gradient, not the bf16 logits'
    gradient of the eager chunked loss; the saved logits become 4 bytes a
    token instead of the bf16 logits."""
    from dtensor_parallel.mesh import ParallelDims
    from dtensor_parallel.models.llama import llama3_args
    from dtensor_parallel.planning.memory import activation_bytes, estimate_memory

    args, v, tokens = llama3_args("8B"), 128256, 8192
    dims = ParallelDims(dp_shard=2, world_size=2)
    plan = ParallelPlan(mixed_precision="bf16", compile=False)  # the eager loss (compiled: test_memory.py)
    fused_plan = ParallelPlan(mixed_precision="bf16", fused_loss="auto", fused_loss_chunk_tokens=512)
    unfused = activation_bytes(args, dims, plan, [0], tokens, 1, True)
    fused = activation_bytes(args, dims, fused_plan, [0], tokens, 1, True)
    assert unfused.loss_peak == 2 * v * tokens and unfused.logits_saved == 2 * v * tokens
    assert fused.loss_peak == 512 * v * (4 + 2) + 4 * v * args.dim and fused.logits_saved == 4 * tokens
    assert unfused.head - fused.head == 2 * v * tokens - 4 * tokens
    default = activation_bytes(args, dims, ParallelPlan(fused_loss=True), [0], tokens, 1, True)
    assert default.loss_peak == (2**28 // (4 * v)) * v * 4  # fp32: a 256 MiB chunk, no accumulator
    tp2 = activation_bytes(args, ParallelDims(tp=2, world_size=2), fused_plan, [0], tokens, 1, True)
    assert tp2.loss_peak == fused.loss_peak / 2  # the vocabulary shard's chunk and gradient
    est = {name: estimate_memory(args, dims, p, seq_len=tokens, micro_batch_size=1, n_micro=1)
           for name, p in (("unfused", plan), ("fused", fused_plan))}
    saved = est["unfused"].peak_bytes - est["fused"].peak_bytes
    # 0.17 GiB: the eager loss keeps no fp32 logits either now; the fused loss's peak moves to
    # the head's reduce-scatter
    assert est["fused"].logits_bytes == fused.loss_peak and 0.1 * 2**30 < saved < 0.5 * 2**30, saved / 2**30
