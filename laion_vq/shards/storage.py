"""Where every file lives, and how it gets there atomically.

Layout under the storage root (a local path or any fsspec URL such as `s3://bucket/prefix`):

    metadata/NNNNN.parquet            the shard's LAION rows
    images/NNNNN.tar                  img2dataset webdataset tar (successes only)
    images/NNNNN.parquet              img2dataset status: one row per metadata row
    images/NNNNN_stats.json           img2dataset counters
    codes/<model>/NNNNN.parquet       VQGAN codes in the seed dataset's format

Every write goes through `publish_file`/`publish_bytes`: a temporary name in the same folder then a
rename on a local disk, a single object PUT on an object store. A crashed or repeated run therefore
leaves the old file or the new one, never a partial file under the final name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from laion_vq.shards.numbering import shard_key

TMP_MARKER = ".tmp-"


@dataclass(frozen=True)
class StorageLayout:
    """Paths of every shard artefact under one root."""

    root: str

    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def metadata_shard(self, shard_id: int) -> str:
        return self._join("metadata", f"{shard_key(shard_id)}.parquet")

    def images_dir(self) -> str:
        return self._join("images")

    def image_tar(self, shard_id: int) -> str:
        return self._join("images", f"{shard_key(shard_id)}.tar")

    def image_status(self, shard_id: int) -> str:
        return self._join("images", f"{shard_key(shard_id)}.parquet")

    def image_stats(self, shard_id: int) -> str:
        return self._join("images", f"{shard_key(shard_id)}_stats.json")

    def codes_dir(self, model: str) -> str:
        return self._join("codes", model)

    def code_shard(self, model: str, shard_id: int) -> str:
        return self._join("codes", model, f"{shard_key(shard_id)}.parquet")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and in-filesystem path for a local path or URL."""
    return fsspec.core.url_to_fs(url)


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(fs.size(path))


def publish_file(local_path: str, dest_url: str) -> int:
    """Put a finished local file at `dest_url` atomically; returns its size in bytes.

    Local destination: copy beside the target under a temporary name, fsync, then `os.replace`
    (atomic on POSIX). Object stores: one PUT (an object is visible whole or not at all).
    """
    nbytes = os.path.getsize(local_path)
    fs, dest = filesystem(dest_url)
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(dest) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{os.path.basename(dest)}{TMP_MARKER}{uuid.uuid4().hex}")
        try:
            with open(local_path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=8 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fs.put_file(local_path, dest)
    return nbytes


def publish_bytes(data: bytes, dest_url: str) -> int:
    """`publish_file` for an in-memory payload."""
    with tempfile.NamedTemporaryFile(delete=False) as tmp:
        tmp.write(data)
    try:
        return publish_file(tmp.name, dest_url)
    finally:
        os.unlink(tmp.name)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def sha256_of(url: str, chunk: int = 8 << 20) -> str:
    """Hex sha256 of a file's bytes, streamed (a checkpoint is hundreds of MB): its identity in provenance."""
    fs, path = filesystem(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
