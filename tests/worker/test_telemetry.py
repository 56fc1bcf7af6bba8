"""NVML telemetry without a GPU: a stand-in for the `pynvml` module (the one part that cannot run
here) checks which NVML calls are used — the versioned temperature and clocks-event reasons where the
library has them, the deprecated ones only as a fallback — and that a silent device is left out."""

from __future__ import annotations

from types import SimpleNamespace

from kiln.worker.telemetry import NvmlSource, make_source


class NvmlError(Exception):
    pass


def fake_nvml(*, versioned: bool, broken: set[int] = frozenset()) -> SimpleNamespace:  # type: ignore[assignment]
    calls: list[str] = []

    def handle(index: int) -> int:
        if index in broken:
            raise NvmlError("GPU is lost")
        return index

    nvml = SimpleNamespace(
        calls=calls, NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1,
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetTemperature=lambda h, sensor: calls.append("old temperature") or 70 + h,
        nvmlDeviceGetPowerUsage=lambda h: 612_500,  # milliwatts
        nvmlDeviceGetClockInfo=lambda h, clock: 1500 if clock == 1 else 0,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=99, memory=40),
        nvmlDeviceGetCurrentClocksThrottleReasons=lambda h: calls.append("old reasons") or 0x40,
        nvmlShutdown=lambda: calls.append("shutdown"),
    )
    if versioned:
        nvml.nvmlDeviceGetTemperatureV = lambda h, sensor: calls.append("temperatureV") or 90 + h
        nvml.nvmlDeviceGetCurrentClocksEventReasons = lambda h: calls.append("event reasons") or 0x20
    return nvml


def test_nvml_uses_the_versioned_calls_and_reports_watts() -> None:
    nvml = fake_nvml(versioned=True, broken={1})
    source = NvmlSource(nvml, count=3)
    readings = source.read()
    assert [r.gpu for r in readings] == [0, 2]  # GPU 1 stopped answering: absent, not faked
    first = readings[0]
    assert (first.temp_c, first.power_w, first.sm_clock_mhz, first.util) == (90.0, 612.5, 1500.0, 99.0)
    assert first.throttle_reasons == ["sw_thermal_slowdown"]
    assert "old temperature" not in nvml.calls and "old reasons" not in nvml.calls
    source.close()
    assert nvml.calls[-1] == "shutdown"


def test_an_older_nvml_falls_back_to_the_deprecated_calls() -> None:
    nvml = fake_nvml(versioned=False)
    (reading,) = NvmlSource(nvml, count=1).read()
    assert (reading.temp_c, reading.clocks_event_reasons) == (70.0, 0x40)
    assert nvml.calls == ["old temperature", "old reasons"]


def test_off_is_no_source_and_nvml_reads_the_real_gpus_where_there_are_any() -> None:
    assert make_source("off", None) is None
    source = make_source("nvml", None)
    if source is None:  # no GPU (or no driver) here: the guard stays idle
        return
    try:
        readings = source.read()
        assert readings and all(r.temp_c is not None and r.temp_c > 0 for r in readings)
    finally:
        source.close()
