"""Download one LAION shard with img2dataset: the one module that touches img2dataset's internals.

img2dataset has no public "download shard N" entry point (its `download()` shards a whole URL list
itself, runs a logger process and swallows per-shard errors). We need one Dagster partition per
shard, with errors that propagate, so we build the same Resizer / Downloader / WebDatasetSampleWriter
that `img2dataset.main.download()` builds and call `Downloader.download_shard` directly. Because that
relies on internals, the img2dataset version is pinned and checked when this module is imported.

img2dataset stays the crawler; two seams put our guards around it:

- the fetch: img2dataset 1.47.0 fetches with `urllib` in the module-level `download_image`, which
  reaches any address, follows any redirect and reads any body whole. We install `_guarded_download_image`
  in its place; the Downloader hands its `timeout` argument through untouched, so ours passes a
  `_ShardFetch` there (the guard's `FetchLimits` and the shard's `ByteBudget`) and the guard
  (`guard.fetch`: address policy after DNS, redirect hops, byte cap, deadline, memory budget, robots
  opt-outs) does the request. A plain number still goes to img2dataset's own function, so plain
  img2dataset in the same process (the benchmark's reference) is unchanged;
- the resizer: `_CheckedResizer` refuses empty, non-image, truncated and bomb-sized bodies from their
  headers (`image_checks`) before OpenCV decodes anything, and hands 16-bit and EXIF-rotated images
  over as 8-bit upright PNGs, which OpenCV would otherwise store white or sideways.

Removal lists (items taken out of the dataset: Re-LAION removals, takedowns) reach a download resolved
into two mappings. Listed rows (`removed_rows`, by row index) are never requested: img2dataset is given
only the other rows, and our writer stores each under the key img2dataset would have given it in the
full shard (`expected_key` of its row index: it numbers rows by position in its input), so withholding
rows changes no other row's key; the withheld rows are merged back into the status parquet afterwards
(`shard_files.merge_removed`). Listed image hashes (`removed_hashes`) are checked by the resizer on the
downloaded bytes before anything decodes them (img2dataset's `sha256`) and on the re-encoded image
before it is written (our `jpg_sha256`); a match is refused there and its status row marked `removed`
by the writer, so it never reaches the tar.

After img2dataset finishes, the status parquet is sorted by key and gains `failure_reason` (the
normalised reason, `reasons.normalise`; a removed row's is its removal list's reason) and `jpg_sha256`
(the hash of the JPEG stored in the tar, so a later audit can prove the tar holds the images that were
downloaded; img2dataset's `sha256` is the hash of the original download).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import io
import math
import operator
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from laion_vq.download.guard import ByteBudget, FetchError, FetchLimits, fetch
from laion_vq.download.image_checks import prepare_image
from laion_vq.download.options import DownloadOptions
from laion_vq.download.shard_files import (
    annotate_status,
    attach_columns,
    merge_removed,
    removal_reason,
    removed_by_reason,
    verify_shard_files,
)
from laion_vq.shards.disk_full import DISK_FULL_ERRNOS, disk_full_as_error
from laion_vq.shards.numbering import SHARD_DIGITS
from laion_vq.shards.schema import CAPTION_COLUMN, EXTRA_COLUMNS, URL_COLUMN

# albumentations (an img2dataset dependency) checks PyPI for updates when imported; wandb is imported
# by img2dataset.logger but never initialised by this module. Keep both offline and quiet.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

#: The img2dataset release whose internals (Downloader, Resizer, WebDatasetSampleWriter, compute_key,
#: the `_stats.json` layout) this module was written and tested against.
PINNED_IMG2DATASET_VERSION = "1.47.0"

#: Column names img2dataset reserves for itself (`img2dataset.main.arguments_validator`).
RESERVED_COLUMNS = frozenset(
    {
        "key",
        "caption",
        "url",
        "width",
        "height",
        "original_width",
        "original_height",
        "status",
        "error_message",
        "exif",
        "md5",
        "sha256",
        "sha512",
    }
)


def check_img2dataset_version(installed: str) -> None:
    """Refuse any img2dataset but the pinned one: we call its internals, which change without notice."""
    if installed != PINNED_IMG2DATASET_VERSION:
        raise ImportError(
            f"laion_vq.download needs img2dataset=={PINNED_IMG2DATASET_VERSION} (it drives img2dataset's "
            f"internal Downloader.download_shard), but img2dataset {installed} is installed. Install "
            f"img2dataset=={PINNED_IMG2DATASET_VERSION} or re-check laion_vq/download/img2dataset_shard.py "
            "against the new release and update the pin."
        )


def installed_img2dataset_version() -> str:
    """The installed img2dataset distribution's version (img2dataset has no `__version__`)."""
    try:
        return importlib.metadata.version("img2dataset")
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError(
            f"laion_vq.download needs img2dataset=={PINNED_IMG2DATASET_VERSION}, which is not installed"
        ) from err


