"""Which list removed each removed row of a shard, and why: what the shard's page shows, so a removed key can be
traced to its list and reason without opening the ledger.

A row taken out after its download is in the ledger (list, line, reason). A row withheld at download carries
only its reason (`failure_reason`): its list is found by matching the row against the lists as the download
did (`downloads.first_items`, `downloads.hash_items`). A row no list on storage names any more (its list was
deleted) keeps its reason and names no list.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pyarrow.parquet as pq

from laion_vq.removals.downloads import first_items, hash_items
from laion_vq.removals.lists import RemovalList, read_ledger
from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.schema import REMOVED_STATUS
from laion_vq.shards.storage import StorageLayout, read_bytes

_COLUMNS = ("key", "status", "failure_reason", "url", "SAMPLE_ID", "sha256", "jpg_sha256")


@dataclass(frozen=True)
class RemovedKey:
    """One removed row: its key, the list that named it (None: no list on storage does) and the reason."""

    key: str
    list_name: str | None
    reason: str | None


def removed_keys(layout: StorageLayout, shard: str, lists: list[RemovalList]) -> list[RemovedKey]:
    """Every row of the shard's status parquet marked removed, by key, with its list and reason."""
    url = layout.image_status(parse_shard_key(shard))
    data = read_bytes(url)
    names = pq.read_schema(io.BytesIO(data)).names
    table = pq.read_table(io.BytesIO(data), columns=[c for c in _COLUMNS if c in names])
    rows = [row for row in table.to_pylist() if row["status"] == REMOVED_STATUS]
    if not rows:
        return []
    ledger = read_ledger(layout)
    recorded: dict[str, tuple[str, str]] = {}
    if ledger.height:
        mine = ledger.filter(ledger["shard"] == shard).sort("key", "list_name", "line")
        for key, list_name, reason in mine.select("key", "list_name", "reason").iter_rows():
            recorded.setdefault(key, (list_name, reason))
    named = first_items(
        lists, [r.get("url") for r in rows], [r.get("SAMPLE_ID") for r in rows], [r["key"] for r in rows]
    )
    hashes = hash_items(lists)
    out = []
    for index, row in enumerate(rows):
        if row["key"] in recorded:
            list_name, reason = recorded[row["key"]]
            out.append(RemovedKey(row["key"], list_name, reason))
            continue
        item = named.get(index) or hashes.get(row.get("sha256") or "") or hashes.get(row.get("jpg_sha256") or "")
        out.append(RemovedKey(row["key"], item.list_name if item else None, row.get("failure_reason")))
    return sorted(out, key=lambda r: r.key)
