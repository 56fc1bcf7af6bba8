"""The engine never pulls in torch, SQLAlchemy or FastAPI: checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys


def test_engine_imports_no_heavy_layers():
    code = (
        "import sys, kiln.engine, kiln.executor, kiln.engine.admission, kiln.engine.loop, kiln.engine.limits,"
        " kiln.engine.core, kiln.engine.forming, kiln.engine.positions, kiln.engine.sharing, kiln.engine.queues,"
        " kiln.engine.jobs, kiln.engine.update, kiln.executor.messages;"
        "bad = [m for m in ('torch', 'sqlalchemy', 'fastapi', 'kiln.db', 'kiln.api', 'kiln.service')"
        " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
