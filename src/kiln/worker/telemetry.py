"""Per-GPU telemetry: temperature, power, SM clock, utilisation and NVML's clocks-event reasons, read
from NVML (nvidia-ml-py, only where a GPU answers) or from a file of JSON lines (one reading per line,
the latest per GPU wins; what a DCGM-running site or a test writes). Reading never raises: a source
that cannot read returns what it has, and an absent GPU is absent, never faked.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

SW_POWER_CAP = 0x4
HW_SLOWDOWN = 0x8
SW_THERMAL_SLOWDOWN = 0x20
HW_THERMAL_SLOWDOWN = 0x40
HW_POWER_BRAKE_SLOWDOWN = 0x80
REASON_NAMES = {
    SW_POWER_CAP: "sw_power_cap", HW_SLOWDOWN: "hw_slowdown", SW_THERMAL_SLOWDOWN: "sw_thermal_slowdown",
    HW_THERMAL_SLOWDOWN: "hw_thermal_slowdown", HW_POWER_BRAKE_SLOWDOWN: "hw_power_brake_slowdown",
}


@dataclass(frozen=True)
class GpuReading:
    gpu: int
    temp_c: float | None = None
    power_w: float | None = None
    sm_clock_mhz: float | None = None
    util: float | None = None
    """Percent busy (0–100), as NVML and DCGM report it."""
    clocks_event_reasons: int = 0
    """NVML's bit mask (`nvmlDeviceGetCurrentClocksEventReasons`)."""

    @property
    def throttle_reasons(self) -> list[str]:
        return [name for bit, name in REASON_NAMES.items() if self.clocks_event_reasons & bit]

    def as_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "temp_c": self.temp_c, "power_w": self.power_w,
                "sm_clock_mhz": self.sm_clock_mhz, "util": self.util,
                "clocks_event_reasons": self.clocks_event_reasons, "throttle_reasons": self.throttle_reasons}


class TelemetrySource(Protocol):
    def read(self) -> list[GpuReading]:
        """The latest reading of every GPU the source knows (blocking I/O: call it off the loop)."""
        ...

    def close(self) -> None: ...


class FileSource:
    """JSON lines such as `{"gpu": 0, "temp_c": 90, "power_w": 600, "sm_clock_mhz": 1500, "util": 99,
    "clocks_event_reasons": 64}`, read as the file grows (from where the last read stopped; from the
    start again when it was replaced or truncated). A line that is not a reading is skipped."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._offset = 0
        self._inode: int | None = None
        self._partial = b""
        self._latest: dict[int, GpuReading] = {}

    def read(self) -> list[GpuReading]:
        try:
            stat = os.stat(self.path)
            if stat.st_ino != self._inode or stat.st_size < self._offset:
                self._inode, self._offset, self._partial = stat.st_ino, 0, b""
            if stat.st_size > self._offset:
                with open(self.path, "rb") as file:
                    file.seek(self._offset)
                    chunk = file.read()
                self._offset += len(chunk)
                *lines, self._partial = (self._partial + chunk).split(b"\n")
                for line in lines:
                    reading = parse_line(line)
                    if reading is not None:
                        self._latest[reading.gpu] = reading
        except OSError:
            pass  # not written yet (or gone): what was read before still stands
        return [self._latest[gpu] for gpu in sorted(self._latest)]

    def close(self) -> None:
        pass


def parse_line(line: bytes | str) -> GpuReading | None:
    try:
        data = json.loads(line)
        if not isinstance(data, dict) or isinstance(data.get("gpu"), bool):
            return None
        return GpuReading(
            gpu=int(data["gpu"]), temp_c=_number(data.get("temp_c")), power_w=_number(data.get("power_w")),
            sm_clock_mhz=_number(data.get("sm_clock_mhz")), util=_number(data.get("util")),
            clocks_event_reasons=int(data.get("clocks_event_reasons") or 0),
        )
    except (ValueError, TypeError, KeyError):
        return None


def _number(value: Any) -> float | None:
    return None if value is None or isinstance(value, bool) else float(value)


class NvmlSource:
    """Every GPU NVML sees, read at each call. Uses `nvmlDeviceGetTemperatureV` and
    `nvmlDeviceGetCurrentClocksEventReasons` where the library has them (the older calls are
    deprecated since CUDA 13) and falls back to the older ones on older drivers."""

    def __init__(self, pynvml: Any, count: int) -> None:
        self._nvml = pynvml
        self._count = count

    @classmethod
    def create(cls) -> NvmlSource | None:
        """None where nvidia-ml-py is not installed or NVML finds no GPU."""
        try:
            import pynvml

            pynvml.nvmlInit()
            count = int(pynvml.nvmlDeviceGetCount())
        except Exception:  # noqa: BLE001 - no library, no driver, no device: no telemetry
            return None
        return cls(pynvml, count) if count > 0 else None

    def read(self) -> list[GpuReading]:
        readings = []
        for index in range(self._count):
            try:
                readings.append(self._read(index))
            except Exception:  # noqa: BLE001 - a device that stops answering is skipped, not faked
                continue
        return readings

    def _read(self, index: int) -> GpuReading:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        return GpuReading(
            gpu=index,
            temp_c=_optional(lambda: float(self._temperature(handle))),
            power_w=_optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),  # milliwatts
            sm_clock_mhz=_optional(lambda: float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))),
            util=_optional(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
            clocks_event_reasons=int(_optional(lambda: self._reasons(handle)) or 0),
        )

    def _temperature(self, handle: Any) -> float:
        nvml = self._nvml
        if hasattr(nvml, "nvmlDeviceGetTemperatureV"):
            try:
                value = nvml.nvmlDeviceGetTemperatureV(handle, nvml.NVML_TEMPERATURE_GPU)
                return float(getattr(value, "temperature", value))
            except Exception:  # noqa: BLE001 - a driver without the versioned call: the old one
                pass
        return float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))

    def _reasons(self, handle: Any) -> int:
        nvml = self._nvml
        if hasattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons"):
            return int(nvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
        return int(nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - already shut down
            pass


def _optional(read: Any) -> Any:
    try:
        return read()
    except Exception:  # noqa: BLE001 - one field a device does not support
        return None


def make_source(kind: str, path: Path | str | None) -> TelemetrySource | None:
    """The configured source; None for `off`, or for `nvml` where no GPU answers."""
    if kind == "off":
        return None
    if kind == "file":
        if path is None:
            raise ValueError("telemetry_source = 'file' needs telemetry_file")
        return FileSource(path)
    started = time.monotonic()
    source = NvmlSource.create()
    log.debug("NVML %s in %.2fs", "found GPUs" if source else "found no GPU", time.monotonic() - started)
    return source
