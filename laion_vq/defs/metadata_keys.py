"""Names of the materialization and check metadata that something reads back: the assets and checks write them,
the report, the check state and the feed read them. One place, so a renamed key cannot silently read as 0."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from laion_vq.removals import RemovedKey

#: Dagster's own row count (shown in the UI's asset table); every shard asset sets it.
ROW_COUNT = "dagster/row_count"
#: Set instead of the numbers when the operator's exclusion list took the shard out (reason as value).
EXCLUDED = "excluded"

# image_tars
SUCCESSES = "successes"
TAR_BYTES = "tar_bytes"
#: `shards.schema.success_rate`: over the rows still subject to download (removed and filtered rows left out)
SUCCESS_RATE = "success_rate"
REMOVED = "removed"
FILTERED = "filtered"
#: each removed key with its list and reason (`removed_items_metadata`), and the lists that removed items
REMOVED_ITEMS = "removed_items"
REMOVAL_LISTS = "removal_lists"

# code_parquets
#: status rows with status success when the shard was encoded, or after a removal since
DOWNLOADED = "downloaded"
#: rows of the shard's status parquet (every metadata row)
STATUS_ROWS = "status_rows"
ENCODED = "encoded"
UNDECODABLE = "undecodable"
DISTINCT_CODES = "distinct_codes"
CHECKPOINT_SHA256 = "checkpoint_sha256"

# shard checks: the first problem's reason
REASON = "reason"


def excluded_metadata(reason: str) -> dict[str, str | int]:
    """What a shard the exclusion list took out records instead of its numbers."""
    return {EXCLUDED: reason, ROW_COUNT: 0}


def removed_items_metadata(removed: Sequence[RemovedKey], shown: int = 50) -> dict[str, list]:
    """What a shard's page says of its removed rows: the first `shown` by key, each with its list and reason
    (the status parquet and the ledger hold them all), and the lists that removed them."""
    if not removed:
        return {}
    items: list[dict] = [{"key": r.key, "list": r.list_name, "reason": r.reason} for r in removed[:shown]]
    if len(removed) > shown:
        items.append({"more": len(removed) - shown, "in": "the status parquet and removals/applied.parquet"})
    lists = sorted({r.list_name for r in removed if r.list_name})
    return {REMOVED_ITEMS: items, REMOVAL_LISTS: lists}
