"""Driving a pipeline schedule over this rank's stage modules.

Each stage module (already TP/SP/FSDP-parallelized by ``parallelize``) becomes a
``torch.distributed.pipelining.PipelineStage`` on the pp process group; P2P sends the
stage output to the rank of the same (dp, cp, tp) coordinates in the next stage, so under
TP + SP each tp rank sends its sequence shard. Shapes are inferred at run time.

Bubble: the stage methods the schedules call for each action (``forward_one_chunk``,
``backward_one_chunk`` for B or the full backward, ``backward_weight_one_chunk`` for W) are
timed (CUDA events on GPU), so ``busy_s`` is this rank's compute time in the last step and
``bubble_s = step_s - busy_s`` its idle time: the pipeline bubble plus exposed P2P waits.

P2P: NCCL through torch's schedules, or (``p2p="copy_engine"``, ``ParallelPlan.pipeline_p2p``)
the copy engine over symmetric memory (``copy_engine_p2p.py``), routed there while the step runs
(``p2p_routing.py``); ``"emulated"`` is its CPU emulation for tests.

Loss: each micro-batch's loss is ``sum of token losses / global valid tokens`` and the
schedule does not rescale gradients (``scale_grads=False``), so the accumulated gradient
is that of the global mean loss, as on one device. Only the last stage sees losses; the
reported loss is summed over pp (others add 0) and dp.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage

from ..tensor_parallel.loss import eager_cross_entropy_sum
from .copy_engine_p2p import CopyEngineP2P, default_slots
from .p2p_routing import P2PRouter
from .schedules import SCHEDULES, schedule_class


@contextlib.contextmanager
def sm_carveout(n: int):
    """cuBLAS targets ``n`` fewer SMs inside (torch's experimental carveout, read by each
    matmul when it runs, compiled graphs' included); the previous setting after. n = 0: as is."""
    if not n:
        yield
        return
    previous = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(n)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(previous)


class PipelineRuntime:
    def __init__(self, stage_modules: list[nn.Module], stage_ids: list[int], n_stages: int,
                 pp_mesh: DeviceMesh, schedule: str, device: torch.device,
                 loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = eager_cross_entropy_sum,
                 sm_carveout: int = 0, p2p: str = "nccl"):
        self.group = pp_mesh.get_group()
        self.stage_ids = stage_ids
        self.loss_sum = loss_sum  # (last stage output, labels) -> summed token loss; the fused loss's head
        self.n_stages = n_stages
        self.schedule_name = schedule
        self.sm_carveout = sm_carveout  # ParallelPlan.pipeline_sm_carveout
        self.virtual = len(stage_ids)
        self.stages = [PipelineStage(m, sid, n_stages, device, group=self.group)
                       for m, sid in zip(stage_modules, stage_ids)]
        self._timer = _BusyTimer(device)
        for stage in self.stages:
            self._timer.wrap(stage)
        self.p2p = p2p  # "nccl", "copy_engine" or "emulated" (p2p_routing.choose_pipeline_p2p)
        self.transport: CopyEngineP2P | None = None
        self._router: P2PRouter | None = None
        if p2p != "nccl":
            self.transport = CopyEngineP2P(self.group, slots=1, emulated=p2p == "emulated")
            self._router = P2PRouter(self.stages, self.transport)
        self.p2p_slots: int | None = None  # slots per channel; None: copy_engine_p2p.default_slots
        self.is_first = 0 in stage_ids
        self.is_last = n_stages - 1 in stage_ids
        self._schedules: dict[tuple[int, bool], object] = {}
        self._n_tokens: torch.Tensor | None = None
        self.step_s: float = 0.0
        self.busy_s: float = 0.0

    def around_forward_chunks(self, switch) -> None:
        """Call ``switch(True)`` before and ``switch(False)`` after each real micro-batch
        forward of the schedule. (torch's pipelining also runs a stage's forward once for
        shape inference, on the first micro-batch or on uninitialized tensors; per-step
        statistics must not count that one.)"""
        for stage in self.stages:
            inner = stage.forward_one_chunk

            def run(*args, _inner=inner, **kwargs):
                switch(True)
                try:
                    return _inner(*args, **kwargs)
                finally:
                    switch(False)
            stage.forward_one_chunk = run

    @property
    def bubble_s(self) -> float:
        return max(self.step_s - self.busy_s, 0.0)

    def _loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_sum(output, target) / self._n_tokens

    def schedule(self, n_microbatches: int, training: bool = True):
        """The schedule object for this many micro-batches (built once, then reused); a
        forward-only one has no loss function, so it needs no targets."""
        key = (n_microbatches, training)
        if key not in self._schedules:
            cls = schedule_class(self.schedule_name, self.virtual)
            stages = self.stages if SCHEDULES[self.schedule_name].multi or self.virtual > 1 else self.stages[0]
            self._schedules[key] = cls(stages, n_microbatches, loss_fn=self._loss_fn if training else None,
                                       scale_grads=False)
        return self._schedules[key]

    def _p2p(self, n_microbatches: int):
        """The step's P2P route: torch's NCCL calls as they are, or the copy-engine transport."""
        if self._router is None:
            return contextlib.nullcontext()
        pp = self.group.size()
        self.transport.want_slots(self.p2p_slots or default_slots(self.schedule_name, pp, self.virtual, n_microbatches))
        return self._router.step()

    def _step_kwargs(self, sched) -> dict:
        params = inspect.signature(sched.step).parameters
        return {"return_outputs": False} if "return_outputs" in params else {}

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, n_microbatches: int,
                         n_tokens: torch.Tensor, model_kwargs: dict | None = None) -> torch.Tensor:
        """One schedule step; returns this rank's summed micro-batch losses (0 off the last
        stage). ``model_kwargs`` (``position_ids`` under CP) reach every stage's forward,
        split into micro-batches along dim 0 like the inputs."""
        self._n_tokens = n_tokens
        sched = self.schedule(n_microbatches)
        losses: list[torch.Tensor] = []
        args = (x,) if self.is_first else ()
        kwargs = {"target": y, "losses": losses} if self.is_last else {}
        self._timer.reset()
        if n_tokens.is_cuda:
            torch.cuda.synchronize(n_tokens.device)
        t0 = time.perf_counter()
        with sm_carveout(self.sm_carveout), self._p2p(n_microbatches):
            sched.step(*args, **kwargs, **(model_kwargs or {}), **self._step_kwargs(sched))
        if n_tokens.is_cuda:
            torch.cuda.synchronize(n_tokens.device)
        self.step_s = time.perf_counter() - t0
        self.busy_s = self._timer.total_s()
        total = torch.zeros((), device=n_tokens.device, dtype=torch.float32)
        for loss in losses:
            total += loss.detach().float()
        return total

    def forward(self, x: torch.Tensor, n_microbatches: int, model_kwargs: dict | None = None):
        """Forward only; the logits on the ranks holding the last stage, None elsewhere."""
        sched = self.schedule(n_microbatches, training=False)
        with self._p2p(n_microbatches):
            out = sched.step(*((x,) if self.is_first else ()), **(model_kwargs or {}))
        return out if self.is_last else None

    def sum_over_pp(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t


class _BusyTimer:
    """Sums the time spent inside a stage's per-micro-batch compute methods."""

    METHODS = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: list[tuple] = []
        self._cpu_s = 0.0

    def wrap(self, stage: PipelineStage) -> None:
        for name in self.METHODS:
            method = getattr(stage, name, None)
            if method is not None:
                setattr(stage, name, self._timed(method))

    def _timed(self, fn):
        def run(*args, **kwargs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self._events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._cpu_s += time.perf_counter() - t0
            return out
        return run

    def reset(self) -> None:
        self._events.clear()
        self._cpu_s = 0.0

    def total_s(self) -> float:
        """Call after a synchronize."""
        return self._cpu_s + sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
