"""Executors run batches on workers and report what happened; they never decide what runs next.

`LocalExecutor` (worker processes on this machine) lives in `kiln.executor.local`, `RayExecutor`
(actors on a Ray cluster) in `kiln.executor.ray_executor`; both are imported on demand by
`build_executor`, so that `import kiln.executor` stays light (no multiprocessing start, never torch
or ray).
"""

from typing import Any

from kiln.executor.base import (
    BatchCancelled,
    BatchCompleted,
    BatchFailed,
    BatchProgress,
    BatchStarted,
    ExecBatch,
    Executor,
    ExecutorOutput,
    WorkerLost,
)



def build_executor(settings: Any) -> Any:
    """The executor `settings.executor` names (`local` or `ray`), built but not started."""
    if settings.executor == "ray":
        from kiln.executor.ray_executor import RayExecutor

        return RayExecutor.from_settings(settings)
    from kiln.executor.local import LocalExecutor

    return LocalExecutor.from_settings(settings)


__all__ = [
    "build_executor",
    "BatchCancelled",
    "BatchCompleted",
    "BatchFailed",
    "BatchProgress",
    "BatchStarted",
    "ExecBatch",
    "Executor",
    "ExecutorOutput",
    "WorkerLost",
]
