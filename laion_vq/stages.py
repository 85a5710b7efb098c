"""The three shard stages as plain functions: metadata slice → image tar → code parquet.

No Dagster here: the assets call these and turn the returned numbers into materialization
metadata, and benchmarks or scripts can call them directly.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from laion_vq import settings
from laion_vq.shards.codes import build_codes_table, check_codes_table, write_codes_parquet
from laion_vq.shards.metadata import LaionMetadata
from laion_vq.shards.schema import CAPTION_COLUMN, EXTRA_COLUMNS, URL_COLUMN
from laion_vq.shards.storage import StorageLayout, exists, publish_bytes, publish_file, read_bytes, size
from laion_vq.shards.tar_reader import CorruptShardError, iter_samples

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- metadata


@dataclass
class MetadataShardResult:
    shard_id: int
    path: str
    rows: int
    source_file: str
    source_rows: tuple[int, int]
    bytes: int
    seconds: float


def write_metadata_shard(meta: LaionMetadata, layout: StorageLayout, shard_id: int) -> MetadataShardResult:
    """Slice shard `shard_id` out of the LAION parts and store it as `metadata/NNNNN.parquet`."""
    start = time.perf_counter()
    where = meta.locate(shard_id)
    table = meta.read_shard(shard_id)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    dest = layout.metadata_shard(shard_id)
    nbytes = publish_bytes(buffer.getvalue(), dest)
    return MetadataShardResult(
        shard_id=shard_id,
        path=dest,
        rows=table.num_rows,
        source_file=where.part.url,
        source_rows=(where.start, where.stop),
        bytes=nbytes,
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------- images


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
    #: the success rate of the shard this download replaced (None: there was none)
    previous_success_rate: float | None = None

    @property
    def success_rate(self) -> float:
        return self.successes / self.rows if self.rows else 0.0


class WorseDownloadError(RuntimeError):
    """A re-download that would replace a good stored shard with a much worse one (kept out)."""


def _stored_success_rate(layout: StorageLayout, shard_id: int) -> tuple[int, int] | None:
    """(successes, rows) of the shard already on storage, from its stats json; None if there is none."""
    url = layout.image_stats(shard_id)
    if not exists(url):
        return None
    try:
        stats = json.loads(read_bytes(url))
        return int(stats["successes"]), int(stats["count"])
    except (ValueError, KeyError, TypeError):
        return None  # an unreadable record protects nothing; the audit reports it


def refuse_worse_download(
    shard_id: int, previous: tuple[int, int] | None, result: ImageShardResult, min_rate_ratio: float
) -> None:
    """Raise WorseDownloadError when `result` would replace a stored shard that had successes with one
    that has none, or whose success rate is below `min_rate_ratio` × the stored one (a dead network,
    a blocked crawler, an outage at the image host: not a web that lost its images overnight)."""
    if previous is None or previous[0] == 0 or previous[1] == 0:
        return
    before = previous[0] / previous[1]
    if result.successes > 0 and result.success_rate >= min_rate_ratio * before:
        return
    causes = ", ".join(f"{reason} ×{n}" for reason, n in list(result.failures_by_reason.items())[:3])
    raise WorseDownloadError(
        f"shard {shard_id:05d}: the re-download got {result.successes}/{result.rows} images "
        f"({result.success_rate:.0%}) where the stored shard has {previous[0]}/{previous[1]} ({before:.0%}); "
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
    options: object | None = None,
    progress: Callable[[str], None] | None = None,
    progress_every: float = 30.0,
    min_rate_ratio: float = 0.5,
    replace_worse: bool = False,
) -> ImageShardResult:
    """Download the shard's images with img2dataset into a scratch folder, then publish the three files.

    A re-download much worse than the stored shard (`refuse_worse_download`) publishes nothing and
    raises, unless `replace_worse`. Publishing order is tar, status parquet, stats json; the encoder
    cross-checks tar keys against the status parquet, so a crash between two publishes of a re-run is
    caught there, not encoded.
    """
    from laion_vq.download import DownloadOptions, download_shard

    remove_stale_scratch()
    rows = pq.read_table(io.BytesIO(_require(layout.metadata_shard(shard_id), "raw_metadata_shards")))
    start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{shard_id:05d}_{os.getpid()}_") as scratch,
        _watch_scratch(scratch, shard_id, progress, progress_every),
    ):
        result = download_shard(
            rows,
            shard_id,
            scratch,
            samples_per_shard=samples_per_shard,
            url_col=URL_COLUMN,
            caption_col=CAPTION_COLUMN,
            additional_columns=EXTRA_COLUMNS,
            options=options or DownloadOptions(),
        )
        previous = _stored_success_rate(layout, shard_id)
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
            previous_success_rate=previous[0] / previous[1] if previous and previous[1] else None,
        )
        if not replace_worse:
            refuse_worse_download(shard_id, previous, summary, min_rate_ratio)
        summary.bytes_tar = publish_file(result.tar_path, layout.image_tar(shard_id))
        publish_file(result.parquet_path, layout.image_status(shard_id))
        publish_file(result.stats_path, layout.image_stats(shard_id))
    summary.seconds = time.perf_counter() - start
    return summary


# --------------------------------------------------------------------------- codes


@dataclass
class CodeShardResult:
    shard_id: int
    path: str
    status_rows: int
    downloaded: int
    encoded: int
    undecodable: dict[str, int]
    undecodable_keys: list[str]
    bytes: int
    seconds: float
    encode_seconds: float
    distinct_codes: int
    code_usage: np.ndarray | None = field(default=None, repr=False)
    #: the first `keep_samples` encoded images and their codes, for previews
    sample_images: np.ndarray | None = field(default=None, repr=False)
    sample_codes: np.ndarray | None = field(default=None, repr=False)

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0


def _decode_rgb(data: bytes, image_size: int) -> np.ndarray:
    """JPEG bytes → HxWx3 uint8; wrong size or undecodable is a ValueError with the reason."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = img.convert("RGB")
    if rgb.size != (image_size, image_size):
        raise ValueError(f"image is {rgb.size[0]}x{rgb.size[1]}, expected {image_size}x{image_size}")
    return np.asarray(rgb, dtype=np.uint8)


