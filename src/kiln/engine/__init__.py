"""The engine: fair queues per plan and user, batching by key, admission, preemption, and the truth
about waits. It knows tenants, plans, weights and batch keys — never accounts, HTTP, SQL or torch.
"""

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.loop import AsyncEngine, build_local_engine
from kiln.engine.metrics import AdmissionMetrics, EngineMetrics
from kiln.engine.types import (
    Admitted,
    BatchKey,
    Cancelled,
    Completed,
    Degradation,
    EngineEvent,
    EngineRequest,
    Failed,
    Position,
    Progress,
    Queued,
    Requeued,
    Started,
)

__all__ = [
    "AdmissionMetrics",
    "Admitted",
    "AsyncEngine",
    "BatchKey",
    "Cancelled",
    "Completed",
    "Degradation",
    "EngineConfig",
    "EngineCore",
    "EngineEvent",
    "EngineMetrics",
    "EngineRequest",
    "Failed",
    "Position",
    "Progress",
    "Queued",
    "Requeued",
    "Started",
    "build_local_engine",
]
