"""Point-to-point ring rotation on the cp group: send to rank+1, receive from rank-1.

All sends and receives of one rotation go in one ``batch_isend_irecv`` (NCCL groups them
and so cannot deadlock on the order of the pairs); the caller computes while they fly and
waits only when it needs the received blocks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RingComm:
    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
        """Post the rotation of ``tensors``; returns the receive buffers and the works."""
        recv = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]  # contiguous
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, self.prev, self.group) for b in recv]
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(works: list) -> None:
        for w in works:
            w.wait()

    def rotate(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        recv, works = self.start(tensors)
        self.wait(works)
        return recv
