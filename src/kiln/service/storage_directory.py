"""The image store as a directory on this machine (the default, `./var/images`). Every replica that
must serve the images needs the same directory (one machine, or a shared file system); for a
cluster, use an S3-compatible bucket (`storage_s3`).

Files are written to a temporary name in the same folder and renamed: a reader never sees half an
image.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.errors import ImageGone, NotFound
from kiln.service.storage import GONE_MESSAGE, ImageStore, StoredFile, checked

if TYPE_CHECKING:
    from kiln.service.content_credentials import ContentCredentials

CHUNK_BYTES = 256 * 1024


class DirectoryImageStore(ImageStore):
    def __init__(self, root: Path | str, credentials: ContentCredentials | None = None) -> None:
        self.root = Path(root).resolve()
        self.credentials = credentials

    def _resolve(self, rel_path: str) -> Path:
        path = (self.root / checked(rel_path)).resolve()
        if not path.is_relative_to(self.root):
            raise NotFound("no such image")
        return path

    def write(self, rel_path: str, content: bytes) -> int:
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
        try:
            return self._resolve(rel_path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ImageGone(GONE_MESSAGE) from None

    def delete(self, rel_path: str) -> None:
        self._resolve(rel_path).unlink(missing_ok=True)

    def remove_tree(self, rel_dir: str) -> None:
        shutil.rmtree(self._resolve(rel_dir), ignore_errors=True)

    def local_path(self, rel_path: str) -> Path:
        path = self._resolve(rel_path)
        if not path.is_file():
            raise ImageGone(GONE_MESSAGE)
        return path

    async def open(self, rel_path: str) -> StoredFile:
        path = self.local_path(rel_path)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise ImageGone(GONE_MESSAGE) from None

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                    yield chunk
            finally:
                handle.close()

        return StoredFile(os.fstat(handle.fileno()).st_size, chunks())
