"""no_removed_items: a shard must not hold an item the removal lists name, nor one already marked removed
(e.g. a tar or code parquet restored from an old backup). Which keys are listed comes from one plan over all
status parquets (`laion_vq.removals.plan`); here each shard's tar members and code keys are compared to it."""

from __future__ import annotations

import io
import tarfile

import pyarrow.parquet as pq

from laion_vq.audit.verdict import ShardVerdict, first_keys
from laion_vq.removals.plan import REMOVED
from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.storage import StorageLayout, exists, filesystem, read_bytes


def removed_keys(layout: StorageLayout, shard: str) -> set[str]:
    """Keys the shard's status parquet marks `removed`."""
    url = layout.image_status(parse_shard_key(shard))
    if not exists(url):
        return set()
    status = pq.read_table(io.BytesIO(read_bytes(url)), columns=["key", "status"])
    return {k for k, s in zip(status.column("key").to_pylist(), status.column("status").to_pylist(), strict=True)
            if s == REMOVED}  # fmt: skip


def tar_keys(url: str) -> set[str]:
    """Sample keys of a webdataset tar, from its member headers; of a truncated tar, those before the cut
    (`image_tars_complete` reports the cut: here only what the tar still holds matters)."""
    keys: set[str] = set()
    fs, path = filesystem(url)
    with fs.open(path, "rb") as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|") as tar:
                for member in tar:
                    keys.add(member.name.split("/")[-1].split(".", 1)[0])
        except (tarfile.TarError, EOFError, OSError):
            pass
    return keys


def audit_removed_in_images(layout: StorageLayout, shard: str, listed: set[str]) -> ShardVerdict:
    """`listed`: keys of this shard the lists name and the plan still has to remove (status not `removed`)."""
    verdict = ShardVerdict(shard)
    gone = removed_keys(layout, shard)
    if listed:
        verdict.errors.append(first_keys("listed item(s) not removed yet", list(listed), "listed item not removed"))
    tar = layout.image_tar(parse_shard_key(shard))
    if exists(tar):
        held = tar_keys(tar) & (gone | listed)
        if held:
            verdict.errors.append(first_keys("removed item(s) still in the tar", list(held), "removed item in tar"))
    verdict.counts.update(removed=len(gone), listed_pending=len(listed))
    return verdict


def audit_removed_in_codes(layout: StorageLayout, folder: str, shard: str, listed: set[str]) -> ShardVerdict:
    """A code row for a listed or removed key: codes of an image that must be gone."""
    verdict = ShardVerdict(shard)
    gone = removed_keys(layout, shard) | listed
    url = layout.code_shard(folder, parse_shard_key(shard))
    if exists(url):
        try:
            keys = set(pq.read_table(io.BytesIO(read_bytes(url)), columns=["key"]).column("key").to_pylist())
        except Exception:  # an unreadable file is `code_parquets_contract`'s finding, not this one's
            keys = set()
        held = keys & gone
        if held:
            verdict.errors.append(first_keys("code row(s) of removed items", list(held), "removed item in codes"))
    verdict.counts.update(removed=len(gone))
    return verdict
