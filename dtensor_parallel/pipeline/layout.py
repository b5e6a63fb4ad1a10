"""Which blocks each pipeline stage holds and which stages each pp rank runs."""

from __future__ import annotations

from dataclasses import dataclass

from .schedules import SCHEDULES, check_schedule, default_virtual
from .split import blocks_container, stage_layer_counts, stages_of_rank, virtual_stages_from_layers


@dataclass(frozen=True)
class PipelineLayout:
    pp: int
    virtual: int
    schedule: str
    counts: tuple[int, ...]  # blocks per stage, in stage order
    block_names: tuple[str, ...]

    @property
    def n_stages(self) -> int:
        return self.pp * self.virtual

    def blocks_of(self, stage: int) -> list[str]:
        start = sum(self.counts[:stage])
        return list(self.block_names[start:start + self.counts[stage]])

    def stages_of(self, pp_rank: int) -> list[int]:
        return stages_of_rank(pp_rank, self.pp, self.virtual, SCHEDULES[self.schedule].style)

    def ranks_of(self, stages: set[int]) -> list[int]:
        """The pp ranks that run any of ``stages``."""
        return [r for r in range(self.pp) if set(self.stages_of(r)) & stages]


def pipeline_layout(block_names: list[str], pp: int, plan, n_microbatches: int | None = None) -> PipelineLayout:
    """Check the plan's pipeline fields against the blocks and build the layout (local)."""
    blocks_container(block_names)
    n = len(block_names)
    schedule = plan.pipeline_schedule
    if plan.layers_per_virtual_stage is not None:
        virtual = virtual_stages_from_layers(n, pp, plan.layers_per_virtual_stage)
    else:
        virtual = plan.virtual_stages or (default_virtual(schedule) if schedule else 1)
    if schedule is None:  # Megatron: interleaved when there are virtual stages
        schedule = "interleaved_1f1b" if virtual > 1 else "1f1b"
    check_schedule(schedule, pp, virtual, n_microbatches)
    counts = stage_layer_counts(n, pp * virtual, layers_per_stage=plan.layers_per_stage,
                                first_stage_layers=plan.first_stage_layers,
                                last_stage_layers=plan.last_stage_layers)
    return PipelineLayout(pp, virtual, schedule, tuple(counts), tuple(block_names))