check_img2dataset_version(installed_img2dataset_version())


@functools.cache
def _img2dataset() -> dict[str, Any]:
    """Import img2dataset lazily: it pulls in torch, webdataset and wandb (~3 s), which merely
    importing `laion_vq.download` (e.g. when Dagster loads definitions) should not pay for. Typed Any:
    img2dataset has no type information, and we subclass and patch what it holds."""
    from img2dataset import downloader, resizer, writer

    return {"downloader": downloader, "resizer": resizer, "writer": writer}


@dataclass
class ShardDownloadResult:
    """What one shard download produced (local paths) and img2dataset's own counts for it.

    `status_counts` is the `_stats.json` `status_dict`: error message → count, plus a "success" entry
    (and a "removed" one when a removal list took rows out).
    `seconds` is the wall time of the whole call (feather write, download, verification).
    count = successes + failed_to_download + failed_to_resize + removed; `failures_by_reason` holds no
    removals (they are `removed_by_reason`, by the removal list's reason).
    """

    shard_id: int
    tar_path: str
    parquet_path: str
    stats_path: str
    count: int
    successes: int
    failed_to_download: int
    failed_to_resize: int
    status_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_tar: int = 0
    #: normalised reason → count, most frequent first; reason → the first few failing URLs (by key)
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    failure_examples: dict[str, list[str]] = field(default_factory=dict)
    #: rows a removal list took out: never requested (by row) or dropped right after download (by hash)
    removed: int = 0
    removed_by_reason: dict[str, int] = field(default_factory=dict)
    #: rows the metadata's filter rejected: never requested
    filtered: int = 0


def shard_name(shard_id: int, shard_digits: int = SHARD_DIGITS) -> str:
    """The output file stem img2dataset uses for a shard: `3` → `"00003"`."""
    _check_shard_id(shard_id, shard_digits)
    return f"{shard_id:0{shard_digits}d}"


def expected_key(shard_id: int, index: int, samples_per_shard: int, shard_digits: int = SHARD_DIGITS) -> str:
    """The sample key img2dataset writes for row `index` of shard `shard_id` (via its `compute_key`).

    For 10,000 samples/shard and 5 shard digits that is `NNNNNiiii`: shard 3, row 1 → `"000030001"`.
    """
    _check_shard_id(shard_id, shard_digits)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not 0 <= index < samples_per_shard:
        raise ValueError(f"index must be in 0 … {samples_per_shard - 1}, got {index}")
    oom_sample_per_shard = math.ceil(math.log10(samples_per_shard))
    return _img2dataset()["downloader"].compute_key(index, shard_id, oom_sample_per_shard, shard_digits)


