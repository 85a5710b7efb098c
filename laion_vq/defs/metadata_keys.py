"""Names of the materialization and check metadata that something reads back: the assets and checks write them,
the report, the check state and the feed read them. One place, so a renamed key cannot silently read as 0."""

from __future__ import annotations

#: Dagster's own row count (shown in the UI's asset table); every shard asset sets it.
ROW_COUNT = "dagster/row_count"
#: Set instead of the numbers when the operator's exclusion list took the shard out (reason as value).
EXCLUDED = "excluded"

# image_tars
SUCCESSES = "successes"
TAR_BYTES = "tar_bytes"
REMOVED = "removed"
FILTERED = "filtered"

# code_parquets
ENCODED = "encoded"
UNDECODABLE = "undecodable"
DISTINCT_CODES = "distinct_codes"
CHECKPOINT_SHA256 = "checkpoint_sha256"

# shard checks: the first problem's reason
REASON = "reason"


def excluded_metadata(reason: str) -> dict[str, str | int]:
    """What a shard the exclusion list took out records instead of its numbers."""
    return {EXCLUDED: reason, ROW_COUNT: 0}
