"""The dashboard's numbers, as one small JSON snapshot polled every few seconds.

Read from Prometheus metrics where they exist (this process's registry on `app.state`, and the
scheduler's, which its heartbeat carries); queue depth,
images and waits fall back to the jobs table, and anything else is simply absent ("no data").
Counters are sent as running totals: the page turns two snapshots into a rate.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import defaultdict
from typing import Any

from fastapi import FastAPI
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.models import Image, Job, utcnow

WAIT_WINDOW_S = 300
"""Waits are the percentiles of the jobs that started in the last five minutes."""


def find_registry(app: FastAPI) -> CollectorRegistry:
    """The engine's registry, wherever the app factory put it; the process default otherwise."""
    kiln = getattr(app.state, "kiln", None)
    holders = [app.state, kiln, getattr(kiln, "engine_core", None), getattr(kiln, "runner", None)]
    for holder in holders:
        for name in ("metrics_registry", "prometheus_registry", "metrics", "registry"):
            candidate = getattr(holder, name, None) if holder is not None else None
            candidate = getattr(candidate, "registry", candidate)
            if isinstance(candidate, CollectorRegistry):
                return candidate
    return REGISTRY


def _families(app: FastAPI) -> list[Any]:
    """This process's metric families and the scheduler's (sent with its heartbeat, as text)."""
    families = list(find_registry(app).collect())
    runner = getattr(getattr(app.state, "kiln", None), "runner", None)
    status = getattr(runner, "status", None)
    if status is not None and status.metrics:
        families += text_string_to_metric_families(status.metrics.decode())
    return families


def thermal(app: FastAPI) -> dict[str, Any] | None:
    """The scheduler's thermal guard as its heartbeat carries it (GPUs, states, held limits)."""
    runner = getattr(getattr(app.state, "kiln", None), "runner", None)
    status = getattr(runner, "status", None)
    return (getattr(status, "stats", None) or {}).get("thermal")


def snapshot(app: FastAPI) -> dict[str, Any]:
    metrics = _read_metrics(_families(app))
    db = _read_db(app.state.kiln.db)
    guard = thermal(app)
    if not metrics["gpus"] and guard:  # no NVML here: the guard's telemetry (a file, DCGM) instead
        metrics["gpus"] = [{"name": str(g["gpu"]), "temperature_c": g["temp_c"], "utilization": g["util"]}
                           for g in guard["gpus"]]
    return {
        "time": time.time(),
        "queue_depth": metrics["queue_depth"] or db["queue_depth"],
        "images_total": db["images_total"] if metrics["images_total"] is None else metrics["images_total"],
        "images_per_s": metrics["images_per_s"],
        "wait_s": db["wait_s"] or metrics["wait_s"],
        "refusals_total": metrics["refusals_total"],
        "gpus": metrics["gpus"],
        "thermal": guard,
        "sources": {"metrics": metrics["found"], "database": True},
    }


def _label(labels: dict[str, str], *names: str) -> str:
    for name in names:
        if labels.get(name):
            return labels[name]
    return "all"


def _read_metrics(families: Any) -> dict[str, Any]:
    queue: dict[str, float] = defaultdict(float)
    refusals: dict[str, float] = defaultdict(float)
    images: float | None = None
    images_per_s: float | None = None
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    gpus: dict[str, dict[str, float]] = defaultdict(dict)
    found: list[str] = []
    for family in families:
        name = family.name
        if not name.startswith("kiln"):
            continue
        if "queue_depth" in name or (
            family.type == "gauge" and name.endswith(("queue_length", "queued_jobs"))
        ):
            for s in family.samples:
                queue[_label(s.labels, "plan")] += s.value
        elif family.type == "gauge" and "images_per_second" in name:
            images_per_s = sum(s.value for s in family.samples)
        elif family.type == "counter" and "image" in name and "refus" not in name:
            images = (images or 0.0) + sum(s.value for s in family.samples if s.name.endswith("_total"))
        elif family.type == "histogram" and "wait" in name:
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    buckets[_label(s.labels, "plan")].append((float(s.labels["le"]), s.value))
        elif family.type == "counter" and ("refus" in name or "reject" in name):
            for s in family.samples:
                if s.name.endswith("_total"):
                    refusals[_label(s.labels, "reason", "code")] += s.value
        elif "gpu" in name and ("temp" in name or "util" in name):
            key = "temperature_c" if "temp" in name else "utilization"
            for s in family.samples:
                value = (
                    s.value * 100 if key == "utilization" and s.value <= 1.0 and "ratio" in name else s.value
                )
                gpus[_label(s.labels, "gpu", "device", "index")][key] = value
        else:
            continue
        found.append(name)
    return {
        "queue_depth": dict(queue),
        "images_total": images,
        "images_per_s": images_per_s,
        "wait_s": {plan: _histogram_quantiles(b) for plan, b in buckets.items() if b and b[-1][1] > 0},
        "refusals_total": dict(refusals),
        "gpus": [{"name": k, **v} for k, v in sorted(gpus.items())],
        "found": found,
    }


def _histogram_quantiles(buckets: list[tuple[float, float]]) -> dict[str, float]:
    buckets = sorted(buckets)
    total = buckets[-1][1]

    def quantile(q: float) -> float:
        rank, lower_le, lower_count = q * total, 0.0, 0.0
        for le, count in buckets:
            if count >= rank:
                if math.isinf(le):
                    return lower_le
                share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
                return lower_le + (le - lower_le) * share
            lower_le, lower_count = le, count
        return lower_le

    return {"p50": round(quantile(0.5), 3), "p95": round(quantile(0.95), 3), "count": int(total)}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _read_db(factory: sessionmaker[Session]) -> dict[str, Any]:
    since = utcnow() - dt.timedelta(seconds=WAIT_WINDOW_S)
    with factory() as session:
        queue = dict(
            session.execute(
                select(Job.plan_name, func.count()).where(Job.status == "queued").group_by(Job.plan_name)
            ).all()
        )
        images_total = session.scalar(select(func.count()).select_from(Image)) or 0
        started = session.execute(
            select(Job.plan_name, Job.created_at, Job.started_at).where(Job.started_at >= since)
        ).all()
    waits: dict[str, list[float]] = defaultdict(list)
    for plan, created, began in started:
        waits[plan].append(max(0.0, (_aware(began) - _aware(created)).total_seconds()))
    return {
        "queue_depth": {plan: float(n) for plan, n in queue.items()},
        "images_total": float(images_total),
        "wait_s": {
            plan: {
                "p50": round(_percentile(v, 0.5), 3),
                "p95": round(_percentile(v, 0.95), 3),
                "count": len(v),
            }
            for plan, v in waits.items()
        },
    }


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)  # SQLite drops the zone
