"""Removal lists: what must be taken out of every shard already made, and why.

Files under `removals/` at the storage root, CSV or parquet, one item per row, written by operators or
tools (a takedown request, a hash list from a child-protection partner, a diff against Re-LAION-5B):

    url,domain,sample_id,key,image_sha256,reason,date
    https://host.example/a.jpg,,,,,takedown request 2024-117,2024-09-02
    ,tracker.example,,,,domain owner asked to be removed,2024-09-03
    ,,,,9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08,hash list IWF,2024-08-30

A row names exactly one item by one identifier: `url` (exact), `domain` (every URL on that host or its
subdomains), `sample_id` (the metadata's SAMPLE_ID), `key` (our shard key, `000120017`) or `image_sha256`
(the original download's `sha256` or the stored JPEG's `jpg_sha256`); `reason` and `date` (YYYY-MM-DD)
are required. Only identifier columns, `reason` and `date` may appear, so a misspelt column is an error and
never an item silently ignored. A malformed row is a `RemovalListError` naming the file and the line (CSV)
or row (parquet): nothing is applied from a list that does not parse, and the other lists are applied in
full (`read_lists_skipping_broken`), so a typo in one list never holds up another's takedown and no shard is
judged against half a list. `removals/applied.parquet` beside them is the ledger of what was removed
(`read_ledger`, `append_ledger`), not a list.

What Re-LAION publishes (checked from secondary reports of LAION's announcement, laion.ai/blog/relaion-5b,
30 Aug 2024; the post itself could not be read from here): 2,236 links were removed after matching LAION-5B
against link and image hash lists supplied by the Internet Watch Foundation and the Canadian Centre for Child
Protection (these include the 1,008 links of the Stanford Internet Observatory's December 2023 report), and
third parties are told to clean their derivatives by diffing against the cleaned Re-LAION-5B metadata
(`laion/relaion2B-en-research`, `…-multi-…`, `…1B-nolang-…`, and `-research-safe` variants that also drop
NSFW rows; gated on Hugging Face). As far as we know no file of the removed items (URL hashes, URL+caption
hashes, sample ids) was published, and the partners' hash lists are not public; this may be wrong and should
be checked against the post. So there is no published removal form to read here: what LAION publishes is
a keep-list, and turning it into a `url` list in the format above is a separate anti-join of our metadata
against billions of Re-LAION rows (against `-research-safe` it would also remove NSFW rows, not only the
2,236 links).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import polars as pl
import pyarrow.parquet as pq
from polars.datatypes import DataTypeClass

from laion_vq.shards.storage import TMP_MARKER, StorageLayout, exists, filesystem, publish_bytes, read_bytes

#: The identifier columns, in the order a row is reported in.
IDENTIFIERS = ("url", "domain", "sample_id", "key", "image_sha256")
COLUMNS = (*IDENTIFIERS, "reason", "date")
LISTS_DIR = "removals"
#: The ledger of applied removals lives beside the lists and is not one.
LEDGER_NAME = "applied.parquet"
SUFFIXES = (".csv", ".parquet")
#: One row per (item, key) removed; the item as listed, never the removed content.
LEDGER_SCHEMA: dict[str, pl.DataType | DataTypeClass] = {
    "kind": pl.String,
    "item": pl.String,
    "list_name": pl.String,
    "list_sha256": pl.String,
    "line": pl.Int64,
    "date": pl.Date,
    "reason": pl.String,
    "shard": pl.String,
    "key": pl.String,
    "files_changed": pl.List(pl.String),
    "applied_at": pl.Datetime("us", "UTC"),
}
_LEDGER_IDENTITY = ("list_sha256", "kind", "item", "shard", "key")

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_HOST = re.compile(r"(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")
_KEY = re.compile(r"\d{6,}")


class RemovalListError(ValueError):
    """A removal list that cannot be trusted: names the file, the line (or row) and what is wrong."""


@dataclass(frozen=True)
class RemovalItem:
    """One row of one list. `value` is normalised: hashes and domains lowercase, sample ids as decimal."""

    list_name: str
    line: int
    kind: str
    value: str
    reason: str
    date: dt.date


@dataclass(frozen=True)
class RemovalList:
    """A parsed list: its file name, the sha256 of its bytes (what the ledger cites) and its items."""

    name: str
    sha256: str
    items: tuple[RemovalItem, ...]

    @property
    def count(self) -> int:
        return len(self.items)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value).strip()


def _normalise(kind: str, raw: str) -> str:
    """The identifier as matched against the status parquets, or ValueError saying what is wrong."""
    if kind == "url":
        if "://" not in raw or any(c.isspace() for c in raw.strip()):
            raise ValueError(f"url {raw!r} is not an absolute URL")
        return raw
    if kind == "domain":
        host = raw.lower().rstrip(".")
        if host.startswith("*."):
            host = host[2:]
        if not _HOST.fullmatch(host):
            raise ValueError(f"domain {raw!r} is not a host name like example.com")
        return host
    if kind == "sample_id":
        if not raw.isdigit() or int(raw) >= 2**63:
            raise ValueError(f"sample_id {raw!r} is not a non-negative 64-bit integer")
        return str(int(raw))
    if kind == "key":
        if not _KEY.fullmatch(raw):
            raise ValueError(f"key {raw!r} is not a shard key (shard digits then sample digits, e.g. 000120017)")
        return raw
    if not _SHA256.fullmatch(raw):
        raise ValueError(f"image_sha256 {raw!r} is not 64 hex characters")
    return raw.lower()


def _parse_row(cells: Mapping[str, object], name: str, where: str, line: int) -> RemovalItem:
    given = [(kind, _text(cells.get(kind))) for kind in IDENTIFIERS]
    given = [(kind, raw) for kind, raw in given if raw]
    if not given:
        raise RemovalListError(f"{where}: no identifier (one of {', '.join(IDENTIFIERS)})")
    if len(given) > 1:
        raise RemovalListError(f"{where}: {len(given)} identifiers ({', '.join(k for k, _ in given)}), exactly one")
    kind, raw = given[0]
    reason, date = _text(cells.get("reason")), _text(cells.get("date"))
    if not reason:
        raise RemovalListError(f"{where}: reason is empty")
    try:
        if not _DATE.fullmatch(date):
            raise ValueError
        day = dt.date.fromisoformat(date)
    except ValueError:
        raise RemovalListError(f"{where}: date {date!r} is not a date YYYY-MM-DD") from None
    try:
        value = _normalise(kind, raw)
    except ValueError as err:
        raise RemovalListError(f"{where}: {err}") from None
    return RemovalItem(name, line, kind, value, reason, day)


def _check_columns(columns: Iterable[str], source: str) -> None:
    columns = list(columns)
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise RemovalListError(f"{source}: unknown column(s) {unknown}; allowed: {', '.join(COLUMNS)}")
    missing = [c for c in ("reason", "date") if c not in columns]
    if missing or not any(c in columns for c in IDENTIFIERS):
        need = missing or [f"one of {', '.join(IDENTIFIERS)}"]
        raise RemovalListError(f"{source}: missing column(s) {need}")
    if len(set(columns)) != len(columns):
        raise RemovalListError(f"{source}: a column appears twice in {columns}")


def _rows_csv(data: bytes, source: str) -> Iterable[tuple[int, dict[str, str], str]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RemovalListError(f"{source}: not UTF-8 text ({err})") from None
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    for row in reader:
        line = reader.line_num
        if not row or not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [cell.strip().lower() for cell in row]
            _check_columns(header, f"{source}: line {line} (header)")
            continue
        if len(row) != len(header):
            raise RemovalListError(f"{source}: line {line} has {len(row)} fields, the header {len(header)}")
        yield line, dict(zip(header, row, strict=True)), f"{source}: line {line}"


def _rows_parquet(data: bytes, source: str) -> Iterable[tuple[int, dict[str, object], str]]:
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as err:  # an unreadable list is a list that does not parse
        raise RemovalListError(f"{source}: unreadable parquet: {type(err).__name__}: {err}") from None
    _check_columns(table.column_names, source)
    for row_number, row in enumerate(table.to_pylist(), start=1):
        yield row_number, row, f"{source}: row {row_number}"


def parse_removal_list(data: bytes, name: str, source: str | None = None) -> RemovalList:
    """A list file's bytes → its items; any malformed row fails the whole list (RemovalListError)."""
    source = source or name
    rows = _rows_parquet(data, source) if name.endswith(".parquet") else _rows_csv(data, source)
    items: list[RemovalItem] = []
    seen: dict[tuple[str, str], int] = {}
    for line, cells, where in rows:
        item = _parse_row(cells, name, where, line)
        first = seen.setdefault((item.kind, item.value), line)
        if first != line:
            raise RemovalListError(f"{where}: {item.kind} {item.value!r} is already listed at {first}")
        items.append(item)
    return RemovalList(name=name, sha256=hashlib.sha256(data).hexdigest(), items=tuple(items))


