"""Stage 2: download shard N's images with img2dataset (guarded) and publish tar, status and stats.

A re-download much worse than the stored shard is refused, never published over it; scratch folders of
download processes that died are cleaned up by the next download. Rows and images on removal lists
(resolved by the caller into `removed_rows` / `removed_hashes`) are never downloaded again: status `removed`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from laion_vq import settings
from laion_vq.removals.lists import RemovalList
from laion_vq.shards.schema import success_rate
from laion_vq.shards.storage import (
    StorageLayout,
    disk_full_as_error,
    exists,
    is_local,
    publish_file,
    read_bytes,
    require_free_space,
    require_upstream,
)
from laion_vq.stages.metadata import read_metadata_shard

if TYPE_CHECKING:
    from laion_vq.download import DownloadOptions  # at run time imported by download_image_shard, when called


@dataclass
class ImageShardResult:
    shard_id: int
    tar_path: str
    status_path: str
    stats_path: str
    rows: int
    successes: int
    failed_to_download: int
    failed_to_resize: int
    failures_by_reason: dict[str, int]
    bytes_tar: int
    seconds: float
    #: reason → the first few failing URLs (by key), for a person to try in a browser
    failure_examples: dict[str, list[str]] = field(default_factory=dict)
    #: the success rate of the shard this download replaced (None: there was none, or it requested no row)
    previous_success_rate: float | None = None
    #: rows a removal list took out (never requested, or dropped by image hash): rows = successes +
    #: failed_to_download + failed_to_resize + removed; `failures_by_reason` holds no removals
    removed: int = 0
    removed_by_reason: dict[str, int] = field(default_factory=dict)
    #: rows the metadata's filter rejected (never requested): rows = … + removed + filtered
    filtered: int = 0

    @property
    def success_rate(self) -> float | None:
        """Images in the tar over the rows requested (`shards.schema.success_rate`: removals are not failures)."""
        return success_rate(self.successes, self.rows, self.removed, self.filtered)

    @property
    def requested_rows(self) -> int:
        """Rows not taken out by a removal list or the filter: what the download's health is judged on."""
        return self.rows - self.removed - self.filtered


def _rate(successes: int, rows: int) -> float:
    return successes / rows if rows else 0.0


class WorseDownloadError(RuntimeError):
    """A re-download that would replace a good stored shard with a much worse one (kept out)."""


def _stored_counts(layout: StorageLayout, shard_id: int) -> tuple[int, int, int] | None:
    """(successes, rows, removed or filtered) of the shard already on storage, from its stats json; None if
    there is none. A stats json from before removal lists or filters has no such counts: 0."""
    url = layout.image_stats(shard_id)
    if not exists(url):
        return None
    try:
        stats = json.loads(read_bytes(url))
        left_out = int(stats.get("removed", 0)) + int(stats.get("filtered", 0))
        return int(stats["successes"]), int(stats["count"]), left_out
    except (ValueError, KeyError, TypeError):
        return None  # an unreadable record protects nothing; the audit reports it


def refuse_worse_download(
    shard_id: int, previous: tuple[int, int] | None, result: ImageShardResult, min_rate_ratio: float
) -> None:
    """Raise WorseDownloadError when `result` would replace a stored shard that had successes with one
    that has none, or whose success rate is below `min_rate_ratio` × the stored one (a dead network,
    a blocked crawler, an outage at the image host: not a web that lost its images overnight).

    `previous` is (successes, rows requested) of the stored shard. Both rates are over the rows requested,
    i.e. without rows a removal list took out: removals are deliberate, so a shard re-downloaded after
    a removal list grew is judged on the rows it still downloads, not refused as a worse download."""
    if previous is None or previous[0] == 0 or previous[1] == 0 or result.requested_rows == 0:
        return  # nothing to protect, or nothing requested (a removal list took every row): nothing to judge
    before = previous[0] / previous[1]
    now = _rate(result.successes, result.requested_rows)
    if result.successes > 0 and now >= min_rate_ratio * before:
        return
    causes = ", ".join(f"{reason} ×{n}" for reason, n in list(result.failures_by_reason.items())[:3])
    removed = f" ({result.removed} removed rows not requested)" if result.removed else ""
    raise WorseDownloadError(
        f"shard {shard_id:05d}: the re-download got {result.successes}/{result.requested_rows} images{removed} "
        f"({now:.0%}) where the stored shard has {previous[0]}/{previous[1]} ({before:.0%}); "
        f"main failures now: {causes or 'none'}. The stored shard is kept. If the images are really gone, "
        f"re-run with {settings.DOWNLOAD_REPLACE_WORSE.env}=1 (or the downloader resource's replace_worse)."
    )


