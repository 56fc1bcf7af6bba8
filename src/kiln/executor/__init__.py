"""Executors run batches on workers and report what happened; they never decide what runs next.

`LocalExecutor` (worker processes on this machine) lives in `kiln.executor.local`, imported on
demand so that `import kiln.executor` stays light (no multiprocessing start, never torch).
"""

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

__all__ = [
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
