"""The three files img2dataset writes for a shard: proven complete, then annotated for users.

`verify_shard_files` turns a shard img2dataset silently shortened (it only prints when a sample's
handling raises) into an error; `annotate_status` sorts the status parquet by key and adds the
normalised `failure_reason` and the stored image's `jpg_sha256`, and records the reason counts and
example URLs in the stats json. Files only: no img2dataset here.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from laion_vq.download.reasons import normalise

#: Statuses img2dataset writes into the per-shard parquet's `status` column.
STATUSES = ("success", "failed_to_download", "failed_to_resize")


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
    failures = stats["failed_to_download"] + stats["failed_to_resize"]
    if stats["count"] != num_rows or stats["successes"] + failures != num_rows:
        raise RuntimeError(
            f"shard {shard_id}: stats do not reconcile with {num_rows} input rows: count={stats['count']} "
            f"successes={stats['successes']} failed_to_download={stats['failed_to_download']} "
            f"failed_to_resize={stats['failed_to_resize']}"
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
    suffix = f".{encode_format}"
    try:
        with tarfile.open(tar_path, "r:") as tar:  # headers only: the writer hashed the bytes it stored
            tar_keys = {m.name.removesuffix(suffix) for m in tar if m.isfile() and m.name.endswith(suffix)}
    except tarfile.TarError as err:
        raise RuntimeError(f"shard {shard_id}: {tar_path} is not a readable tar: {err}") from err
    success_keys = {k for k, st in zip(keys, statuses, strict=True) if st == "success"}
    if not tar_keys == success_keys == hashed_keys:
        raise RuntimeError(
            f"shard {shard_id}: tar holds {len(tar_keys)} images, the parquet {len(success_keys)} successes, "
            f"the writer stored {len(hashed_keys)} ({len(tar_keys ^ success_keys)} keys differ)"
        )
    return stats


def annotate_status(
    parquet_path: str, stats_path: str, digests: dict[str, str], examples_per_reason: int = 3
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Sort the status parquet by key and add `failure_reason` and `jpg_sha256`; record the reason
    counts and the first failing URLs per reason in the stats json (key `laion_vq`)."""
    table = pq.read_table(parquet_path).sort_by("key")
    messages = table.column("error_message").to_pylist()
    statuses = table.column("status").to_pylist()
    reasons = [None if st == "success" else normalise(m) or st for st, m in zip(statuses, messages, strict=True)]
    keys = table.column("key").to_pylist()
    table = table.append_column("failure_reason", pa.array(reasons, pa.string()))
    table = table.append_column("jpg_sha256", pa.array([digests.get(k) for k in keys], pa.string()))
    pq.write_table(table, parquet_path)

    counts = Counter(r for r in reasons if r is not None)
    by_reason = dict(counts.most_common())
    examples: dict[str, list[str]] = {}
    for reason, url in zip(reasons, table.column("url").to_pylist(), strict=True):
        if reason is not None and len(examples.setdefault(reason, [])) < examples_per_reason:
            examples[reason].append(url)
    with open(stats_path, encoding="utf-8") as f:
        stats = json.load(f)
    stats["laion_vq"] = {"failures_by_reason": by_reason, "failure_examples": examples}
    with open(stats_path, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    return by_reason, examples
