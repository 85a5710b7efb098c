"""Apply a removal plan to one shard: every file that holds a removed sample loses it, atomically.

Files are rewritten, each published atomically, in this order: every code version `codes/*/NNNNN.parquet`
(rows dropped, key-value metadata kept, `code_usage` recomputed), the tar (the removed samples' byte ranges
cut out: every other member keeps its exact header and data bytes), the stats json, the ledger
`removals/applied.parquet`, and last the status parquet, whose rows turn `removed` with the list's reason as
`failure_reason`. The status row is the commit point: until it says `removed` the plan finds the item again
and a re-run finishes what a crash left (each step skips a file that no longer holds the key); once it does,
every other file is done. A removed row also loses what describes the content (`caption`, `error_message`,
`exif`); its key, url, SAMPLE_ID and hashes stay, as identifiers (what the lists themselves name), so an
item stays recognisable as removed, as it is after a download that withheld it. The ledger holds each item's
identifier as listed, never a caption. A shard with nothing to remove is not opened for writing.

The code parquets' `undecodable`/`undecodable_keys` and `source_tar_bytes` record what the encoder saw and
are left as they were.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laion_vq.removals.lists import RemovalList, append_ledger
from laion_vq.removals.plan import REMOVED, Match, RemovalPlan
from laion_vq.report.usage import pack_code_usage
from laion_vq.shards.codes import write_codes_parquet
from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.schema import FILTERED_STATUS as FILTERED
from laion_vq.shards.storage import (
    StorageLayout,
    disk_full_as_error,
    exists,
    filesystem,
    is_local,
    publish_bytes,
    publish_file,
    read_bytes,
    require_free_space,
)

#: Status columns cleared on a removed row: they could lead back to the removed content.
CLEARED_COLUMNS = ("caption", "error_message", "exif")
FAILED = ("failed_to_download", "failed_to_resize")
EXAMPLES_PER_REASON = 3


@dataclass(frozen=True)
class ShardRemoval:
    """What applying a shard did: the keys it turned `removed` and the files it rewrote (root-relative)."""

    shard: str
    keys: tuple[str, ...]
    files_changed: tuple[str, ...]
    seconds: float


def _relative(layout: StorageLayout, url: str) -> str:
    return url[len(layout.root.rstrip("/")) + 1 :]


def _code_usage(table: pa.Table, n_embed: int) -> str:
    blobs = table.column("code").to_pylist()
    values = np.frombuffer(b"".join(blobs), dtype="<i2")
    if values.size and (int(values.min()) < 0 or int(values.max()) >= n_embed):
        raise ValueError(f"codes outside [0, {n_embed}) (span [{values.min()}, {values.max()}])")
    return pack_code_usage(np.bincount(values, minlength=n_embed))


def remove_code_rows(url: str, keys: set[str]) -> set[str]:
    """Drop `keys`' rows from one code parquet, keeping its key-value metadata; returns the keys it held."""
    table = pq.read_table(io.BytesIO(read_bytes(url)))
    held = pc.is_in(table.column("key"), value_set=pa.array(sorted(keys), pa.string()))
    found = set(table.filter(held).column("key").to_pylist())
    if not found:
        return found
    kept = table.filter(pc.invert(held))
    raw = (table.schema.metadata or {}).get(b"laion_vq")
    if raw is None:
        buffer = io.BytesIO()
        pq.write_table(kept, buffer, compression="zstd")
        publish_bytes(buffer.getvalue(), url)
        return found
    meta = json.loads(raw)
    if "code_usage" in meta:
        meta["code_usage"] = _code_usage(kept, int(meta["n_embed"]))
    with disk_full_as_error(url, staging=tempfile.gettempdir()):  # through a local temp parquet, then published
        write_codes_parquet(kept, url, meta)
    return found


BLOCK = 512


