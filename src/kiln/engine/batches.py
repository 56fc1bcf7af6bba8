"""A running batch as the engine tracks it, and what one scheduling round decided."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from kiln.engine.work import WorkItem
from kiln.executor.base import ExecBatch
from kiln.worker.requests import BatchSpec, GenerationRequest


@dataclass(eq=False)
class RunningBatch:
    """Work items sharing one pipeline call on one worker."""

    batch_id: str
    items: list[WorkItem]
    started_at: float
    best_weight: float
    step: int = 0
    total: int = 1
    preempting: bool = False
    cancelling: bool = False
    units: float = field(init=False)
    """Its items' work units (the items of a batch are fixed when it starts)."""

    def __post_init__(self) -> None:
        self.units = sum(item.units for item in self.items)

    @property
    def images(self) -> int:
        return sum(item.images for item in self.items)

    @property
    def progress(self) -> float:
        return self.step / max(self.total, 1)

    def units_by_plan(self) -> dict[str, float]:
        units: dict[str, float] = defaultdict(float)
        for item in self.items:
            units[item.plan] += item.units
        return units

    def to_exec(self) -> ExecBatch:
        """What the executor runs: one GenerationRequest per work item, keyed by its work id."""
        key = self.items[0].key
        spec = BatchSpec(key.model, key.width, key.height, key.steps, key.guidance_scale, key.task, key.loras)
        requests = tuple(
            GenerationRequest(
                request_id=item.work_id,
                prompt=item.leader.prompt,
                seed=item.leader.seed,
                n=item.leader.n,
                negative_prompt=item.leader.negative_prompt,
                init_image=item.leader.init_image,
                mask_image=item.leader.mask_image,
                strength=item.leader.strength,
            )
            for item in self.items
        )
        previews = [m.preview_every for i in self.items for m in i.members if m.preview_every > 0]
        return ExecBatch(self.batch_id, spec, requests, min(previews, default=0))


def running_units(batches: Iterable[RunningBatch]) -> float:
    """Work units the running batches still have to do."""
    return sum(b.units * (1.0 - b.progress) for b in batches)


@dataclass
class SchedulerOutput:
    """Batches to start and batches to preempt, decided by one `schedule()`."""

    batches: list[RunningBatch] = field(default_factory=list)
    preempt: list[RunningBatch] = field(default_factory=list)
