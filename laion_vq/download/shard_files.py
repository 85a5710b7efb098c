"""The three files img2dataset writes for a shard: proven complete, then annotated for users.

`merge_removed` adds the rows a removal list kept from img2dataset (never requested) back into the
status parquet and the stats json; `verify_shard_files` turns a shard img2dataset silently shortened (it
only prints when a sample's handling raises) into an error; `annotate_status` sorts the status parquet
by key and adds the normalised `failure_reason` and the stored image's `jpg_sha256`, and records the
reason counts and example URLs in the stats json. Files only: no img2dataset here.

Every metadata row ends with one status: `success`, `failed_to_download`, `failed_to_resize` (img2dataset's)
or `removed` (ours: listed on a removal list, by row before download or by image hash right after it; no
tar sample, `failure_reason` = the list's reason). Counts reconcile: count = successes + failed_to_download
+ failed_to_resize + removed, in the parquet and in the stats json (`removed` at top level, beside
img2dataset's counts; a stats json written before removals existed has no `removed`, read as 0).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from laion_vq.download.reasons import normalise
from laion_vq.shards.schema import FILTERED_STATUS, REMOVED_STATUS

#: Statuses of the per-shard parquet's `status` column: img2dataset's three, then ours for rows a removal
#: list took out (never requested, or dropped right after download by hash; never in the tar) and rows the
#: metadata's filter rejected (never requested).
STATUSES = ("success", "failed_to_download", "failed_to_resize", "removed", "filtered")
REMOVED = REMOVED_STATUS
FILTERED = FILTERED_STATUS
#: `error_message` of a row withheld from img2dataset by a removal list (its reason is `failure_reason`).
WITHHELD_MESSAGE = "removed: listed, not requested"
#: `error_message` of a row the filter rejected (the predicate is its `failure_reason`).
FILTERED_MESSAGE = "filtered: not requested"


def _status_rows(schema: pa.Schema, rows: pa.Table, status: str, message: str) -> pa.Table:
    """Status rows for input rows img2dataset never saw: their own columns, `status`/`error_message`, nulls
    where img2dataset records download results."""
    n = rows.num_rows
    columns = []
    for f in schema:
        if f.name in rows.column_names:
            columns.append(rows.column(f.name).cast(f.type))
        elif f.name == "status":
            columns.append(pa.array([status] * n, f.type))
        elif f.name == "error_message":
            columns.append(pa.array([message] * n, f.type))
        else:
            columns.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def attach_columns(parquet_path: str, keyed: pa.Table) -> None:
    """Add `keyed`'s columns (all but `key`) to the status parquet, row by row on `key`, just before `caption`:
    source columns that did not travel through img2dataset keep their types."""
    table = pq.read_table(parquet_path)
    position = {k: i for i, k in enumerate(keyed.column("key").to_pylist())}
    order = pa.array([position[k] for k in table.column("key").to_pylist()], pa.int64())
    at = table.column_names.index("caption")
    for name in keyed.column_names:
        if name != "key":
            table = table.add_column(at, name, keyed.column(name).take(order))
            at += 1
    pq.write_table(table, parquet_path)


def merge_removed(parquet_path: str, stats_path: str, withheld: pa.Table, filtered: pa.Table | None = None) -> None:
    """Put the rows withheld from img2dataset back into its status parquet, and count removals in the stats.

    `withheld` holds img2dataset's input columns plus `key` (the key img2dataset would have given the row)
    for each row a removal list matched; each becomes a status row `removed` with `WITHHELD_MESSAGE` and
    nulls where img2dataset records download results. Rows img2dataset wrote as `removed` (our resizer
    refused the image because its hash is listed, the writer marked the row) were counted by img2dataset
    as `failed_to_resize`, by their message: they move to `removed`. The stats json always gets `removed`
    (top level, beside img2dataset's counts), and its `status_dict` counts removed rows under "removed",
    as it counts successes under "success".

    `filtered` holds the rows the metadata's filter rejected, the same way: status `filtered`, counted as
    `filtered` in the stats json (top level and in `status_dict`)."""
    table = pq.read_table(parquet_path)
    by_hash = Counter(
        m
        for m, st in zip(table["error_message"].to_pylist(), table["status"].to_pylist(), strict=True)
        if st == REMOVED
    )
    n = withheld.num_rows
    n_filtered = 0 if filtered is None else filtered.num_rows
    if n or n_filtered:
        parts = [table, _status_rows(table.schema, withheld, REMOVED, WITHHELD_MESSAGE)]
        if filtered is not None:
            parts.append(_status_rows(table.schema, filtered, FILTERED, FILTERED_MESSAGE))
        pq.write_table(pa.concat_tables(parts), parquet_path)
    with open(stats_path, encoding="utf-8") as f:
        stats = json.load(f)
    removed_after_download = sum(by_hash.values())
    stats["count"] += n + n_filtered
    stats[FILTERED] = n_filtered
    if n_filtered:
        stats["status_dict"][FILTERED] = n_filtered
    stats["failed_to_resize"] -= removed_after_download
    stats[REMOVED] = n + removed_after_download
    status_dict = stats["status_dict"]
    for message, count in by_hash.items():
        left = status_dict.get(message, 0) - count
        if left > 0:
            status_dict[message] = left
        else:
            status_dict.pop(message, None)
    if stats[REMOVED]:
        status_dict[REMOVED] = status_dict.get(REMOVED, 0) + stats[REMOVED]
    with open(stats_path, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)


def verify_shard_files(
    tar_path: str,
    parquet_path: str,
    stats_path: str,
    shard_id: int,
    expected_keys: set[str],
    encode_format: str,
    hashed_keys: set[str],
) -> dict[str, Any]:
    """Check the three outputs account for every input row, and that the tar's images are the ones
    the writer hashed; img2dataset skips a sample whose handling raised (it only prints), which would
    otherwise look like a complete shard."""
    num_rows = len(expected_keys)
    missing = [p for p in (tar_path, parquet_path, stats_path) if not os.path.isfile(p)]
    if missing:
        raise RuntimeError(f"img2dataset did not write {missing} for shard {shard_id}")
    with open(stats_path, encoding="utf-8") as f:
        stats = json.load(f)
    removed = stats.get(REMOVED, 0)
    filtered = stats.get(FILTERED, 0)
    failures = stats["failed_to_download"] + stats["failed_to_resize"]
    if stats["count"] != num_rows or stats["successes"] + failures + removed + filtered != num_rows:
        raise RuntimeError(
            f"shard {shard_id}: stats do not reconcile with {num_rows} input rows: count={stats['count']} "
            f"successes={stats['successes']} failed_to_download={stats['failed_to_download']} "
            f"failed_to_resize={stats['failed_to_resize']} removed={removed} filtered={filtered}"
        )
    status = pq.read_table(parquet_path, columns=["key", "status"])
    if status.num_rows != num_rows:
        raise RuntimeError(
            f"shard {shard_id}: status parquet has {status.num_rows} rows for {num_rows} input rows "
            "(img2dataset dropped samples whose handling failed; see its printed tracebacks)"
        )
    keys = status.column("key").to_pylist()
    if set(keys) != expected_keys or len(keys) != num_rows:
        raise RuntimeError(f"shard {shard_id}: status parquet keys are not the expected {num_rows} keys")
    statuses = status.column("status").to_pylist()
    unknown = set(statuses) - set(STATUSES)
    if unknown:
        raise RuntimeError(f"shard {shard_id}: unexpected statuses {sorted(map(str, unknown))} in the parquet")
    parquet_successes = statuses.count("success")
    if parquet_successes != stats["successes"]:
        raise RuntimeError(
            f"shard {shard_id}: parquet has {parquet_successes} successes, stats say {stats['successes']}"
        )
    if statuses.count(REMOVED) != removed:
        raise RuntimeError(f"shard {shard_id}: parquet has {statuses.count(REMOVED)} removed rows, stats say {removed}")
    if statuses.count(FILTERED) != filtered:
        raise RuntimeError(
            f"shard {shard_id}: parquet has {statuses.count(FILTERED)} filtered rows, stats say {filtered}"
        )
    suffix = f".{encode_format}"
    try:
        with tarfile.open(tar_path, "r:") as tar:  # headers only: the writer hashed the bytes it stored
            tar_keys = {m.name.removesuffix(suffix) for m in tar if m.isfile() and m.name.endswith(suffix)}
    except tarfile.TarError as err:
        raise RuntimeError(f"shard {shard_id}: {tar_path} is not a readable tar: {err}") from err
    success_keys = {k for k, st in zip(keys, statuses, strict=True) if st == "success"}  # removed: not in the tar
    if not tar_keys == success_keys == hashed_keys:
        raise RuntimeError(
            f"shard {shard_id}: tar holds {len(tar_keys)} images, the parquet {len(success_keys)} successes, "
            f"the writer stored {len(hashed_keys)} ({len(tar_keys ^ success_keys)} keys differ)"
        )
    return stats


def removal_reason(reason: str | None) -> str:
    """The `failure_reason` of a removed row: the list's reason text, or "removed" when the list gave none."""
    return reason if isinstance(reason, str) and reason.strip() else REMOVED


def removed_by_reason(removed: Mapping[str, str | None]) -> dict[str, int]:
    """Removed rows (key → list reason) counted by reason, most frequent first."""
    return dict(Counter(removal_reason(r) for r in removed.values()).most_common())


def annotate_status(
    parquet_path: str,
    stats_path: str,
    digests: dict[str, str],
    examples_per_reason: int = 3,
    removed: Mapping[str, str] | None = None,
    filtered: Mapping[str, str] | None = None,
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Sort the status parquet by key and add `failure_reason` and `jpg_sha256`; record the reason
    counts and the first failing URLs per reason in the stats json (key `laion_vq`).

    Rows with status `removed` take their reason from `removed` (key → the removal list's reason); they are
    counted apart (`removed_by_reason`), never among the failures, and their URLs are never given as examples.
    Rows with status `filtered` take the filter's predicate from `filtered` (key → predicate); no failures either.
    """
    removed = removed or {}
    filtered = filtered or {}
    table = pq.read_table(parquet_path).sort_by("key")
    messages = table.column("error_message").to_pylist()
    statuses = table.column("status").to_pylist()
    keys = table.column("key").to_pylist()
    reasons = [
        None
        if st == "success"
        else removal_reason(removed.get(k))
        if st == REMOVED
        else filtered.get(k, FILTERED)
        if st == FILTERED
        else normalise(m) or st
        for k, st, m in zip(keys, statuses, messages, strict=True)
    ]
    table = table.append_column("failure_reason", pa.array(reasons, pa.string()))
    table = table.append_column("jpg_sha256", pa.array([digests.get(k) for k in keys], pa.string()))
    for column in ("caption", "exif"):  # a removed row keeps its identifiers, not what describes the image
        if column in table.column_names:
            values = [None if st == REMOVED else v for v, st in zip(table[column].to_pylist(), statuses, strict=True)]
            table = table.set_column(table.column_names.index(column), column, pa.array(values, table[column].type))
    pq.write_table(table, parquet_path)

    failures = [None if st in (REMOVED, FILTERED) else r for r, st in zip(reasons, statuses, strict=True)]
    by_reason = dict(Counter(r for r in failures if r is not None).most_common())
    examples: dict[str, list[str]] = {}
    for reason, url in zip(failures, table.column("url").to_pylist(), strict=True):
        if reason is not None and len(examples.setdefault(reason, [])) < examples_per_reason:
            examples[reason].append(url)
    removals = removed_by_reason({k: removed.get(k) for k, st in zip(keys, statuses, strict=True) if st == REMOVED})
    with open(stats_path, encoding="utf-8") as f:
        stats = json.load(f)
    stats["laion_vq"] = {
        "failures_by_reason": by_reason,
        "failure_examples": examples,
        "removed_by_reason": removals,
    }
    with open(stats_path, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    return by_reason, examples