def _number(field: bytes) -> int:
    """A tar header number: octal text, or base-256 when the high bit is set (GNU, for large values)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.strip(b"\0 ")
    return int(text, 8) if text else 0


def tar_members(f: BinaryIO, url: str) -> Iterator[tuple[str, int, int]]:
    """(key, start, end) of every member of an uncompressed tar, from its first header (pax or GNU long-name
    records included) to the end of its padded data, reading headers only: `tarfile` builds a TarInfo per
    header, 3× slower on 30,000 members."""
    position, start, name = 0, None, None
    while True:
        f.seek(position)
        header = f.read(BLOCK)
        if len(header) < BLOCK:
            raise ValueError(f"{url}: tar ends inside a header at byte {position}")
        if header == bytes(BLOCK):
            return
        if sum(header[:148]) + 256 + sum(header[156:]) != _number(header[148:156]):
            raise ValueError(f"{url}: bad tar header checksum at byte {position}")
        size, kind = _number(header[124:136]), header[156:157]
        end = position + BLOCK + -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"L"):  # a pax record or GNU long name for the next header
            payload = f.read(size)
            start = position if start is None else start
            if kind == b"L":
                name = payload.rstrip(b"\0").decode("utf-8", "replace")
            for record in payload.decode("utf-8", "replace").splitlines():
                field, _, value = record.partition(" ")[2].partition("=")
                if field == "path":
                    name = value
        elif kind != b"g":  # a global pax header belongs to no member: its bytes stay
            if name is None:
                name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
                if header[257:262] == b"ustar" and header[345] != 0:
                    name = header[345:500].rstrip(b"\0").decode("utf-8", "replace") + "/" + name
            yield name.rsplit("/", 1)[-1].partition(".")[0], position if start is None else start, end
            start, name = None, None
        position = end


def _copy(src: BinaryIO, dst: BinaryIO, start: int, stop: int | None) -> None:
    src.seek(start)
    left = None if stop is None else stop - start
    while left is None or left > 0:
        block = src.read(8 << 20 if left is None else min(8 << 20, left))
        if not block:
            break
        dst.write(block)
        if left is not None:
            left -= len(block)


def remove_tar_samples(url: str, keys: set[str]) -> set[str]:
    """Cut `keys`' members out of a webdataset tar (headers, pax records and data padding, byte for byte);
    every other byte, the end-of-archive blocks included, is copied as it was. Returns the keys it held."""
    with tempfile.TemporaryDirectory(prefix="laion_vq_removal_") as scratch:
        if is_local(url):
            source = filesystem(url)[1]
        else:
            source = os.path.join(scratch, "source.tar")
            fs, path = filesystem(url)
            remote_bytes = int(fs.size(path))
            with disk_full_as_error(source, remote_bytes):  # the scratch copy of a remote tar
                require_free_space(source, remote_bytes)
                fs.get_file(path, source)
        with open(source, "rb") as src:
            members = list(tar_members(src, url))
        cuts = [(start, end) for key, start, end in members if key in keys]
        found = {key for key, _, _ in members if key in keys}
        if not found:
            return found
        output = os.path.join(scratch, "rewritten.tar")
        needed = os.path.getsize(source) - sum(stop - start for start, stop in cuts)  # known before writing
        with disk_full_as_error(output, needed):
            require_free_space(output, needed)
            try:
                with open(source, "rb") as src, open(output, "wb") as dst:
                    position = 0
                    for start, stop in cuts:
                        _copy(src, dst, position, start)
                        position = stop
                    _copy(src, dst, position, None)
            except OSError:
                if os.path.exists(output):  # gone before the error measures the free space
                    os.unlink(output)
                raise
        with open(output, "rb") as check:
            remaining = [key for key, _, _ in tar_members(check, output)]
        if len(remaining) != len(members) - len(cuts) or keys & set(remaining):
            raise RuntimeError(
                f"{url}: rewritten tar holds {len(remaining)} members, expected {len(members) - len(cuts)}"
            )
        publish_file(output, url)
    return found


def removed_status(status: pa.Table, reasons: dict[str, str]) -> pa.Table:
    """The status table with `reasons`' keys turned `removed` (reason in `failure_reason`), content cleared."""
    keys = status.column("key").to_pylist()
    mask = pa.array([k in reasons for k in keys], pa.bool_())
    columns = {name: status.column(name) for name in status.column_names}
    columns["status"] = pc.if_else(mask, pa.scalar(REMOVED, status.schema.field("status").type), columns["status"])
    old_reasons = columns["failure_reason"].to_pylist() if "failure_reason" in columns else [None] * len(keys)
    columns["failure_reason"] = pa.array([reasons.get(k, r) for k, r in zip(keys, old_reasons, strict=True)])
    for name in CLEARED_COLUMNS:
        if name in columns:
            columns[name] = pc.if_else(mask, pa.scalar(None, columns[name].type), columns[name])
    return pa.table(columns, metadata=status.schema.metadata)


