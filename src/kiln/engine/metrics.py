"""Prometheus metrics for the engine, on a registry passed in (never the global default), plus GPU
temperature and utilisation through NVML where a GPU is present — absent, not faked, where none is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

WAIT_BUCKETS_S = (0.1, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class AdmissionMetrics:
    """Refusals and degradations, counted where admission is decided (the API processes)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.refusals = Counter("kiln_admission_refusals", "Requests refused at admission, by reason.",
                                ["plan", "reason"], registry=registry)
        self.degradations = Counter("kiln_admission_degraded", "Requests admitted degraded, by plan.",
                                    ["plan"], registry=registry)

    def refused(self, plan: str, reason: str) -> None:
        self.refusals.labels(plan, reason).inc()

    def degraded(self, plan: str) -> None:
        self.degradations.labels(plan).inc()


class EngineMetrics:
    """`admission=False` where another process counts admissions (the scheduler process: its API
    processes do), so the two expositions never both carry those series."""

    def __init__(self, registry: CollectorRegistry, *, gpu: bool = True, admission: bool = True) -> None:
        self.registry = registry
        self.queue_depth = Gauge("kiln_queue_depth", "Jobs waiting, by plan (relax: the idle-only queue).",
                                 ["plan"], registry=registry)
        self.queue_wait = Histogram("kiln_queue_wait_seconds", "Time from queued to started, by plan.",
                                    ["plan"], buckets=WAIT_BUCKETS_S, registry=registry)
        self.images = Counter("kiln_images_generated", "Images generated.", registry=registry)
        self.images_per_s = Gauge("kiln_images_per_second", "Measured throughput (EWMA) over all workers.",
                                  registry=registry)
        self.batch_images = Histogram("kiln_batch_images", "Images per pipeline call.",
                                      buckets=BATCH_BUCKETS, registry=registry)
        self.gpu_seconds_by_plan = Counter("kiln_gpu_seconds", "Worker seconds spent, split by plan by work.",
                                           ["plan"], registry=registry)
        self.admission = AdmissionMetrics(registry) if admission else None
        self._plans_seen: set[str] = set()
        self.model_loads = ModelLoadCollector()
        registry.register(self.model_loads)
        self.nodes = NodeCollector()
        registry.register(self.nodes)
        self.gpu_collector: NvmlCollector | None = NvmlCollector.create() if gpu else None
        if self.gpu_collector is not None:
            registry.register(self.gpu_collector)

    def watch_model_loads(self, source: Callable[[], Iterable[Any]]) -> None:
        """Report the executor's `model_loads()` (load seconds and memory per worker and model)."""
        self.model_loads.source = source

    def watch_nodes(self, core: Any, executor: Any) -> None:
        """Report workers and capacity per node: `executor.worker_nodes()` (each live worker's node,
        in slot order), at `core.capacity`'s factors times `core.throughput` (per worker)."""
        self.nodes.core, self.nodes.executor = core, executor

    def refused(self, plan: str, reason: str) -> None:
        if self.admission is not None:
            self.admission.refused(plan, reason)

    def degraded(self, plan: str) -> None:
        if self.admission is not None:
            self.admission.degraded(plan)

    def dispatched(self, plan: str, wait_s: float) -> None:
        self.queue_wait.labels(plan).observe(max(0.0, wait_s))

    def batch_started(self, images: int) -> None:
        self.batch_images.observe(images)

    def batch_finished(self, images: int, duration_s: float, units_by_plan: Mapping[str, float]) -> None:
        self.images.inc(images)

    def throughput(self, images_per_s: float) -> None:
        self.images_per_s.set(images_per_s)

    def gpu_seconds(self, units_by_plan: Mapping[str, float], seconds: float) -> None:
        total = sum(units_by_plan.values())
        if total <= 0 or seconds <= 0:
            return
        for plan, units in units_by_plan.items():
            self.gpu_seconds_by_plan.labels(plan).inc(seconds * units / total)

    def queue_depths(self, depths: Mapping[str, int]) -> None:
        self._plans_seen.update(depths)
        for plan in self._plans_seen:
            self.queue_depth.labels(plan).set(depths.get(plan, 0))