def lists_dir(layout: StorageLayout) -> str:
    return f"{layout.root.rstrip('/')}/{LISTS_DIR}"


def lists_signature(layout: StorageLayout) -> tuple:
    """What the lists folder holds now — names, sizes and modification times (or ETags) — from one listing, reading
    no list: cheap enough to ask before every shard, so a list landing mid-run is seen (empty: no list)."""
    fs, path = filesystem(lists_dir(layout))
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return ()
    return tuple(
        sorted(
            (str(e["name"]), int(e.get("size") or 0), str(e.get("mtime") or e.get("LastModified") or e.get("ETag")))
            for e in entries
        )
    )


def ledger_url(layout: StorageLayout) -> str:
    return f"{lists_dir(layout)}/{LEDGER_NAME}"


@dataclass(frozen=True)
class BrokenList:
    """A list under `removals/` that does not parse: its file name and the error, naming the file and line."""

    name: str
    error: str


def read_lists_skipping_broken(layout: StorageLayout) -> tuple[list[RemovalList], list[BrokenList]]:
    """Every list under `removals/` (CSV or parquet, by file name): those that parse, and those that do not,
    which contribute nothing (all of a list or none of it); none when the folder is missing."""
    fs, path = filesystem(lists_dir(layout))
    if not fs.exists(path):
        return [], []
    names = sorted(
        p.rsplit("/", 1)[-1]
        for p in fs.ls(path, detail=False, refresh=True)  # s3fs would answer from its listing cache
        if p.endswith(SUFFIXES) and TMP_MARKER not in p and not p.endswith("/" + LEDGER_NAME)
    )
    lists, broken = [], []
    for name in names:
        url = f"{lists_dir(layout)}/{name}"
        try:
            lists.append(parse_removal_list(read_bytes(url), name, source=url))
        except RemovalListError as err:
            broken.append(BrokenList(name, str(err)))
    return lists, broken


def read_removal_lists(layout: StorageLayout) -> list[RemovalList]:
    """Every list under `removals/`, parsed; the first that does not parse raises RemovalListError (for a
    reader that must not act on fewer lists than there are, such as the download)."""
    lists, broken = read_lists_skipping_broken(layout)
    if broken:
        raise RemovalListError(broken[0].error)
    return lists


def read_ledger(layout: StorageLayout) -> pl.DataFrame:
    """Every removal applied so far (empty when none was)."""
    url = ledger_url(layout)
    if not exists(url):
        return pl.DataFrame(schema=LEDGER_SCHEMA)
    return pl.read_parquet(read_bytes(url))


def append_ledger(layout: StorageLayout, rows: list[dict]) -> None:
    """Add rows, keeping the first record of an (item, key) already there, so a re-run after a crash adds none."""
    old = read_ledger(layout)
    new = pl.DataFrame(rows, schema=LEDGER_SCHEMA)
    merged = pl.concat([old, new]).unique(subset=list(_LEDGER_IDENTITY), keep="first", maintain_order=True)
    if merged.height == old.height:
        return
    buffer = io.BytesIO()
    merged.write_parquet(buffer, compression="zstd")
    publish_bytes(buffer.getvalue(), ledger_url(layout))
