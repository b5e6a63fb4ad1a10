"""Schedule names, their torch.distributed.pipelining classes, and their constraints.

============== ================================ ====================  ==================
name           torch class                      stages per rank       bubble (theory)
============== ================================ ====================  ==================
gpipe          ScheduleGPipe / ScheduleLoopedBFS 1 / v (loop)          (p-1)/m
1f1b           Schedule1F1B                     1                     (p-1)/m
interleaved_1f1b ScheduleInterleaved1F1B        v >= 2 (loop)         (p-1)/(v m)
zero_bubble    ScheduleInterleavedZeroBubble    v >= 1 (loop)         about 0 with m >= 2p
zbv            ScheduleZBVZeroBubble            2 (V shape)           about 0 with m >= 2p
============== ================================ ====================  ==================

p: pipeline ranks, v: stages per rank, m: micro-batches. The bubble fraction here is
bubble time over ideal compute time (Narayanan et al. 2021, "Efficient Large-Scale
Language Model Training on GPU Clusters"); zero-bubble schedules (Qi et al. 2023, "Zero
Bubble Pipeline Parallelism") split the backward into input-gradient (B) and
weight-gradient (W) halves and fill the bubbles with W.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.pipelining import schedules as S


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    style: str  # "loop" or "v": how stages map to ranks
    min_virtual: int
    max_virtual: int | None
    multi: bool  # a PipelineScheduleMulti (list of stages) rather than a single stage
    splits_backward: bool = False  # runs each backward as input-gradient and weight-gradient halves


SCHEDULES: dict[str, ScheduleSpec] = {
    "gpipe": ScheduleSpec("gpipe", "loop", 1, None, multi=False),
    "1f1b": ScheduleSpec("1f1b", "loop", 1, 1, multi=False),
    "interleaved_1f1b": ScheduleSpec("interleaved_1f1b", "loop", 2, None, multi=True),
    "zero_bubble": ScheduleSpec("zero_bubble", "loop", 1, None, multi=True, splits_backward=True),
    "zbv": ScheduleSpec("zbv", "v", 2, 2, multi=True, splits_backward=True),
}


def schedule_class(name: str, virtual: int):
    if name == "gpipe":
        return S.ScheduleGPipe if virtual == 1 else S.ScheduleLoopedBFS
    return {"1f1b": S.Schedule1F1B, "interleaved_1f1b": S.ScheduleInterleaved1F1B,
            "zero_bubble": S.ScheduleInterleavedZeroBubble, "zbv": S.ScheduleZBVZeroBubble}[name]


def default_virtual(name: str) -> int:
    return SCHEDULES[name].min_virtual


def check_schedule(name: str, pp: int, virtual: int, n_microbatches: int | None) -> None:
    """Local checks of a schedule against pp, virtual stages and micro-batches."""
    if name not in SCHEDULES:
        raise ValueError(f"pipeline_schedule={name!r}: choose one of {list(SCHEDULES)}")
    spec = SCHEDULES[name]
    if virtual < spec.min_virtual or (spec.max_virtual is not None and virtual > spec.max_virtual):
        allowed = (f"exactly {spec.min_virtual}" if spec.max_virtual == spec.min_virtual
                   else f"at least {spec.min_virtual}" + (f" and at most {spec.max_virtual}" if spec.max_virtual else ""))
        raise ValueError(f"schedule {name!r} takes {allowed} stages per pp rank, got virtual_stages={virtual}"
                         + ("; use 'interleaved_1f1b' for virtual stages" if name == "1f1b" else ""))
    if n_microbatches is not None and pp > 1 and name != "gpipe" and n_microbatches < pp:
        raise ValueError(f"{n_microbatches} micro-batches for pp={pp}: schedule {name!r} needs at least "
                         f"pp micro-batches per step (raise global_batch_size or lower micro_batch_size)")
    if n_microbatches is not None and name == "interleaved_1f1b" and n_microbatches > pp \
            and n_microbatches % pp:
        raise ValueError(f"interleaved_1f1b needs the micro-batches ({n_microbatches}) to be a multiple "
                         f"of pp ({pp})")


def theoretical_bubble(pp: int, virtual: int, n_microbatches: int) -> float:
    """(p - 1) / (v m): bubble time over ideal compute time of (interleaved) 1F1B / GPipe."""
    return (pp - 1) / (virtual * n_microbatches)