class ModelLoadCollector(Collector):
    """Load time and memory per worker and model, read from the executor at scrape time, so a
    replaced worker's series go with it."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[Any]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["worker", "model", "device"]
        seconds = GaugeMetricFamily("kiln_model_load_seconds", "Time a worker took to load a model.",
                                    labels=labels)
        memory = GaugeMetricFamily(
            "kiln_worker_memory_bytes",
            "A worker's memory right after it loaded a model (CUDA allocated on a GPU, resident set on CPU).",
            labels=labels,
        )
        for load in self.source() if self.source is not None else ():
            seconds.add_metric([load.worker_id, load.model, load.device], load.load_s)
            memory.add_metric([load.worker_id, load.model, load.device], float(load.memory_bytes))
        yield seconds
        yield memory


class NodeCollector(Collector):
    """Workers and capacity by node, read at scrape time: `kiln_workers{node}` (live workers),
    `kiln_capacity_units_per_s{node}` and `kiln_capacity_images_per_s{node}` (each worker at its capacity
    factor — below 1 while the thermal guard rests it — times the measured per-worker throughput; units
    are 512×512 image-steps). A node is the host name under the local executor, the Ray node id under
    Ray (whose first 8 hex digits are in its workers' ids, `ray-<node>-<n>`)."""

    def __init__(self) -> None:
        self.core: Any = None
        self.executor: Any = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        workers = GaugeMetricFamily("kiln_workers", "Live workers, by node.", labels=["node"])
        units = GaugeMetricFamily("kiln_capacity_units_per_s",
                                  "Work units (512x512 image-steps) per second the node's workers can do, "
                                  "at their capacity factors.", labels=["node"])
        images = GaugeMetricFamily("kiln_capacity_images_per_s",
                                   "Images per second the node's workers can make (measured; 0 until then), "
                                   "at their capacity factors.", labels=["node"])
        nodes = getattr(self.executor, "worker_nodes", None)
        if self.core is not None and nodes is not None:
            by_node: dict[str, list[float]] = {}
            for slot, node in enumerate(nodes()):
                entry = by_node.setdefault(node, [0, 0.0])
                entry[0] += 1
                entry[1] += self.core.capacity.factor(slot)
            throughput = self.core.throughput
            for node, (count, factors) in sorted(by_node.items()):
                workers.add_metric([node], count)
                units.add_metric([node], factors * throughput.units_per_s)
                images.add_metric([node], factors * throughput.images_per_s)
        yield workers
        yield units
        yield images


class NvmlCollector(Collector):
    """GPU temperature (°C) and utilisation (0–1) per device, read at scrape time."""

    def __init__(self, pynvml: object, count: int) -> None:
        self._nvml = pynvml
        self._count = count

    @classmethod
    def create(cls) -> NvmlCollector | None:
        """None where NVML is not installed or finds no GPU: the metrics are then absent."""
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception:  # noqa: BLE001 - no driver, no library, no device: no GPU metrics
            return None
        return cls(pynvml, count) if count > 0 else None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._nvml
        temperature = GaugeMetricFamily("kiln_gpu_temperature_celsius", "GPU temperature.", labels=["gpu"])
        utilisation = GaugeMetricFamily("kiln_gpu_utilization_ratio", "GPU busy fraction.", labels=["gpu"])
        for index in range(self._count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)  # type: ignore[attr-defined]
                temp = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)  # type: ignore[attr-defined]
                util = nvml.nvmlDeviceGetUtilizationRates(handle).gpu  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - a device that stops answering is skipped, not faked
                continue
            temperature.add_metric([str(index)], float(temp))
            utilisation.add_metric([str(index)], float(util) / 100.0)
        yield temperature
        yield utilisation
