"""Which GPUs this machine lets Kiln use, found without torch (the parent never imports it), and
which GPU each local worker is pinned to."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

_GPU_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may hand out: the entries of CUDA_VISIBLE_DEVICES when it is set (an
    empty value or `-1` hides them all), else the indices `nvidia-smi -L` lists; none without it."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        devices = [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        return [] if not devices or devices[0].startswith("-") else devices
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi -L failed (%s); treating this machine as having no GPU", exc)
        return []
    return _GPU_LINE.findall(listed)


def worker_gpus(workers: int | str, gpus: Sequence[str]) -> list[str | None]:
    """The GPU of each worker slot: `auto` is one worker per GPU (one unpinned worker without GPUs);
    a number of workers takes the GPUs in turn (more workers than GPUs share them)."""
    if workers == "auto":
        return list(gpus) or [None]
    count = int(workers)
    return [gpus[i % len(gpus)] if gpus else None for i in range(count)]