def recount_stats(stats: dict, status: pa.Table) -> dict:
    """img2dataset's counters and our reason counts and examples, recomputed from the status table
    (metadata rows = successes + failures + removed), so a repeated write gives the same file."""
    rows = status.select([c for c in ("status", "error_message", "failure_reason", "url") if c in status.column_names])
    rows = rows.to_pylist()
    states = Counter(row["status"] for row in rows)
    out = dict(stats)
    out.update(count=len(rows), successes=states["success"], removed=states[REMOVED])
    if states[FILTERED] or FILTERED in stats:
        out[FILTERED] = states[FILTERED]
    out.update({name: states[name] for name in FAILED})
    failed = [row for row in rows if row["status"] in FAILED]
    if "status_dict" in stats:
        counts = Counter(row.get("error_message") for row in failed)
        out["status_dict"] = {"success": states["success"], **{str(k): v for k, v in counts.items()}}
        out["status_dict"][REMOVED] = states[REMOVED]
        if states[FILTERED]:
            out["status_dict"][FILTERED] = states[FILTERED]
    by_reason = Counter(row.get("failure_reason") or row["status"] for row in failed)
    examples: dict[str, list[str]] = {}
    for row in failed:
        reason = row.get("failure_reason") or row["status"]
        if len(examples.setdefault(reason, [])) < EXAMPLES_PER_REASON and row.get("url"):
            examples[reason].append(row["url"])
    removed_reasons = Counter(row.get("failure_reason") or REMOVED for row in rows if row["status"] == REMOVED)
    extra = dict(stats.get("laion_vq", {}))
    extra.update(
        failures_by_reason=dict(by_reason.most_common()),
        failure_examples=examples,
        removed_by_reason=dict(removed_reasons.most_common()),  # as the download stage counts them
    )
    out["laion_vq"] = extra
    return out


def apply_shard(
    layout: StorageLayout,
    shard: str,
    matches: Sequence[Match],
    lists: Sequence[RemovalList],
    now: dt.datetime | None = None,
) -> ShardRemoval:
    """Remove the matched keys from shard `shard`'s code parquets, tar and stats, record them in the ledger,
    and last turn their status rows `removed`; a key takes the reason of its first item (by list, then line).
    Keys already `removed` are skipped, so a shard whose work is done is not touched."""
    started = time.perf_counter()
    shard_id = parse_shard_key(shard)
    status_url = layout.image_status(shard_id)
    status = pq.read_table(io.BytesIO(read_bytes(status_url)))
    current = dict(zip(status.column("key").to_pylist(), status.column("status").to_pylist(), strict=True))
    unknown = sorted({m.key for m in matches} - set(current))
    if unknown:
        raise KeyError(f"{status_url} has no row for key(s) {unknown[:5]}: the plan is out of date, plan again")
    ordered = sorted(matches, key=lambda m: (m.key, m.item.list_name, m.item.line))
    reasons: dict[str, str] = {}
    for match in ordered:
        if current[match.key] != REMOVED:
            reasons.setdefault(match.key, match.item.reason)
    if not reasons:
        return ShardRemoval(shard, (), (), time.perf_counter() - started)
    keys = set(reasons)
    changed: dict[str, list[str]] = {key: [] for key in keys}
    fs, codes_root = filesystem(f"{layout.root.rstrip('/')}/codes")
    fs.invalidate_cache(codes_root)  # a code version added since this process listed the folder
    for path in sorted(fs.glob(f"{codes_root}/*/{shard}.parquet")):
        url = layout.code_shard(path.rstrip("/").split("/")[-2], shard_id)
        for key in remove_code_rows(url, keys):
            changed[key].append(_relative(layout, url))
    tar_url = layout.image_tar(shard_id)
    if exists(tar_url):
        for key in remove_tar_samples(tar_url, keys):
            changed[key].append(_relative(layout, tar_url))
    new_status = removed_status(status, reasons)
    stats_url = layout.image_stats(shard_id)
    if exists(stats_url):
        stats = json.loads(read_bytes(stats_url))
        recounted = recount_stats(stats, new_status)
        if recounted != stats:
            publish_bytes(json.dumps(recounted, indent=2).encode("utf-8"), stats_url)
            for key in keys:
                changed[key].append(_relative(layout, stats_url))
    for key in keys:
        changed[key].append(_relative(layout, status_url))
    sha = {lst.name: lst.sha256 for lst in lists}
    when = now or dt.datetime.now(dt.UTC)
    ledger = [
        {
            "kind": m.item.kind,
            "item": m.item.value,
            "list_name": m.item.list_name,
            "list_sha256": sha[m.item.list_name],
            "line": m.item.line,
            "date": m.item.date,
            "reason": m.item.reason,
            "shard": shard,
            "key": m.key,
            "files_changed": changed[m.key],
            "applied_at": when,
        }
        for m in ordered
        if m.key in keys
    ]
    append_ledger(layout, ledger)
    buffer = io.BytesIO()
    pq.write_table(new_status, buffer)
    publish_bytes(buffer.getvalue(), status_url)
    files = sorted({f for paths in changed.values() for f in paths})
    return ShardRemoval(shard, tuple(sorted(keys)), tuple(files), time.perf_counter() - started)


def apply_plan(layout: StorageLayout, plan: RemovalPlan, now: dt.datetime | None = None) -> list[ShardRemoval]:
    """Apply every shard of the plan, one after another (the ledger has one writer at a time)."""
    return [apply_shard(layout, shard, plan.shards[shard], plan.lists, now) for shard in sorted(plan.shards)]
