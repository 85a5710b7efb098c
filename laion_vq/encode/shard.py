"""One shard's bookkeeping around the encoder: what it reads first (status parquet, stored version), what it
gathers while batches encode, and how it is published (reconciled, contract-checked, written atomically)."""

from __future__ import annotations

import io
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_vq import settings
from laion_vq.report.usage import pack_code_usage
from laion_vq.shards.codes import build_codes_table, check_codes_table, read_codes_provenance, write_codes_parquet
from laion_vq.shards.disk_full import disk_full_as_error
from laion_vq.shards.schema import REMOVED_STATUS
from laion_vq.shards.storage import StorageLayout, exists, read_bytes, require_upstream, size
from laion_vq.shards.tar_reader import CorruptShardError

#: why the samples a truncated tar no longer holds are missing (counted, listed, never silently dropped)
TRUNCATED_TAR = "tar truncated before this sample"


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
    #: set when the tar ended early: the samples after the cut are counted under TRUNCATED_TAR
    tar_error: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class CodeSpec:
    """What every shard of a run is encoded into: model, code grid, destination folder and provenance."""

    model_name: str
    grid: int
    n_embed: int
    image_size: int = settings.IMAGE_SIZE.default
    codes_name: str | None = None
    provenance: dict = field(default_factory=dict)
    replace_other_versions: bool = False

    def destination(self, layout: StorageLayout, shard_id: int) -> str:
        return layout.code_shard(self.codes_name or self.model_name, shard_id)


class CodesVersionError(RuntimeError):
    """Codes on storage made by another checkpoint/precision/index rule than this run's (kept as they are)."""


#: What makes codes differ: re-encoding with any of these changed is a new version of the dataset.
VERSION_KEYS = ("checkpoint_sha256", "dtype", "encode_mode", "index_rule", "image_size", "resize_mode", "filter")


def refuse_other_version(dest: str, provenance: dict) -> None:
    """Raise CodesVersionError when `dest` exists and was made with other VERSION_KEYS than `provenance`:
    a new checkpoint or mode goes side by side (another codes folder), never silently over the old."""
    if not exists(dest):
        return
    try:
        stored = read_codes_provenance(dest)
    except Exception:  # a corrupted parquet is no version to protect: re-encoding repairs it
        return
    differ = {k: (stored[k], provenance[k]) for k in VERSION_KEYS if k in stored and k in provenance}
    differ = {k: v for k, v in differ.items() if v[0] != v[1]}
    if differ:
        what = "; ".join(f"{k}: stored {old!s:.16} ≠ this run {new!s:.16}" for k, (old, new) in differ.items())
        raise CodesVersionError(
            f"{dest} was encoded differently ({what}). Nothing was overwritten. Re-encode side by side with "
            f"{settings.CODES_NAME.env}=<a new name> (codes/<name>/), or set {settings.REPLACE_CODES.env}=1 "
            "(the encoder resource's replace_codes) to replace these codes."
        )


def shard_source_provenance(layout: StorageLayout, shard_id: int) -> dict:
    """The shard's source format and filter, from its metadata shard's record (footer only): what its rows
    really went through, whatever the encoder's own settings say. Empty when the metadata shard is gone."""
    from laion_vq.shards.metadata import ShardSource
    from laion_vq.shards.storage import filesystem

    url = layout.metadata_shard(shard_id)
    if not exists(url):
        return {}
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        source = ShardSource.from_schema(pq.ParquetFile(f).schema_arrow)
    return {"source_format": source.format, "filter": source.filter}


def status_rows(layout: StorageLayout, shard_id: int) -> dict[str, dict]:
    """The img2dataset status parquet of the shard, by key (CorruptShardError if unreadable)."""
    return {row["key"]: row for row in status_table(layout, shard_id).to_pylist()}


def status_table(layout: StorageLayout, shard_id: int) -> pa.Table:
    """The img2dataset status parquet of the shard (CorruptShardError if unreadable or lacking key/status)."""
    return status_table_at(layout.image_status(shard_id))


def status_table_at(url: str) -> pa.Table:
    """`status_table` by URL."""
    require_upstream(url, "image_tars", read=False)
    try:
        table = pq.read_table(io.BytesIO(read_bytes(url)))
    except Exception as err:  # any read failure means the shard cannot be trusted
        raise CorruptShardError(f"{url}: unreadable img2dataset status parquet: {err}") from err
    if "key" not in table.column_names or "status" not in table.column_names:
        raise CorruptShardError(f"{url}: status parquet lacks key/status columns: {table.column_names}")
    return table


