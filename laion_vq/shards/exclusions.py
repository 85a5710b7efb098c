"""The exclusion list: shards an operator took out of the dataset, and why.

One CSV file under the storage root (`StorageLayout.exclusions()`, `excluded_shards.csv`), edited by
hand or by any tool:

    shard,reason
    04711,tar truncated at the source; LAION part 17 row group 3 unreadable
    08001,duplicate of 08000 (metadata bug, see ticket 123)

Excluded shards are skipped by backfills and schedules (with a visible record on their partition),
counted in the corrupted-shards report and listed in the dataset card. A missing file means no
exclusions; a malformed one is a clear error naming the line, never a silently shorter list.
"""

from __future__ import annotations

import csv
import io

from laion_vq.shards.numbering import parse_shard_key, shard_key
from laion_vq.shards.storage import StorageLayout, exists, publish_bytes, read_bytes

HEADER = ("shard", "reason")


class ExclusionListError(ValueError):
    """The exclusion file cannot be trusted: names the file, the line and what is wrong."""


def parse_exclusions(text: str, source: str = "excluded_shards.csv") -> dict[str, str]:
    """`shard,reason` rows → {shard key: reason}. Shard ids may be written unpadded (`4711`)."""
    rows = list(csv.reader(io.StringIO(text)))
    rows = [row for row in rows if row and any(cell.strip() for cell in row)]
    if not rows:
        return {}
    header = tuple(cell.strip().lower() for cell in rows[0])
    if header != HEADER:
        raise ExclusionListError(f"{source}: line 1 must be the header 'shard,reason', got {','.join(rows[0])!r}")
    excluded: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if row[0].lstrip().startswith("#"):
            continue
        if len(row) < 2 or not row[1].strip():
            raise ExclusionListError(f"{source}: line {line} needs a shard and a reason, got {','.join(row)!r}")
        raw = row[0].strip()
        try:
            key = shard_key(int(raw)) if raw.isdigit() else shard_key(parse_shard_key(raw))
        except ValueError as err:
            raise ExclusionListError(f"{source}: line {line}: {err}") from None
        if key in excluded:
            raise ExclusionListError(f"{source}: line {line}: shard {key} is listed twice")
        excluded[key] = ",".join(row[1:]).strip()
    return excluded


def read_exclusions(layout: StorageLayout) -> dict[str, str]:
    """The operator's exclusion list, {shard key: reason}; empty when the file does not exist."""
    url = layout.exclusions()
    if not exists(url):
        return {}
    return parse_exclusions(read_bytes(url).decode("utf-8"), source=url)


def write_exclusions(layout: StorageLayout, excluded: dict[str, str]) -> None:
    """Publish a whole exclusion list atomically (for scripts and tests; operators may edit by hand)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    for key in sorted(excluded):
        writer.writerow([key, excluded[key]])
    publish_bytes(out.getvalue().encode("utf-8"), layout.exclusions())