@contextmanager
def _watch_scratch(scratch: str, shard_id: int, progress: Callable[[str], None] | None, every: float = 30.0):
    """While img2dataset works (it reports nothing until the shard is done), log the growing tar's size."""
    if progress is None:
        yield
        return
    stop = threading.Event()
    start = time.perf_counter()

    def watch() -> None:
        while not stop.wait(every):
            tar_bytes = sum(e.stat().st_size for e in os.scandir(scratch) if e.name.endswith(".tar"))
            elapsed = time.perf_counter() - start
            progress(f"shard {shard_id:05d}: {tar_bytes / 1e6:.1f} MB of images after {elapsed:.0f}s")

    thread = threading.Thread(target=watch, name=f"progress-{shard_id:05d}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


SCRATCH_PREFIX = "laion_vq_dl_"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_scratch(root: str | None = None) -> list[str]:
    """Remove the scratch folders of download processes that died (SIGKILL, OOM): their partial tars
    never reach storage, but would fill the worker's disk. Returns the folders removed."""
    root = root or tempfile.gettempdir()
    removed = []
    with os.scandir(root) as entries:
        for entry in entries:
            match = re.match(rf"{SCRATCH_PREFIX}\d+_(\d+)_", entry.name)
            if match and entry.is_dir(follow_symlinks=False) and not _alive(int(match.group(1))):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    return removed


def download_image_shard(
    layout: StorageLayout,
    shard_id: int,
    samples_per_shard: int,
    options: DownloadOptions | None = None,
    progress: Callable[[str], None] | None = None,
    progress_every: float = 30.0,
    min_rate_ratio: float = 0.5,
    replace_worse: bool = False,
    removed_rows: Mapping[int, str] | None = None,
    removed_hashes: Mapping[str, str] | None = None,
    removal_lists: Sequence[RemovalList] | None = None,
) -> ImageShardResult:
    """Download the shard's images with img2dataset into a scratch folder, then publish the three files.

    A re-download much worse than the stored shard (`refuse_worse_download`) publishes nothing and
    raises, unless `replace_worse`. Publishing order is tar, status parquet, stats json; the encoder
    cross-checks tar keys against the status parquet, so a crash between two publishes of a re-run is
    caught there, not encoded.

    Removal lists, resolved by the caller: `removed_rows` maps a row of the shard's metadata table (0-based,
    = the sample index) to the list's reason; those rows are never requested. `removed_hashes` maps a
    sha256 hex digest to a reason; an image whose downloaded bytes or stored JPEG hash to it is dropped
    before it is written. Both end as status `removed` with the reason as `failure_reason`, never in the tar
    (`download_shard`). `removal_lists` (the lists under `removals/`) are resolved here against the shard's
    rows into those two mappings (`laion_vq.removals.downloads`), added to any given explicitly.
    """
    from laion_vq.download import DownloadOptions, download_shard

    remove_stale_scratch()
    rows, source = read_metadata_shard(require_upstream(layout.metadata_shard(shard_id), "raw_metadata_shards"))
    url_column, caption_column = source.url_column, source.caption_column
    if removal_lists:
        from laion_vq.download.img2dataset_shard import expected_key
        from laion_vq.removals.downloads import download_exclusions

        keys = [expected_key(shard_id, index, samples_per_shard) for index in range(rows.num_rows)]
        listed_rows, listed_hashes = download_exclusions(removal_lists, rows, keys, url_column)
        removed_rows = {**listed_rows, **(removed_rows or {})}
        removed_hashes = {**listed_hashes, **(removed_hashes or {})}
    start = time.perf_counter()
    with (
        # a full scratch disk (tempfile.gettempdir()) says so: img2dataset's own writes are named by download_shard,
        # this names the folder; the scratch folder is gone by the time the error is raised
        disk_full_as_error(tempfile.gettempdir()),
        tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{shard_id:05d}_{os.getpid()}_") as scratch,
        _watch_scratch(scratch, shard_id, progress, progress_every),
    ):
        result = download_shard(
            rows,
            shard_id,
            scratch,
            samples_per_shard=samples_per_shard,
            url_col=url_column,
            caption_col=caption_column,
            additional_columns=[c for c in rows.column_names if c not in (url_column, caption_column)],
            options=options or DownloadOptions(),
            removed_rows=removed_rows,
            removed_hashes=removed_hashes,
            filtered_rows=dict.fromkeys(source.filtered_rows, source.filter or "filtered"),
            hash_col=source.hash_column,
            hash_type=source.hash_type,
        )
        previous = _stored_counts(layout, shard_id)
        summary = ImageShardResult(
            shard_id=shard_id,
            tar_path=layout.image_tar(shard_id),
            status_path=layout.image_status(shard_id),
            stats_path=layout.image_stats(shard_id),
            rows=result.count,
            successes=result.successes,
            failed_to_download=result.failed_to_download,
            failed_to_resize=result.failed_to_resize,
            failures_by_reason=result.failures_by_reason,
            failure_examples=result.failure_examples,
            bytes_tar=result.bytes_tar,
            seconds=0.0,
            previous_success_rate=success_rate(*previous) if previous else None,
            removed=result.removed,
            removed_by_reason=result.removed_by_reason,
            filtered=result.filtered,
        )
        if not replace_worse:
            requested = None if previous is None else (previous[0], previous[1] - previous[2])
            refuse_worse_download(shard_id, requested, summary, min_rate_ratio)
        if is_local(layout.image_tar(shard_id)):
            # all three or none: a tar published beside an old status parquet, for want of room for the parquet,
            # would be refused by the encoder until the next download. The sum is enough: each old file stays
            # until its new one has been renamed over it.
            needed = sum(os.path.getsize(p) for p in (result.tar_path, result.parquet_path, result.stats_path))
            require_free_space(layout.image_tar(shard_id), needed)
        summary.bytes_tar = publish_file(result.tar_path, layout.image_tar(shard_id))
        publish_file(result.parquet_path, layout.image_status(shard_id))
        publish_file(result.stats_path, layout.image_stats(shard_id))
    summary.seconds = time.perf_counter() - start
    return summary
