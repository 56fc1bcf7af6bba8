"""The image store: where image files (and an edit's uploads) live, behind one small interface with
two kinds — a directory (`storage_directory`) and an S3-compatible bucket (`storage_s3`), chosen by
the `image_store` setting. Rows in the images table are written by `jobs`; C2PA signing happens
there too, before a file reaches the store.

Every write is atomic (a reader never sees half an image); a file that is not there is `ImageGone`,
which the HTTP edge answers with 410, never a 500.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from kiln.errors import NotFound

if TYPE_CHECKING:
    from kiln.service.content_credentials import ContentCredentials

GONE_MESSAGE = ("The image file is no longer in the image store (it was deleted or lost); "
                "its record remains, the file cannot be served.")


@dataclass(frozen=True)
class StoredFile:
    """An image being read from the store: its size and its bytes, chunk by chunk."""

    size: int
    chunks: AsyncIterator[bytes]


class ImageStore(ABC):
    """Image files by relative path (`user_id/image_id.png`, `uploads/job_id/image.png`)."""

    credentials: ContentCredentials | None = None
    """Signs stored images with C2PA Content Credentials, when set."""

    @abstractmethod
    def write(self, rel_path: str, content: bytes) -> int:
        """Store `content` at `rel_path` atomically; returns its size in bytes."""

    @abstractmethod
    def read(self, rel_path: str) -> bytes:
        """The whole file; raises `ImageGone` when it is not there."""

    @abstractmethod
    def delete(self, rel_path: str) -> None:
        """Remove one file; a missing one is fine."""

    @abstractmethod
    def remove_tree(self, rel_dir: str) -> None:
        """Remove every file under `rel_dir`; a missing folder is fine."""

    @abstractmethod
    async def open(self, rel_path: str) -> StoredFile:
        """The file as a stream (for GET /v1/images/{id}/content); raises `ImageGone` at once when it
        is not there, before any byte is sent."""

    def local_path(self, rel_path: str) -> Path | None:
        """The file on this machine's disk when the store is a directory (served with sendfile;
        `ImageGone` when it is not there), None for a remote store."""
        return None

    async def signed_url(self, rel_path: str, expires_s: int) -> str | None:
        """A presigned URL a client may fetch the file from directly, when the store can make one;
        raises `ImageGone` when the file is not there."""
        return None


def checked(rel_path: str) -> str:
    """A relative path inside the store: no absolute paths, no `..`, no empty parts."""
    parts = PurePosixPath(rel_path).parts
    if not parts or rel_path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel_path:
        raise NotFound("no such image")
    return "/".join(parts)


def make_image_store(settings: Any) -> ImageStore:
    """The store the settings name (`image_store`: a directory or `s3://bucket/prefix`; unset, the
    `images_dir` directory), signing with C2PA when the signer is available."""
    from kiln.service import content_credentials

    credentials = (content_credentials.ContentCredentials(settings.data_dir / "c2pa")
                   if content_credentials.available() else None)
    where = settings.image_store
    if where is not None and where.startswith("s3://"):
        from kiln.service.storage_s3 import S3ImageStore

        return S3ImageStore.from_settings(settings, credentials)
    from kiln.service.storage_directory import DirectoryImageStore

    return DirectoryImageStore(settings.images_dir if where is None else Path(where), credentials)


def image_path(user_id: str, image_id: str, fmt: str) -> str:
    return f"{user_id}/{image_id}.{'jpg' if fmt == 'jpeg' else fmt}"


def upload_dir(job_id: str) -> str:
    return f"uploads/{job_id}"

