"""What a stage reads from the stage before it: missing files name the asset to materialize first."""

from __future__ import annotations

from laion_vq.shards.storage import exists, read_bytes


def require_upstream(url: str, upstream: str, read: bool = True) -> bytes:
    """The upstream file's bytes; a missing file says which asset to materialize first."""
    if not exists(url):
        raise FileNotFoundError(f"{url} does not exist: materialize {upstream} for this shard first")
    return read_bytes(url) if read else b""
