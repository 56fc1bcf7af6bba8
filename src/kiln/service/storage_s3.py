"""The image store as an S3-compatible bucket (`image_store = "s3://bucket/prefix"`): AWS S3, MinIO,
Cloudflare R2, Ceph… through obstore (Rust's `object_store`). Every replica reads and writes the same
bucket, so any of them serves any image.

A PUT is atomic: an object appears whole or not at all, so no temporary names are needed. Reads on
an event loop use obstore's native async calls (nothing blocks the loop).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import obstore
from obstore.store import S3Store
from pydantic import SecretStr

from kiln.errors import ImageGone
from kiln.service.storage import GONE_MESSAGE, ImageStore, StoredFile, checked

if TYPE_CHECKING:
    from kiln.service.content_credentials import ContentCredentials

CHUNK_BYTES = 256 * 1024
CLIENT_OPTIONS = {"connect_timeout": "5s", "timeout": "60s"}


class S3ImageStore(ImageStore):
    def __init__(self, store: S3Store, credentials: ContentCredentials | None = None) -> None:
        self.store = store
        self.credentials = credentials

    @classmethod
    def from_settings(cls, settings: Any, credentials: ContentCredentials | None = None) -> S3ImageStore:
        """From `image_store` and the `s3_*` settings; what they leave unset comes from the usual
        AWS_* environment variables (and instance credentials)."""
        config: dict[str, Any] = {}
        if settings.s3_endpoint_url:
            config["endpoint"] = settings.s3_endpoint_url
        if settings.s3_region:
            config["region"] = settings.s3_region
        if settings.s3_access_key_id:
            config["access_key_id"] = settings.s3_access_key_id
        if (secret := settings.s3_secret_access_key) is not None:
            config["secret_access_key"] = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        store = S3Store.from_url(settings.image_store.rstrip("/"), config=config,
                                 client_options={**CLIENT_OPTIONS, "allow_http": settings.s3_allow_http})
        return cls(store, credentials)

    def write(self, rel_path: str, content: bytes) -> int:
        obstore.put(self.store, checked(rel_path), content)
        return len(content)

    def read(self, rel_path: str) -> bytes:
        try:
            return bytes(obstore.get(self.store, checked(rel_path)).bytes())
        except FileNotFoundError:
            raise ImageGone(GONE_MESSAGE) from None

    def delete(self, rel_path: str) -> None:
        try:
            obstore.delete(self.store, checked(rel_path))
        except FileNotFoundError:
            pass

    def remove_tree(self, rel_dir: str) -> None:
        prefix = checked(rel_dir)
        paths = [meta["path"] for batch in obstore.list(self.store, prefix) for meta in batch]
        if paths:
            obstore.delete(self.store, paths)

    async def open(self, rel_path: str) -> StoredFile:
        try:
            result = await obstore.get_async(self.store, checked(rel_path))
        except FileNotFoundError:
            raise ImageGone(GONE_MESSAGE) from None

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in result.stream(min_chunk_size=CHUNK_BYTES):
                yield bytes(chunk)

        return StoredFile(int(result.meta["size"]), chunks())

    async def signed_url(self, rel_path: str, expires_s: int) -> str:
        path = checked(rel_path)
        try:  # a URL to nothing helps no one: say so here, with the reason
            await obstore.head_async(self.store, path)
        except FileNotFoundError:
            raise ImageGone(GONE_MESSAGE) from None
        return await obstore.sign_async(self.store, "GET", path, dt.timedelta(seconds=expires_s))
