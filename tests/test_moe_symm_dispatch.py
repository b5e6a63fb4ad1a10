"""Expert-parallel dispatch/combine over symmetric memory (issue 22 items 1-2).

Kernel math in the Triton interpreter on CPU with the peers simulated by stacked tensors
(``triton_kernels.moe_dispatch_symm.simulate``): the receive layout (expert-major, then
source, then the source's sorted order: the NCCL path's regroup order), the receive counts,
the way back to each source's sorted rows, and the bound's all-or-nothing skip. The op and
its autograd on gloo ranks with the peers' areas emulated by all-gathers, against the NCCL
path's ``dispatch_combine`` (output and gradients bit-equal: the same copies, the same
expert rows). On 2 GPUs (``pytest -m gpu``): the symmetric-memory op against the NCCL path,
output and every gradient, and the model's EP2 parity with the kernels spied."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from triton_kernels.moe_dispatch_symm import simulate, tables_ref

from .harness import run_distributed

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


def _rank_rows(world: int, t: int, k: int, e: int, h: int, seed: int, dtype=torch.float32, dead: int = 0):
    """Per rank: rows sorted by expert (T*k, H) and counts (E,) int64, from top-k routing."""
    rows, counts = [], []
    for s in range(world):
        g = torch.Generator().manual_seed(seed + s)
        logits = torch.randn(t, e, generator=g)
        if dead:
            logits[:, :dead] = float("-inf")  # the first experts (all of rank 0's, say) get nothing
        ids = logits.topk(k, dim=-1).indices
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        rows.append(torch.randn(t, h, generator=g)[order // k].to(device=DEVICE, dtype=dtype))
        counts.append(torch.bincount(flat, minlength=e).to(DEVICE))
    return rows, counts


@pytest.mark.parametrize("world,t,k,e,h,dead", [(2, 13, 2, 8, 40, 0), (3, 9, 2, 6, 24, 2), (4, 7, 3, 8, 17, 0),
                                                 (8, 5, 2, 16, 16, 0), (2, 11, 4, 8, 33, 4)])
def test_simulated_layout_and_round_trip(world, t, k, e, h, dead) -> None:
    rows, counts = _rank_rows(world, t, k, e, h, seed=world * 10, dead=dead)
    cap = world * t * k  # the worst case: nothing can overflow
    scale = [float(d + 2) for d in range(world)]
    got = simulate(rows, counts, cap, experts=lambda x, c, d: x * scale[d])
    ref = tables_ref([c.cpu() for c in counts], world)
    for d, (recv, recv_counts, info, back) in enumerate(got):
        order = ref[d]["recv_order"]
        want = torch.stack([rows[s][i] for s, i in order]) if order else recv[:0]
        assert int(info[0]) == len(order) and int(info[1]) == max(len(r["recv_order"]) for r in ref)
        assert torch.equal(recv[:len(order)], want)  # a copy: exact, in the NCCL path's order
        assert torch.equal(recv_counts.cpu(), ref[d]["recv_counts"])
    el = e // world
    for s in range(world):  # every row came back from its expert's rank, scaled by that rank's factor
        owner = torch.repeat_interleave(torch.arange(e, device=DEVICE) // el, counts[s])
        want = rows[s] * torch.tensor(scale, device=DEVICE)[owner][:, None]
        assert torch.equal(got[s][3], want)


def test_simulated_bound_exceeded_skips_every_store() -> None:
    """A rank receiving more than the bound: every rank skips every store (no partial
    writes, no out-of-bounds), and info[1] reports the rows needed, for the host's error."""
    world, t, k, e, h = 2, 10, 2, 4, 8
    rows, counts = _rank_rows(world, t, k, e, h, seed=3)
    need = max(sum(int(c[d * 2:(d + 1) * 2].sum()) for c in counts) for d in range(world))
    got = simulate(rows, counts, need - 1)
    for recv, _, info, back in got:
        assert int(info[1]) == need
        assert not recv.any() and not back.any()
    got = simulate(rows, counts, need)  # exactly the bound: fits
    assert all(bool(r[3].any()) for r in got)
