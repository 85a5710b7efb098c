"""What a download must not fetch: the rows of a metadata shard the removal lists name (by url, domain, sample id
or key) and the image hashes they name. The download stage withholds those rows before any request and drops
a hash-listed image right after its download; it knows nothing of list files."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

import pyarrow as pa

from laion_vq.removals.lists import RemovalItem, RemovalList


def _host(url: str | None) -> str:
    try:
        return (urlsplit(url or "").hostname or "").lower().rstrip(".")
    except ValueError:
        return ""


def first_items(
    lists: Sequence[RemovalList], urls: Sequence[str | None], sample_ids: Sequence[object], keys: Sequence[str]
) -> dict[int, RemovalItem]:
    """Row index → the first item (by list name, then line) naming the row by url, domain, sample id or key."""
    by_kind = _by_kind(lists)
    domains = by_kind.get("domain", {})
    named_rows: dict[int, RemovalItem] = {}
    for index, (url, sample_id, key) in enumerate(zip(urls, sample_ids, keys, strict=True)):
        candidates = [by_kind.get("url", {}).get(url or ""), by_kind.get("key", {}).get(key)]
        if sample_id is not None:
            candidates.append(by_kind.get("sample_id", {}).get(str(sample_id)))
        if domains:
            labels = _host(url).split(".")
            candidates += [domains.get(".".join(labels[i:])) for i in range(len(labels))]
        named = [c for c in candidates if c is not None]
        if named:
            named_rows[index] = min(named, key=lambda i: (i.list_name, i.line))
    return named_rows


def hash_items(lists: Sequence[RemovalList]) -> dict[str, RemovalItem]:
    """sha256 (lowercase hex) → the first item (by list name, then line) naming an image by that hash."""
    return _by_kind(lists).get("image_sha256", {})


def _by_kind(lists: Sequence[RemovalList]) -> dict[str, dict[str, RemovalItem]]:
    items = sorted((i for lst in lists for i in lst.items), key=lambda i: (i.list_name, i.line))
    by_kind: dict[str, dict[str, RemovalItem]] = {}
    for item in items:
        by_kind.setdefault(item.kind, {}).setdefault(item.value, item)
    return by_kind


def download_exclusions(
    lists: Sequence[RemovalList], rows: pa.Table, keys: Sequence[str], url_column: str = "URL"
) -> tuple[dict[int, str], dict[str, str]]:
    """(row index → reason, for rows never to request; sha256 → reason, for images to drop after download).
    `keys` are the rows' shard keys, in row order. Each row takes the reason of the first item naming it (by
    list name, then line)."""
    urls = rows.column(url_column).to_pylist() if url_column in rows.column_names else [None] * rows.num_rows
    ids = rows.column("SAMPLE_ID").to_pylist() if "SAMPLE_ID" in rows.column_names else [None] * rows.num_rows
    withheld = {index: item.reason for index, item in first_items(lists, urls, ids, keys).items()}
    hashes = {value: item.reason for value, item in hash_items(lists).items()}
    return withheld, hashes