@dataclass
class ShardAccumulator:
    """Everything gathered about one shard while its batches pass through decode and encode."""

    shard_id: int
    status: dict[str, dict]
    tar_url: str
    dest: str
    keep_samples: int = 0
    started: float = 0.0
    keys: list[str] = field(default_factory=list)
    image_sha256: list[str] = field(default_factory=list)
    codes: list[np.ndarray] = field(default_factory=list)
    samples: list[np.ndarray] = field(default_factory=list)
    undecodable: Counter = field(default_factory=Counter)
    undecodable_keys: list[str] = field(default_factory=list)
    tar_keys: set[str] = field(default_factory=set)
    encode_seconds: float = 0.0
    #: the status parquet's schema: its source columns (every column of the metadata) ride into the codes
    status_schema: pa.Schema | None = None
    #: the run's provenance with this shard's source and filter (`shard_source_provenance`)
    provenance: dict = field(default_factory=dict)
    #: the status parquet, read again at publish time: a removal applied meanwhile is honoured
    status_url: str | None = None

    @property
    def success_keys(self) -> set[str]:
        return {k for k, row in self.status.items() if row["status"] == "success"}

    def fail(self, key: str, reason: str) -> None:
        self.undecodable[reason] += 1
        self.undecodable_keys.append(key)

    def add(self, keys: list[str], codes: np.ndarray, sha256: list[str], images: np.ndarray | None = None) -> None:
        self.keys.extend(keys)
        self.image_sha256.extend(sha256)
        self.codes.append(codes)
        if images is not None and len(self.samples) < self.keep_samples:
            self.samples.extend(images[: self.keep_samples - len(self.samples)])

    def progress(self) -> str:
        return f"shard {self.shard_id:05d}: {len(self.keys)} encoded, {sum(self.undecodable.values())} undecodable"


def removed_meanwhile(acc: ShardAccumulator) -> dict[str, dict]:
    """Status rows (by key) that a removal marked `removed` since the shard's status was read: `apply_removals`
    may rewrite a shard's tar and status while the encoder works on the old ones (a list landing mid-backfill)."""
    if acc.status_url is None:
        return {}
    now = status_table_at(acc.status_url).to_pylist()
    return {
        row["key"]: row
        for row in now
        if row["status"] == REMOVED_STATUS and acc.status.get(row["key"], {}).get("status") != REMOVED_STATUS
    }


def publish_shard(acc: ShardAccumulator, spec: CodeSpec, tar_error: str | None, elapsed: float) -> CodeShardResult:
    """Reconcile the tar with its status parquet, check the contract, write the parquet (atomic).

    A tar cut short (``tar_error``) keeps every sample read before the cut; the success keys it no longer
    holds are counted under TRUNCATED_TAR. A complete tar that disagrees with its status parquet is refused.
    """
    success = acc.success_keys
    only_tar = sorted(acc.tar_keys - success)
    only_status = sorted(success - acc.tar_keys)
    if tar_error is not None and not only_tar:
        for key in only_status:
            acc.fail(key, TRUNCATED_TAR)
        only_status = []
    if only_tar or only_status:
        raise CorruptShardError(
            f"{acc.tar_url}: tar and status parquet disagree: {len(only_tar)} key(s) only in the tar "
            f"(e.g. {only_tar[:3]}), {len(only_status)} success key(s) missing from the tar (e.g. {only_status[:3]})"
        )
    grid = spec.grid
    all_codes = np.concatenate(acc.codes) if acc.codes else np.zeros((0, grid, grid), np.int16)
    keys, image_sha256 = acc.keys, acc.image_sha256
    removed = removed_meanwhile(acc)
    if removed:  # a removal list was applied to this shard while it encoded: its items go, as apply_removals does
        keep = np.array([k not in removed for k in keys], dtype=bool)
        all_codes = all_codes[keep]
        keys = [k for k, kept in zip(keys, keep, strict=True) if kept]
        image_sha256 = [h for h, kept in zip(image_sha256, keep, strict=True) if kept]
        acc.status.update(removed)
    table = build_codes_table(keys, all_codes, acc.status, image_sha256, source_schema=acc.status_schema)
    report = check_codes_table(table, acc.shard_id, grid, spec.n_embed, required=table.schema.names)
    if not report.ok:
        raise CorruptShardError(f"shard {acc.shard_id:05d}: encoded output breaks the contract: {report.problems}")
    file_meta = {
        "model": spec.model_name,
        "grid": grid,
        "n_embed": spec.n_embed,
        "shard": f"{acc.shard_id:05d}",
        "source_tar_bytes": size(acc.tar_url),
        "undecodable": dict(acc.undecodable),
        # so an audit can tell a key left out on purpose from a lost one
        "undecodable_keys": sorted(acc.undecodable_keys),
        **({"tar_error": tar_error} if tar_error else {}),
        **(acc.provenance or spec.provenance),
        # the exact histogram (~19 KB packed for 10,000 images), for the report's codebook usage over all shards
        **({"code_usage": pack_code_usage(report.usage)} if report.usage is not None else {}),
    }
    # the parquet is written to a local temp file first (tempfile's folder), then published: a full disk on either
    # side is a DiskFullError naming the shard's parquet, not a bare "[Errno 28]" from pyarrow
    with disk_full_as_error(acc.dest, staging=tempfile.gettempdir()):
        nbytes = write_codes_parquet(table, acc.dest, file_meta)
    samples = np.stack(acc.samples) if acc.samples else None
    return CodeShardResult(
        shard_id=acc.shard_id,
        path=acc.dest,
        status_rows=len(acc.status),
        downloaded=len(success),
        encoded=table.num_rows,
        undecodable=dict(acc.undecodable),
        undecodable_keys=sorted(acc.undecodable_keys),
        bytes=nbytes,
        seconds=elapsed,
        encode_seconds=acc.encode_seconds,
        distinct_codes=report.distinct_codes,
        code_usage=report.usage,
        sample_images=samples,
        sample_codes=all_codes[: len(acc.samples)] if samples is not None else None,
        tar_error=tar_error,
    )
