"""Routing the pipeline schedules' P2P through the copy-engine transport, and choosing it.

How torch.distributed.pipelining issues its P2P (read in the sources of both versions we run):

- torch 2.11 and 2.13 alike: a stage builds ``dist.P2POp`` lists (``get_fwd_recv_ops``,
  ``get_fwd_send_ops``, ``get_bwd_recv_ops``, ``get_bwd_send_ops``; the tensors are local
  tensors, the group the stage's), and every schedule hands them to the module function
  ``schedules._batch_p2p`` (directly, or per peer through ``_sorted_batch_p2p``, which calls
  it by its module name), then waits on the returned works (``_wait_batch_p2p``: ``w.wait()``).
  The multi-stage schedules (``_PipelineScheduleRuntime``: interleaved, zero bubble, ZBV) post
  receives ahead (RECV_F / RECV_B actions) and wait right before the compute that reads them.
- torch 2.11: ``_batch_p2p`` is ``dist.batch_isend_irecv(ops)`` (one coalesced NCCL group).
- torch 2.13: ``_batch_p2p`` issues an all-send or all-receive list op by op (``dist.isend`` /
  ``dist.irecv``) and only a mixed list through ``batch_isend_irecv``; the first step's warm-up
  (a vote over blocking ``dist.send`` / ``dist.recv``) and shape metadata
  (``send_object_list``) do not go through ``_batch_p2p`` and stay on NCCL.

So the hook is the same for both: while our schedule step runs (:meth:`P2PRouter.step`, a
context manager of ``PipelineRuntime``), ``schedules._batch_p2p`` is a function that gives
the ops our stages built (recorded by wrapping those four methods on our stage objects, which
also says whether an op carries activations or gradients) to the transport, and everything
else (other groups, ops the transport cannot serve, the warm-up's ops) to the function it
replaced; the previous function is back when the step ends, also on an error.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.distributed as dist
from torch.distributed.pipelining import schedules as torch_schedules

from ..warn_once import warn_once
from .copy_engine_p2p import BWD, FWD, CopyEngineP2P

logger = logging.getLogger(__name__)

P2P_CHOICES = ("nccl", "copy_engine", "auto")
_OP_METHODS = {"get_fwd_send_ops": FWD, "get_fwd_recv_ops": FWD, "get_bwd_send_ops": BWD, "get_bwd_recv_ops": BWD}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pp_hosts_reason(pp_ranks: list[int]) -> str | None:
    """Why the pp ranks (global ranks) are not all on this host, or None. Hosts hold
    ``LOCAL_WORLD_SIZE`` consecutive ranks (torchrun's layout; without it, one rank per GPU)."""
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or torch.cuda.device_count() or 1
    hosts = sorted({r // per_host for r in pp_ranks})
    if len(hosts) > 1:
        return (f"the pp ranks {pp_ranks} sit on {len(hosts)} hosts ({per_host} ranks a host); the copy engine "
                f"reaches only GPUs of one NVLink host")
    return None


# Where "auto" takes the copy engine: the schedules that post their sends and receives ahead,
# whose NCCL kernels then spin beside the GEMMs. Measured on 2 x H200, PP2 (RESULTS.md, issue
# 24): interleaved 1F1B 2.9-3.0% and ZBV 1.2% faster a step; 1F1B and GPipe, which wait for each
# message where they post it, within 0.4% either way, so they keep NCCL (and no receive rings).
AUTO_SCHEDULES = ("interleaved_1f1b", "zero_bubble", "zbv")


def choose_pipeline_p2p(requested: str, pp_ranks: list[int], device_type: str, schedule: str | None = None) -> str:
    """"copy_engine", "emulated" (CPU under TRITON_INTERPRET=1: tests) or "nccl"; local checks
    only (before any collective). ``requested`` "copy_engine" where it cannot run is a
    ``ValueError`` naming why; "auto" takes it for the ``AUTO_SCHEDULES`` on GPUs of one host
    and otherwise NCCL (with one log line where a GPU schedule that would gain cannot have it)."""
    if requested not in P2P_CHOICES:
        raise ValueError(f"pipeline_p2p={requested!r}: choose one of {P2P_CHOICES}")
    if requested == "nccl" or len(pp_ranks) < 2:
        return "nccl"
    if requested == "auto" and (device_type != "cuda" or (schedule is not None and schedule not in AUTO_SCHEDULES)):
        return "nccl"
    if device_type != "cuda" and _interpreted() and requested == "copy_engine":
        return "emulated"
    from ..tensor_parallel.sp_reduce_scatter import symm_mem_unavailable

    reason = symm_mem_unavailable(len(pp_ranks), device_type, dim="pp") or pp_hosts_reason(pp_ranks)
    if reason is None:
        return "copy_engine"
    if requested == "copy_engine":
        raise ValueError(f"pipeline_p2p='copy_engine' cannot run: {reason}. Use pipeline_p2p='auto' (falls back to "
                         f"NCCL where the copy engine cannot serve) or 'nccl'")
    warn_once(logger, "pipeline_p2p", "pipeline_p2p='auto': the pipeline's sends and receives use NCCL, since %s",
              reason)
    return "nccl"


def _same_group(a, b) -> bool:
    return a is b or (a is not None and b is not None and a.group_name == b.group_name)


class P2PRouter:
    """Hands the P2P ops of ``stages`` to ``transport`` while :meth:`step` is active."""

    def __init__(self, stages: list, transport: CopyEngineP2P):
        self.transport = transport
        self.active = False
        self._kinds: dict[int, tuple[dist.P2POp, int]] = {}  # id(op) -> (op, FWD/BWD); the op kept alive
        for stage in stages:
            for name, kind in _OP_METHODS.items():
                self._wrap(stage, name, kind)

    def _wrap(self, stage, name: str, kind: int) -> None:
        inner = getattr(stage, name)

        def ops(*args, **kwargs):
            out = inner(*args, **kwargs)
            if self.active:
                for op in out:
                    self._kinds[id(op)] = (op, kind)
            return out
        setattr(stage, name, ops)

    def _batch_p2p(self, original):
        transport, group = self.transport, self.transport.group

        def batch_p2p(p2p_ops, *args, **kwargs):
            mine, rest = [], []
            for op in p2p_ops:
                entry = self._kinds.pop(id(op), None)
                if entry is not None and _same_group(op.group, group) and transport.serves(op.tensor, op.group_peer):
                    mine.append((op, entry[1]))
                else:
                    rest.append(op)
            works, too_large = transport.post(mine) if mine else ([], [])
            rest += too_large
            return (list(original(rest, *args, **kwargs)) if rest else []) + works
        return batch_p2p

    @contextlib.contextmanager
    def step(self):
        """One schedule step with our stages' P2P on the transport (module docstring)."""
        original = torch_schedules._batch_p2p
        torch_schedules._batch_p2p = self._batch_p2p(original)
        self.active = True
        ok = False
        try:
            yield
            ok = True
        finally:
            torch_schedules._batch_p2p = original
            self.active = False
            self._kinds.clear()
            if ok:
                self.transport.end_step()
