"""Simulated ranks in one process: the fake process group plus ``LocalTensorMode``.

Under ``LocalTensorMode(world)`` every tensor holds one value per rank and collectives are
computed in-process, so pure-DTensor strategies (TP, SP) run their real collectives on
one CPU process. (FSDP2 does not run under it in torch 2.13: it resizes storages. Use the
gloo harness for FSDP.)
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist
from torch.distributed._local_tensor import LocalTensorMode
from torch.testing._internal.distributed.fake_pg import FakeStore


def fake_world(world_size: int) -> None:
    """(Re)start a fake process group of ``world_size`` ranks in this process."""
    if dist.is_initialized():
        if dist.get_world_size() == world_size and dist.get_backend() == "fake":
            return
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


@contextlib.contextmanager
def simulated_ranks(world_size: int):
    fake_world(world_size)
    with LocalTensorMode(world_size) as mode:
        yield mode
