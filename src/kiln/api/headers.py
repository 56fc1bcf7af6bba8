"""Kiln's own response headers: `x-kiln-degraded` when admission changed a job to meet its plan's
wait target (the x-ratelimit-*-images ones come from `kiln.service.admission.usage_headers`)."""

from __future__ import annotations

DEGRADED_HEADER = "x-kiln-degraded"


def degraded_header(degraded: dict | None) -> dict[str, str]:
    """`x-kiln-degraded: steps=30->15; size=1024x1024->1024x1024` when admission degraded the job."""
    if not degraded:
        return {}
    return {DEGRADED_HEADER: f"steps={degraded['steps_from']}->{degraded['steps_to']}; "
                             f"size={degraded['size_from']}->{degraded['size_to']}"}
