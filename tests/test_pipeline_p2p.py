"""Copy-engine pipeline P2P (``pipeline/copy_engine_p2p.py``, ``pipeline/p2p_routing.py``): the
choice and its errors before any collective, and, on gloo ranks through the CPU emulation (the
protocol's slots, sequence numbers and acks in shared memory), every schedule bit-exact to the
NCCL/gloo path, slot reuse within a step, and the host-side error where a schedule would hang."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode

from dtensor_parallel import ParallelPlan, build_mesh, parallelize
from dtensor_parallel.models import Llama
from dtensor_parallel.pipeline.copy_engine_p2p import default_slots, is_neighbour, ring_index
from dtensor_parallel.pipeline.p2p_routing import choose_pipeline_p2p

from .harness import run_distributed
from .local_ranks import fake_world
from .parity import TINY_LLAMA, make_batch, make_model, plan_for


def test_plan_field_is_checked() -> None:
    with pytest.raises(ValueError, match="pipeline_p2p='ce'"):
        ParallelPlan(pipeline_p2p="ce")
    assert ParallelPlan().pipeline_p2p == "auto"


def test_copy_engine_off_gpu_fails_before_any_collective(monkeypatch) -> None:
    """pipeline_p2p='copy_engine' on a CPU mesh (outside the tests' emulation) names the fix."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fake_world(2)
    mesh = build_mesh(pp=2)
    with torch.device("meta"):
        model = Llama(TINY_LLAMA)
    with CommDebugMode() as comm, pytest.raises(ValueError, match=r"pipeline_p2p='copy_engine' cannot run: .*"
                                                                  r"pipeline_p2p='auto'"):
        parallelize(model, mesh, ParallelPlan(pipeline_p2p="copy_engine"))
    assert comm.get_total_counts() == 0


def test_choice(monkeypatch) -> None:
    assert choose_pipeline_p2p("nccl", [0, 1], "cuda") == "nccl"
    assert choose_pipeline_p2p("copy_engine", [0], "cuda") == "nccl"  # no pp
    assert choose_pipeline_p2p("auto", [0, 1], "cpu") == "nccl"
    assert choose_pipeline_p2p("auto", [0, 1], "cpu", "interleaved_1f1b") == "nccl"  # no copy engine on a CPU
    from dtensor_parallel.tensor_parallel import sp_reduce_scatter

    with monkeypatch.context() as m:  # GPUs of one host with symmetric memory: "auto" follows the schedule
        m.setattr(sp_reduce_scatter, "symm_mem_unavailable", lambda *a, **kw: None)
        m.setenv("LOCAL_WORLD_SIZE", "2")
        assert [choose_pipeline_p2p("auto", [0, 1], "cuda", s) for s in ("interleaved_1f1b", "zbv", "zero_bubble",
                                                                           "1f1b", "gpipe")] == \
            ["copy_engine"] * 3 + ["nccl"] * 2
        assert choose_pipeline_p2p("copy_engine", [0, 1], "cuda", "1f1b") == "copy_engine"  # asked for: as asked
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_pipeline_p2p("copy_engine", [0, 1], "cpu") == "emulated"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs CUDA GPUs"):
        choose_pipeline_p2p("copy_engine", [0, 1], "cpu")


def test_pp_ranks_on_two_hosts_are_refused(monkeypatch) -> None:
    from dtensor_parallel.pipeline.p2p_routing import pp_hosts_reason

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert pp_hosts_reason([0, 1, 2, 3]) is None
    assert "2 hosts" in pp_hosts_reason([3, 11])


def test_rings_and_slots() -> None:
    # a rank's rings: one per (neighbour, kind), all distinct, within the workspace's count
    assert [is_neighbour(0, b, 4) for b in range(4)] == [False, True, False, True]
    for world in (2, 4, 8):
        for a in range(world):
            rings = [ring_index(a, b, k, world) for b in range(world) if is_neighbour(a, b, world) for k in (0, 1)]
            assert sorted(rings) == list(range(2 if world == 2 else 4)), (world, a, rings)
    assert default_slots("interleaved_1f1b", 2, 2, 8) == 3
    assert default_slots("zbv", 4, 2, 16) == 7
    assert default_slots("gpipe", 2, 1, 8) == 8
    assert default_slots("1f1b", 2, 1, 2) == 2


# ---- gloo ranks, the emulation ----------------------------------------------------------


def p2p_matches_nccl(kind: str, mesh_kwargs: dict, plan_kwargs: dict, steps: int = 2, slots: int | None = None,
                     batch: int = 8, seq: int = 16) -> dict:
    """The same model through torch's P2P (NCCL, or gloo on CPU) and through the copy-engine
    transport (the emulation on CPU): every step's loss and every gradient bit-identical; the
    transport carried every message."""
    torch._dynamo.reset()
    ref = make_model(kind)
    pms = []
    for p2p in ("nccl", "copy_engine"):
        pm = parallelize(copy.deepcopy(ref), build_mesh(**mesh_kwargs), plan_for(kind, pipeline_p2p=p2p, **plan_kwargs))
        pms.append(pm)
    torch_p2p, ce = pms
    assert torch_p2p.pipeline.transport is None and ce.pipeline.p2p in ("emulated", "copy_engine")
    ce.pipeline.p2p_slots = slots
    vocab = ref.wte.num_embeddings if kind == "toy" else ref.args.vocab_size
    for step in range(steps):
        x, y = make_batch(vocab, batch, seq, seed=10 + step)
        losses = [pm.forward_backward(pm.shard_batch(x), pm.shard_batch(y)) for pm in pms]
        assert torch.equal(losses[0], losses[1]), f"step {step}: loss {losses[1]} != torch P2P's {losses[0]}"
        want, got = torch_p2p.full_grads(), ce.full_grads()
        assert want.keys() == got.keys()
        for name in want:
            assert torch.equal(want[name], got[name]), f"step {step}: grad of {name} differs from torch P2P's"
        for pm in pms:
            pm.zero_grad()
    t = ce.pipeline.transport
    assert t.sent > 0 and t.received > 0 and t.fallbacks == 0, (t.sent, t.received, t.fallbacks)
    assert not any(t.pending.values())
    return {"sent": t.sent, "received": t.received, "slots": t.slots}


P2P_LAYOUTS = {
    "pp2_1f1b": ("llama", {"pp": 2}, {"pipeline_schedule": "1f1b", "micro_batch_size": 2}),
    "pp2_interleaved_v2": ("llama", {"pp": 2}, {"pipeline_schedule": "interleaved_1f1b", "virtual_stages": 2,
                                                "micro_batch_size": 2}),
    "pp2_zbv": ("llama", {"pp": 2}, {"pipeline_schedule": "zbv", "micro_batch_size": 2}),
}


@pytest.mark.parametrize("layout", list(P2P_LAYOUTS))
def test_copy_engine_p2p_bit_exact_on_gloo(layout: str) -> None:
    kind, mesh_kwargs, plan_kwargs = P2P_LAYOUTS[layout]
    stats = run_distributed(2, p2p_matches_nccl, kind, mesh_kwargs, plan_kwargs)
    assert all(s["slots"] == 3 for s in stats), stats  # default_slots at PP2, 4 micro-batches


@pytest.mark.parametrize("layout", ["pp2_1f1b", "pp2_interleaved_v2"])
def test_copy_engine_p2p_reuses_one_slot(layout: str) -> None:
    """One slot per channel: every send after the first waits for its ack (the ring wraps on
    every message), still bit-exact."""
    kind, mesh_kwargs, plan_kwargs = P2P_LAYOUTS[layout]
    run_distributed(2, p2p_matches_nccl, kind, mesh_kwargs, plan_kwargs, slots=1)


def test_copy_engine_p2p_pp4_interleaved() -> None:
    run_distributed(4, p2p_matches_nccl, "llama8", {"pp": 4},
                    {"pipeline_schedule": "interleaved_1f1b", "virtual_stages": 2, "micro_batch_size": 2}, seq=32)


def _protocol_case() -> None:
    """The transport alone on 2 ranks: slot reuse with acks, both kinds at once, the host-side
    hang check, and a message larger than a slot going to the caller, then the regrowth."""
    import torch.distributed as dist

    from dtensor_parallel.pipeline.copy_engine_p2p import BWD, FWD, CopyEngineP2P

    group = dist.group.WORLD
    rank = dist.get_rank()
    t = CopyEngineP2P(group, slots=2, emulated=True)

    def post(kind: int, tensors: list[torch.Tensor], send: bool):
        ops = [dist.P2POp(dist.isend if send else dist.irecv, x, 1 - rank, group) for x in tensors]
        return t.post([(op, kind) for op in ops])

    msgs = [torch.full((256,), float(i)) for i in range(5)]  # 1 KiB each
    if rank == 0:  # 5 activations to rank 1 through 2 slots, 5 gradients back, interleaved
        works, rest = post(FWD, msgs, send=True)
        grads = [torch.empty(256) for _ in range(5)]
        rw, _ = post(BWD, grads, send=False)
        for w in works + rw:
            w.wait()
        assert not rest and all(torch.equal(g, -m) for g, m in zip(grads, msgs))
    else:
        bufs = [torch.empty(256) for _ in range(5)]
        rw, _ = post(FWD, bufs, send=False)
        for w, b, m in zip(rw, bufs, msgs):
            w.wait()
            assert torch.equal(b, m)
            post(BWD, [-b], send=True)
    # waiting for message q while message <= q - slots of its channel is unconsumed would hang
    if rank == 0:
        post(FWD, msgs[:3], send=True)
    else:
        bufs = [torch.empty(256) for _ in range(3)]
        rw, _ = post(FWD, bufs, send=False)
        with pytest.raises(RuntimeError, match="would hang.*fwd message 8 from pp rank 0 while message 6 "):
            rw[2].wait()
        for w in rw:
            w.wait()
        assert all(torch.equal(b, m) for b, m in zip(bufs, msgs))
    # larger than a slot (4 KiB): back to the caller, both ends alike; regrown after the step
    big = torch.arange(4096, dtype=torch.float32) if rank == 0 else torch.empty(4096)
    works, rest = post(FWD, [big], send=rank == 0)
    assert not works and len(rest) == 1 and rest[0].tensor is big
    (dist.send if rank == 0 else dist.recv)(big, 1 - rank)
    t.end_step()
    assert t.slot_bytes == 16384 and t.fallbacks == 1
    works, rest = post(FWD, [big if rank == 0 else torch.empty(4096)], send=rank == 0)
    assert not rest
    works[0].wait()
    if rank == 1:
        assert torch.equal(works[0].buffer, torch.arange(4096, dtype=torch.float32))
    t.end_step()


def test_copy_engine_p2p_protocol() -> None:
    run_distributed(2, _protocol_case)
