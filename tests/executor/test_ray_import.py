"""`ray` is imported only when the Ray executor starts: a local set-up (and the Ray executor's own
modules, until `start`) never pulls it in. Checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys


def test_ray_is_imported_only_by_a_starting_ray_executor(tmp_path):
    code = (
        "import sys\n"
        "from kiln.config import ModelSpec, load_settings\n"
        "from kiln.executor import build_executor\n"
        "import kiln.executor.ray_executor, kiln.executor.ray_worker, kiln.executor.worker_main\n"
        f"models = {{'fake': ModelSpec(path={str(tmp_path)!r}, loader='kiln.testing:load_fake_pipeline')}}\n"
        "local = build_executor(load_settings(models=models, default_model='fake', model_aliases={}))\n"
        "remote = build_executor(load_settings(models=models, default_model='fake', model_aliases={},"
        " executor='ray'))\n"
        "print(type(local).__name__, type(remote).__name__, 'ray' in sys.modules, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LocalExecutor", "RayExecutor", "False", "False"]