def _require(url: str, upstream: str, read: bool = True) -> bytes:
    """The upstream file's bytes; a missing file says which asset to materialize first."""
    if not exists(url):
        raise FileNotFoundError(f"{url} does not exist: materialize {upstream} for this shard first")
    return read_bytes(url) if read else b""


def _status_rows(layout: StorageLayout, shard_id: int) -> dict[str, dict]:
    url = layout.image_status(shard_id)
    _require(url, "image_tars", read=False)
    try:
        table = pq.read_table(io.BytesIO(read_bytes(url)))
    except Exception as err:  # noqa: BLE001 - any read failure means the shard cannot be trusted
        raise CorruptShardError(f"{url}: unreadable img2dataset status parquet: {err}") from err
    if "key" not in table.column_names or "status" not in table.column_names:
        raise CorruptShardError(f"{url}: status parquet lacks key/status columns: {table.column_names}")
    return {row["key"]: row for row in table.to_pylist()}


def encode_code_shard(
    layout: StorageLayout,
    shard_id: int,
    *,
    model_name: str,
    encode: Callable[[np.ndarray], np.ndarray],
    grid: int,
    n_embed: int,
    image_size: int = 256,
    batch_size: int = 64,
    provenance: dict | None = None,
    progress: Callable[[str], None] | None = None,
    keep_samples: int = 0,
) -> CodeShardResult:
    """Encode every downloaded image of the shard and publish `codes/<model>/NNNNN.parquet`.

    `encode` maps an (N, S, S, 3) uint8 batch to (N, grid, grid) integer codes. Images that fail to
    decode are counted by reason and listed, never dropped silently; a tar that disagrees with its status
    parquet, or output that breaks the contract, raises CorruptShardError and publishes nothing.
    """
    start = time.perf_counter()
    status = _status_rows(layout, shard_id)
    success_keys = {k for k, row in status.items() if row["status"] == "success"}
    tar_url = layout.image_tar(shard_id)
    _require(tar_url, "image_tars", read=False)

    keys: list[str] = []
    codes: list[np.ndarray] = []
    samples: list[np.ndarray] = []
    undecodable: Counter[str] = Counter()
    undecodable_keys: list[str] = []
    tar_keys: set[str] = set()
    encode_seconds = 0.0
    pending: list[tuple[str, bytes]] = []

    def flush(pool: ThreadPoolExecutor) -> None:
        nonlocal encode_seconds
        decoded = list(pool.map(lambda kv: _safe_decode(kv, image_size), pending))
        batch_keys = [k for k, img, _ in decoded if img is not None]
        for k, img, reason in decoded:
            if img is None:
                undecodable[reason] += 1
                undecodable_keys.append(k)
        if batch_keys:
            batch = np.stack([img for _, img, _ in decoded if img is not None])
            t0 = time.perf_counter()
            out = np.asarray(encode(batch))
            encode_seconds += time.perf_counter() - t0
            if out.shape != (len(batch_keys), grid, grid):
                raise RuntimeError(f"encoder returned shape {out.shape}, expected {(len(batch_keys), grid, grid)}")
            keys.extend(batch_keys)
            codes.append(out)
            if len(samples) < keep_samples:
                samples.extend(batch[: keep_samples - len(samples)])
        pending.clear()
        if progress is not None:
            progress(f"shard {shard_id:05d}: {len(keys)} encoded, {sum(undecodable.values())} undecodable")

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for sample in iter_samples(tar_url):
            tar_keys.add(sample.key)
            image = sample.image
            if image is None:
                undecodable["no image file in tar sample"] += 1
                undecodable_keys.append(sample.key)
                continue
            pending.append((sample.key, image))
            if len(pending) >= batch_size:
                flush(pool)
        if pending:
            flush(pool)

    if tar_keys != success_keys:
        only_tar, only_status = sorted(tar_keys - success_keys), sorted(success_keys - tar_keys)
        raise CorruptShardError(
            f"{tar_url}: tar and status parquet disagree: {len(only_tar)} key(s) only in the tar "
            f"(e.g. {only_tar[:3]}), {len(only_status)} success key(s) missing from the tar (e.g. {only_status[:3]})"
        )

    all_codes = np.concatenate(codes) if codes else np.zeros((0, grid, grid), np.int16)
    table = build_codes_table(keys, all_codes, status)
    report = check_codes_table(table, shard_id, grid, n_embed)
    if not report.ok:
        raise CorruptShardError(f"shard {shard_id:05d}: encoded output breaks the contract: {report.problems}")
    dest = layout.code_shard(model_name, shard_id)
    file_meta = {
        "model": model_name,
        "grid": grid,
        "n_embed": n_embed,
        "shard": f"{shard_id:05d}",
        "source_tar_bytes": size(tar_url),
        "undecodable": dict(undecodable),
        **(provenance or {}),
    }
    nbytes = write_codes_parquet(table, dest, file_meta)
    return CodeShardResult(
        shard_id=shard_id,
        path=dest,
        status_rows=len(status),
        downloaded=len(success_keys),
        encoded=table.num_rows,
        undecodable=dict(undecodable),
        undecodable_keys=sorted(undecodable_keys),
        bytes=nbytes,
        seconds=time.perf_counter() - start,
        encode_seconds=encode_seconds,
        distinct_codes=report.distinct_codes,
        code_usage=report.usage,
        sample_images=np.stack(samples) if samples else None,
        sample_codes=all_codes[: len(samples)] if samples else None,
    )


def _safe_decode(item: tuple[str, bytes], image_size: int) -> tuple[str, np.ndarray | None, str]:
    key, data = item
    try:
        return key, _decode_rgb(data, image_size), ""
    except Exception as err:  # noqa: BLE001 - every decode failure is counted by its reason
        reason = re.sub(r"\s*<[^>]*>|0x[0-9a-fA-F]+", "", str(err)).strip()[:120]
        return key, None, f"{type(err).__name__}: {reason}" if reason else type(err).__name__