def download_shard(
    rows: pa.Table,
    shard_id: int,
    output_dir: str,
    *,
    samples_per_shard: int,
    shard_digits: int = SHARD_DIGITS,
    url_col: str = URL_COLUMN,
    caption_col: str = CAPTION_COLUMN,
    additional_columns: Sequence[str] = EXTRA_COLUMNS,
    options: DownloadOptions = DownloadOptions(),  # noqa: B008 - frozen, so a shared default is safe
    removed_rows: Mapping[int, str] | None = None,
    removed_hashes: Mapping[str, str] | None = None,
    filtered_rows: Mapping[int, str] | None = None,
    hash_col: str | None = None,
    hash_type: str | None = None,
) -> ShardDownloadResult:
    """Download shard `shard_id` (its metadata rows, in order) into `output_dir` as img2dataset would.

    Writes `{shard}.tar` (webdataset: `<key>.jpg/.txt/.json` per success), `{shard}.parquet` (one
    status row per input row) and `{shard}_stats.json` into the LOCAL directory `output_dir`; moving
    them to final storage is the caller's job. The status parquet is sorted by key; tar members come
    in completion order: join on `key` (see `expected_key`). Columns of `additional_columns` that `rows`
    lacks are skipped (LAION parts vary). Any error propagates; on error, or if the outputs do not
    account for every input row, the shard's partial outputs are removed and an exception is raised,
    so a partial shard is never reported as done.

    Removal lists: `removed_rows` (row index in `rows` → the list's reason) are never requested; their
    status rows say `removed` with that reason as `failure_reason`, with their real url, caption and
    columns. `removed_hashes` (sha256 hex → reason) drops an image whose downloaded bytes (img2dataset's
    `sha256`) or stored image (`jpg_sha256`) hash is listed, before it is written: status `removed` too.
    No removed row is in the tar, and every other row keeps the key it has in a download without removals.

    `filtered_rows` (row index → the filter predicate they failed) are never requested either: status
    `filtered`, the predicate as `failure_reason`. With `hash_col`/`hash_type` (DataComp's `sha256`), an image
    whose original bytes hash otherwise is a failure `hash mismatch` (img2dataset's `verify_hash`).

    Every column of `additional_columns` is kept in the status parquet with its type: under its own name, or
    `source_<name>` where img2dataset reserves the name (COYO's `width`, DataComp's `sha256`); columns a json
    cannot hold (timestamps, binary) skip the sample's json and join the status parquet by key.
    """
    started = time.perf_counter()
    table, column_list, aside = _prepare_rows(
        rows, shard_id, samples_per_shard, shard_digits, url_col, caption_col, additional_columns, hash_col, hash_type
    )
    withheld = _check_removed_rows(removed_rows, table.num_rows)
    filtered = {i: p for i, p in _check_removed_rows(filtered_rows, table.num_rows).items() if i not in withheld}
    listed_hashes = _check_removed_hashes(removed_hashes)
    keys = [expected_key(shard_id, i, samples_per_shard, shard_digits) for i in range(table.num_rows)]
    kept = [i for i in range(table.num_rows) if i not in withheld and i not in filtered]
    # img2dataset numbers the rows it is given 0, 1, 2…: the writer turns the key of the j-th row it was
    # given back into the key of that row in the full shard (identical when nothing is withheld).
    key_of = {keys[j]: keys[i] for j, i in enumerate(kept) if i != j}
    if "://" in output_dir and not output_dir.startswith("file://"):
        raise ValueError(f"output_dir must be a local directory, got {output_dir!r}")
    output_dir = os.path.abspath(output_dir.removeprefix("file://"))
    os.makedirs(output_dir, exist_ok=True)
    if options.resize_mode == "border":
        _check_border_padding_is_white()

    name = shard_name(shard_id, shard_digits)
    tar_path = os.path.join(output_dir, f"{name}.tar")
    parquet_path = os.path.join(output_dir, f"{name}.parquet")
    stats_path = os.path.join(output_dir, f"{name}_stats.json")
    outputs = (tar_path, parquet_path, stats_path)
    _remove(outputs)  # stale files from an earlier attempt must not pass for this attempt's output

    # a full scratch filesystem is named as such (not a shard "missing rows"), once the partial outputs are gone
    with disk_full_as_error(tar_path):
        try:
            with tempfile.TemporaryDirectory(prefix=f"laion_vq_shard_{name}_") as tmp:
                # Same file the Reader would write: an Arrow IPC file of exactly `column_list`, renamed.
                feather_path = os.path.join(tmp, f"{shard_id}.feather")
                to_download = table.take(pa.array(kept, pa.int64())) if len(kept) < table.num_rows else table
                with pa.OSFile(feather_path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(to_download)
                digests: dict[str, str] = {}
                removed: dict[str, str] = {}  # key → reason, filled by the writer for images dropped by hash
                writer_state = _WriterState(digests, key_of, removed)
                downloader = _build_downloader(
                    output_dir,
                    column_list,
                    samples_per_shard,
                    shard_digits,
                    options,
                    writer_state,
                    listed_hashes,
                    hash_type if hash_col else None,
                )
                # Not `downloader(...)`: Downloader.__call__ prints and swallows exceptions.
                downloader.download_shard((shard_id, feather_path))
                if writer_state.write_error is not None:  # img2dataset swallowed it, sample by sample
                    raise writer_state.write_error

            def keyed(indices: list[int]) -> pa.Table:
                return table.take(pa.array(indices, pa.int64())).append_column(
                    "key", pa.array([keys[i] for i in indices], pa.string())
                )

            merge_removed(parquet_path, stats_path, keyed(sorted(withheld)), keyed(sorted(filtered)))
            removed.update({keys[i]: reason for i, reason in withheld.items()})
            if aside.num_columns:
                attach_columns(parquet_path, aside.append_column("key", pa.array(keys, pa.string())))
            stats = verify_shard_files(
                tar_path, parquet_path, stats_path, shard_id, set(keys), options.encode_format, set(digests)
            )
            failures_by_reason, failure_examples = annotate_status(
                parquet_path, stats_path, digests, removed=removed, filtered={keys[i]: p for i, p in filtered.items()}
            )
        except BaseException:
            _remove(outputs)
            raise

    return ShardDownloadResult(
        shard_id=shard_id,
        tar_path=tar_path,
        parquet_path=parquet_path,
        stats_path=stats_path,
        count=stats["count"],
        successes=stats["successes"],
        failed_to_download=stats["failed_to_download"],
        failed_to_resize=stats["failed_to_resize"],
        status_counts={str(k): int(v) for k, v in stats["status_dict"].items()},
        seconds=time.perf_counter() - started,
        bytes_tar=os.path.getsize(tar_path),
        failures_by_reason=failures_by_reason,
        failure_examples=failure_examples,
        removed=stats["removed"],
        removed_by_reason=removed_by_reason(removed),
        filtered=stats.get("filtered", 0),
    )


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _check_removed_rows(removed_rows: Mapping[int, str] | None, num_rows: int) -> dict[int, str]:
    """Row index → reason, each index a row of the shard (0 … num_rows − 1): a removal list resolved
    against the wrong shard must fail, not remove nothing or the wrong rows."""
    checked: dict[int, str] = {}
    for index, reason in (removed_rows or {}).items():
        try:
            i = operator.index(index)
        except TypeError as err:
            raise TypeError(f"removed_rows keys are row indices (int), got {index!r}") from err
        if not 0 <= i < num_rows:
            raise ValueError(f"removed_rows: row {i} is not a row of this shard (0 … {num_rows - 1})")
        checked[i] = removal_reason(reason)
    return checked


def _check_removed_hashes(removed_hashes: Mapping[str, str] | None) -> dict[str, str]:
    """sha256 hex (any case) → reason, keyed lowercase; anything but 64 hex digits is an error, never a
    hash that silently matches nothing."""
    checked: dict[str, str] = {}
    for digest, reason in (removed_hashes or {}).items():
        hex_digest = digest.strip().lower() if isinstance(digest, str) else ""
        if not _SHA256_HEX.fullmatch(hex_digest):
            raise ValueError(f"removed_hashes: {digest!r} is not a sha256 hex digest (64 hex digits)")
        checked[hex_digest] = removal_reason(reason)
    return checked


def _check_shard_id(shard_id: int, shard_digits: int) -> None:
    if shard_digits < 1:
        raise ValueError(f"shard_digits must be >= 1, got {shard_digits}")
    if not 0 <= shard_id < 10**shard_digits:
        raise ValueError(f"shard_id {shard_id} does not fit in {shard_digits} digits (0 … {10**shard_digits - 1})")


def _is_plain_type(t: pa.DataType) -> bool:
    """Types whose Python values json.dumps can write (img2dataset puts them in each sample's .json)."""
    return (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_boolean(t)
        or pa.types.is_null(t)
    )


def _is_json_type(t: pa.DataType) -> bool:
    """Plain types, and lists and structs of them (DataComp's `face_bboxes`): what a sample's json can hold."""
    if _is_plain_type(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _is_json_type(t.value_type)
    if pa.types.is_struct(t):
        return all(_is_json_type(t.field(i).type) for i in range(t.num_fields))
    return False


def stored_column_name(column: str) -> str:
    """The name a source column is kept under beside img2dataset's own columns: its own, or `source_<name>`
    where img2dataset reserves the name (COYO's `width`, DataComp's `sha256`)."""
    return f"source_{column}" if column in RESERVED_COLUMNS or column in OWN_STATUS_COLUMNS else column


#: Status-parquet columns we add after img2dataset (`shard_files.annotate_status`).
OWN_STATUS_COLUMNS = frozenset({"failure_reason", "jpg_sha256"})


def _prepare_rows(
    rows: pa.Table,
    shard_id: int,
    samples_per_shard: int,
    shard_digits: int,
    url_col: str,
    caption_col: str,
    additional_columns: Sequence[str],
    hash_col: str | None = None,
    hash_type: str | None = None,
) -> tuple[pa.Table, list[str], pa.Table]:
    """Validate the shard's metadata and shape it like img2dataset's Reader does.

    The column list is `additional + ["caption"] (+ [hash_type]) + ["url"]`, with url/caption (and the hash
    column) renamed, exactly as `Reader.column_list` is built; the table holds those columns in that order.
    Additional columns whose names img2dataset reserves go by `stored_column_name`. The third table holds the
    columns kept out of img2dataset (types a json cannot hold, and the source's hash column under its stored
    name), row for row, to be joined into the status parquet.
    """
    _check_shard_id(shard_id, shard_digits)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not isinstance(rows, pa.Table):
        raise TypeError(f"rows must be a pyarrow.Table, got {type(rows).__name__}")
    present = rows.column_names
    for role, col in (("URL", url_col), ("caption", caption_col)):
        if col not in present:
            raise ValueError(f"{role} column {col!r} is missing from the shard's rows; columns present: {present}")
    if url_col == caption_col:
        raise ValueError(f"url_col and caption_col must differ, both are {url_col!r}")
    if len(set(present)) != len(present):
        raise ValueError(f"the shard's rows have duplicate column names: {present}")
    if rows.num_rows > samples_per_shard:
        raise ValueError(f"shard {shard_id} has {rows.num_rows} rows, more than samples_per_shard={samples_per_shard}")
    url_type = rows.schema.field(url_col).type
    if not (pa.types.is_string(url_type) or pa.types.is_large_string(url_type)):
        raise ValueError(f"URL column {url_col!r} must be strings, got {url_type}")
    if hash_col is not None:
        if hash_type not in ("md5", "sha256", "sha512"):
            raise ValueError(f"hash type must be md5, sha256 or sha512, got {hash_type!r}")
        if hash_col not in present:
            raise ValueError(f"hash column {hash_col!r} is missing from the shard's rows; columns present: {present}")

    extra: list[str] = []
    aside: list[str] = []
    for col in additional_columns:
        if col in (url_col, caption_col):
            raise ValueError(f"additional column {col!r} is the URL or caption column; it is always saved")
        if col not in present or col in extra or col in aside or col == hash_col:
            continue  # LAION parts vary: a column this part lacks is simply not carried
        (extra if _is_json_type(rows.schema.field(col).type) else aside).append(col)
    extra_names = [stored_column_name(c) for c in extra]
    if len(set(extra_names)) != len(extra_names) or set(extra_names) & set(present) - set(extra):
        raise ValueError(f"columns {extra} clash with each other once renamed to {extra_names}")

    hashed = [hash_col] if hash_col is not None else []
    column_list = [*extra_names, "caption", *([hash_type] if hash_col and hash_type else []), "url"]
    table = rows.select([*extra, caption_col, *hashed, url_col]).rename_columns(column_list)
    caption_type = table.schema.field("caption").type
    if pa.types.is_binary(caption_type) or pa.types.is_large_binary(caption_type):
        # Some LAION parts carry captions as raw bytes, not always UTF-8: keep the text, mark bad bytes (U+FFFD).
        captions = [None if b is None else b.decode("utf-8", "replace") for b in table.column("caption").to_pylist()]
        table = table.set_column(column_list.index("caption"), "caption", pa.array(captions, pa.string()))
    kept_aside = [*aside, *hashed]
    aside_table = rows.select(kept_aside).rename_columns([stored_column_name(c) for c in kept_aside])
    return table, column_list, aside_table


def _build_downloader(
    output_dir: str,
    column_list: list[str],
    samples_per_shard: int,
    shard_digits: int,
    options: DownloadOptions,
    state: _WriterState,
    removed_hashes: Mapping[str, str] | None = None,
    verify_hash_type: str | None = None,
) -> Any:
    """The Resizer + Downloader + WebDatasetSampleWriter wiring of `img2dataset.main.download()`, with
    the guards, a resizer that refuses images whose hash is in `removed_hashes`, and a writer that stores
    each sample under its key in the full shard and records each stored image's sha256 (`_WriterState`)."""
    mods = _img2dataset()
    _install_guarded_fetch()
    resizer = mods["resizer"].Resizer(
        image_size=options.image_size,
        resize_mode=options.resize_mode,
        resize_only_if_bigger=options.resize_only_if_bigger,
        upscale_interpolation=options.upscale_interpolation,
        downscale_interpolation=options.downscale_interpolation,
        encode_quality=options.encode_quality,
        encode_format=options.encode_format,
        skip_reencode=False,
        disable_all_reencoding=False,
        min_image_size=options.min_image_size,
        max_image_area=options.max_image_area,
        max_aspect_ratio=options.max_aspect_ratio,
        blurrer=None,
    )
    directives = list(options.disallowed_header_directives) or None  # download(): [] means "honour none"
    return mods["downloader"].Downloader(
        sample_writer_class=functools.partial(_hashing_writer_class(), state),
        resizer=_CheckedResizer(resizer, options.max_image_area, removed_hashes or {}, options.encode_format),
        thread_count=options.thread_count,
        save_caption=True,
        extract_exif=options.extract_exif,
        output_folder=output_dir,
        column_list=column_list,
        # img2dataset hands `timeout` through to `_guarded_download_image`: ours carries the guard's limits
        timeout=_ShardFetch(options.fetch_limits(), ByteBudget(options.buffer_bytes, overdraft=options.max_bytes)),
        number_sample_per_shard=samples_per_shard,
        oom_shard_count=shard_digits,
        compute_hash=options.compute_hash,
        verify_hash_type=verify_hash_type,
        encode_format=options.encode_format,
        retries=options.retries,
        user_agent_token=options.user_agent_token,
        disallowed_header_directives=directives,
        blurring_bbox_col=None,
    )


@dataclass(frozen=True)
class _ShardFetch:
    """What our Downloader passes where img2dataset expects a timeout: the guard's limits and the
    shard's memory budget for bodies in flight."""

    limits: FetchLimits
    budget: ByteBudget


class _BudgetedBody(io.BytesIO):
    """A downloaded body whose bytes go back to the shard's budget when img2dataset closes it (it closes
    every stream it is done with) or, failing that, when it is garbage-collected."""

    def __init__(self, data: bytes, budget: ByteBudget) -> None:
        super().__init__(data)
        self._budget, self._held = budget, len(data)

    def close(self) -> None:
        held, self._held = self._held, 0
        if held:
            self._budget.give(held)
        super().close()


class _Removal(str):
    """An error message our resizer returns for an image whose hash a removal list holds, carrying the
    list's reason: img2dataset hands it to the writer untouched (as the row's `error_message`), and the
    writer tells it from any real resize error by its type, not its text."""

    reason: str

    def __new__(cls, message: str, reason: str) -> _Removal:
        self = super().__new__(cls, message)
        self.reason = reason
        return self


@dataclass
class _WriterState:
    """What the writer of one shard fills in and reads: `digests` (key → sha256 of the stored image),
    `keys` (the key img2dataset gave a row → its key in the full shard, where rows were withheld) and
    `removed` (key → removal reason of each image dropped by hash)."""

    digests: dict[str, str]
    keys: Mapping[str, str] = field(default_factory=dict)
    removed: dict[str, str] = field(default_factory=dict)
    #: the first full-disk error a write met: img2dataset catches a sample's write error, prints it and goes on
    #: with the next sample, so without it a full scratch disk would end as a shard "missing rows"
    write_error: OSError | None = None


@functools.cache
def _hashing_writer_class() -> type:
    """img2dataset's WebDatasetSampleWriter that also records sha256 of the exact bytes it stores, by key:
    the proof a later audit checks the tar against, at the cost of one hash per image (no re-read). It
    writes each sample (tar names, json, status row) under its key in the full shard, and marks the rows
    of images the resizer refused for a removal list `removed`."""

    base: Any = _img2dataset()["writer"].WebDatasetSampleWriter

    class HashingWebDatasetSampleWriter(base):
        def __init__(self, state: _WriterState, *args: Any) -> None:
            super().__init__(*args)
            self.state = state

        def write(self, img_str, key, caption, meta):
            key = self.state.keys.get(key, key)
            meta["key"] = key
            message = meta.get("error_message")
            if isinstance(message, _Removal):
                meta["status"], meta["error_message"] = "removed", str(message)
                self.state.removed[key] = message.reason
            if img_str is not None:
                self.state.digests[key] = hashlib.sha256(img_str).hexdigest()
            try:
                super().write(img_str, key, caption, meta)
            except OSError as err:
                if err.errno in DISK_FULL_ERRNOS and self.state.write_error is None:
                    self.state.write_error = err
                raise

    return HashingWebDatasetSampleWriter


@functools.cache
def _install_guarded_fetch() -> None:
    """Put `_guarded_download_image` where img2dataset's Downloader looks up its fetch function."""
    downloader = _img2dataset()["downloader"]
    if getattr(downloader.download_image, "__wrapped__", None) is None:
        original = downloader.download_image

        @functools.wraps(original)
        def _guarded_download_image(row, timeout, user_agent_token, disallowed_header_directives):
            if not isinstance(timeout, _ShardFetch):  # plain img2dataset use: leave it as it was
                return original(row, timeout, user_agent_token, disallowed_header_directives)
            key, url = row
            try:
                return key, _BudgetedBody(fetch(url, timeout.limits, timeout.budget), timeout.budget), None
            except FetchError as err:
                return key, None, str(err)
            except Exception as err:  # img2dataset's contract: the error as a message
                return key, None, f"{type(err).__name__}: {err}"

        downloader.download_image = _guarded_download_image


class _CheckedResizer:
    """img2dataset's Resizer behind `prepare_image`: a body that is empty, not an image, truncated or
    bomb-sized is refused from its header before OpenCV decodes it; 16-bit and EXIF-rotated images are
    handed over as 8-bit upright PNGs. Same call and return shape as the Resizer.

    With `removed_hashes` (sha256 hex → reason), a body whose sha256 is listed is refused before anything
    decodes it, and a resized image whose sha256 is listed before it is written: the error is a `_Removal`,
    which the writer turns into a `removed` status row. img2dataset calls the resizer with the downloaded
    bytes right after the download and writes only what it returns."""

    def __init__(
        self,
        resizer: Any,
        max_pixels: float,
        removed_hashes: Mapping[str, str] | None = None,
        encode_format: str = "jpg",
    ) -> None:
        self.resizer, self.max_pixels = resizer, max_pixels
        self.removed_hashes, self.encode_format = removed_hashes or {}, encode_format

    def _listed(self, data: bytes, what: str) -> _Removal | None:
        if not self.removed_hashes:
            return None
        digest = hashlib.sha256(data).hexdigest()
        reason = self.removed_hashes.get(digest)
        return None if reason is None else _Removal(f"removed: {what} sha256 {digest} is listed", reason)

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple:
        data = img_stream.getvalue()
        listed = self._listed(data, "downloaded image")
        if listed is not None:
            return None, None, None, None, None, listed
        prepared, problem = prepare_image(data, self.max_pixels)
        if problem is not None:
            return None, None, None, None, None, problem
        assert prepared is not None  # prepare_image returns the bytes whenever it names no problem
        result = self.resizer(img_stream if prepared is data else io.BytesIO(prepared), blurring_bbox_list)
        listed = None if result[0] is None else self._listed(result[0], f"stored {self.encode_format}")
        if listed is not None:
            return None, None, None, None, None, listed
        return result


@functools.cache
def _check_border_padding_is_white() -> None:
    """Fail loudly if img2dataset's "border" mode stops padding white (LAION-400M's look).

    img2dataset 1.47.0 passes `value=[255, 255, 255]` to albumentations' PadIfNeeded; albumentations
    1.4.x maps that deprecated argument to `fill`, but a release that drops it would pad black
    silently. One tiny resize (milliseconds, once per process) turns that drift into an error.
    """
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    resizer = _img2dataset()["resizer"].Resizer(image_size=32, resize_mode="border", resize_only_if_bigger=False)
    img_bytes, *_, err = resizer(io.BytesIO(buf.getvalue()))
    if err is not None:
        raise RuntimeError(f"img2dataset's Resizer failed on a tiny test image: {err}")
    corner = np.asarray(Image.open(io.BytesIO(img_bytes)).convert("RGB"))[0, 0]
    if corner.min() < 250:
        try:
            albumentations_version = importlib.metadata.version("albumentations")
        except importlib.metadata.PackageNotFoundError:
            albumentations_version = "unknown"
        raise RuntimeError(
            f"img2dataset's border resize pads with {corner.tolist()} instead of white with albumentations "
            f"{albumentations_version}: PadIfNeeded no longer honours img2dataset's `value=` argument "
            "(it became `fill=`). Pin albumentations<2 or wrap the Resizer here."
        )


def _remove(paths: Sequence[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
