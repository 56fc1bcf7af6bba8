"""The app factory's path: settings → registry → LocalExecutor → engine, one job end to end."""

from __future__ import annotations

from engine.recorder import EventRecorder

from kiln.config import ModelSpec, load_settings
from kiln.engine import BatchKey, Completed, EngineMetrics, EngineRequest, build_local_engine
from kiln.testing import prompt_colour


async def test_build_local_engine_from_settings(tmp_path):
    from prometheus_client import CollectorRegistry

    settings = load_settings(
        models={"fake": ModelSpec(path=tmp_path, loader="kiln.testing:load_fake_pipeline", options={"step_s": 0.0})},
        default_model="fake",
        model_aliases={},
        workers=1,
        torch_threads=1,
        max_batch_size=4,
        max_batch_wait_s=0.0,
    )
    registry = CollectorRegistry()
    engine, executor = build_local_engine(settings, metrics=EngineMetrics(registry))
    assert engine.core.config.max_batch_images == 4
    recorder = EventRecorder()
    engine.add_listener(recorder)
    executor.start()
    await engine.start()
    try:
        key = BatchKey("fake", "generate", 48, 40, 3, 7.5)
        engine.add_request(EngineRequest("j1", "u", "free", key, "a kiln", seed=5, n=2))
        done = await recorder.wait("j1", timeout_s=60)
        assert isinstance(done, Completed) and len(done.images) == 2
        second = done.images[1].image()
        assert second.size == (48, 40) and second.getpixel((0, 0)) == prompt_colour("a kiln", 6)
        assert registry.get_sample_value("kiln_images_generated_total") == 2
    finally:
        await engine.stop()
        executor.shutdown()
