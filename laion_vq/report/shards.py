"""The corrupted-shards report: every shard's checks, counts and exclusion in one table, and what they add up to.

The caller (a thin Dagster asset) reads the latest check evaluations and materializations of each partition,
builds the four input frames with the schemas below, and calls `build_report`; the table is written to
`StorageLayout.corrupted_shards_report()` and its summary and plot go into the asset's metadata. Everything
here is column work in polars, so 10,000 shards take well under a second; the only per-row Python is
decoding each shard's packed code usage and adding it into one accumulator, and each shard's success rate
(`shards.schema.success_rate`, the one definition: over the rows not removed nor filtered).

Verdicts, and why they are split the way they are:

- A check failing with severity ERROR (any severity but WARN: an unknown one must not pass quietly) names
  the shard in `corrupted_by`; WARN failures alone make it `warned`.
- `corrupted_by`, `reason`, `detail` and `corrupted_since` describe what the checks found, whatever the
  exclusion list says, so un-excluding a shard keeps its history. `corrupted` and `warned` are the verdicts
  that count: an **excluded shard is never corrupted nor warned** — operators already took it out, and the
  summary counts it under `excluded_shards` only (its check columns still show what failed).
- `corrupted_since` is carried forward from the previous report while the shard stays corrupted by exactly
  the same checks; otherwise it is the earliest failing ERROR evaluation's `checked_at`. A healed shard has
  none, and drops out of `corrupted_table`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import polars as pl

from laion_vq.report.previews import code_usage_png
from laion_vq.report.usage import sum_packed_code_usage
from laion_vq.shards.schema import success_rate
from laion_vq.shards.storage import exists, publish_bytes, read_bytes

#: One row per (shard, check): the check's latest evaluation. `reason` is a short stable label
#: ("image hash mismatch"), `detail` the first full problem text, naming the first bad key. A null
#: `passed` (no verdict) is not a failure; a null or unknown `severity` counts as ERROR.
CHECKS_SCHEMA = pl.Schema(
    {
        "shard": pl.String,
        "check": pl.String,
        "passed": pl.Boolean,
        "severity": pl.String,
        "reason": pl.String,
        "detail": pl.String,
        "checked_at": pl.Float64,
    }
)
#: One row per shard with a `raw_metadata_shards` materialization.
METADATA_SCHEMA = pl.Schema({"shard": pl.String, "rows": pl.Int64, "materialized_at": pl.Float64})
#: One row per shard with an `image_tars` materialization.
IMAGES_SCHEMA = pl.Schema(
    {
        "shard": pl.String,
        "rows": pl.Int64,
        "successes": pl.Int64,
        "tar_bytes": pl.Int64,
        "removed": pl.Int64,  # items taken out by removal lists (optional in the input: 0 when absent)
        "filtered": pl.Int64,  # rows the metadata's filter rejected (optional in the input: 0 when absent)
        "materialized_at": pl.Float64,
    }
)
#: One row per shard with a `code_parquets` materialization; `code_usage` is `pack_code_usage` text.
CODES_SCHEMA_REPORT = pl.Schema(
    {
        "shard": pl.String,
        "encoded": pl.Int64,
        "undecodable": pl.Int64,
        "distinct_codes": pl.Int64,
        "code_usage": pl.String,
        "checkpoint_sha256": pl.String,
        "materialized_at": pl.Float64,
    }
)
#: Per check C the table has `C__passed`, `C__severity`, `C__reason`, `C__detail`, `C__checked_at`.
CHECK_FIELDS = ("passed", "severity", "reason", "detail", "checked_at")
NO_REASON = "(no reason given)"


@dataclass
class ShardReport:
    """The table (one row per shard, sorted), its summary (plain numbers and dicts) and the summed code usage."""

    table: pl.DataFrame
    summary: dict
    code_usage: np.ndarray


def _conform(frame: pl.DataFrame | None, schema: pl.Schema, name: str) -> pl.DataFrame:
    """The frame with exactly the schema's columns and types; a missing column is an error naming it."""
    if frame is None:
        return pl.DataFrame(schema=schema)
    missing = [column for column in schema if column not in frame.columns]
    if missing:
        raise ValueError(f"{name} frame lacks column(s) {missing}; expected {list(schema)}")
    return frame.select([pl.col(column).cast(dtype) for column, dtype in schema.items()])


def _latest(frame: pl.DataFrame, keys: list[str], time_column: str) -> pl.DataFrame:
    """One row per key, the latest: callers should pass latest rows already, but a duplicate must not double-count."""
    if not frame.select(pl.struct(keys).is_duplicated().any()).item():
        return frame  # the usual case; sorting would copy 10,000 usage texts (~190 MB) for nothing
    return frame.sort(time_column, nulls_last=False).unique(subset=keys, keep="last")


def sum_code_usage(codes: pl.DataFrame, n_embed: int) -> tuple[np.ndarray, list[str]]:
    """Summed usage over the shards' packed histograms, and the shards whose text could not be read."""
    total, unreadable = sum_packed_code_usage(codes.get_column("code_usage"), n_embed)
    shards = codes.get_column("shard")
    return total, [shards[i] for i in unreadable]


def _check_columns(checks: pl.DataFrame) -> list[pl.DataFrame]:
    """One wide frame per check name: `shard` and that check's `C__*` columns."""
    names = sorted(checks.get_column("check").unique().drop_nulls().to_list())
    return [
        checks.filter(pl.col("check") == name).select(
            "shard", **{f"{name}__{field}": pl.col(field) for field in CHECK_FIELDS}
        )
        for name in names
    ]


def _failures(checks: pl.DataFrame) -> pl.DataFrame:
    """Failing evaluations, each marked ERROR or not; errors first then by check name, so `first` is the worst."""
    is_error = pl.col("severity").fill_null("ERROR").str.to_uppercase() != "WARN"
    return (
        checks.filter(pl.col("passed").not_())
        .with_columns(is_error=is_error)
        .sort(["shard", "is_error", "check"], descending=[False, True, False])
    )


def _verdicts(failures: pl.DataFrame) -> pl.DataFrame:
    """Per shard with any failure: the failing ERROR checks, the first failure's reason and detail, and since when."""
    error = pl.col("is_error")
    return failures.group_by("shard").agg(
        failing=pl.lit(True),
        corrupted_by=pl.when(error.any()).then(pl.col("check").filter(error).sort().str.join(",")),
        reason=pl.col("reason").first(),
        detail=pl.col("detail").first(),
        failing_since=pl.col("checked_at").filter(error).min(),
    )


def _previous_since(previous: pl.DataFrame | None) -> pl.DataFrame:
    schema = {"shard": pl.String, "previous_by": pl.String, "previous_since": pl.Float64}
    if previous is None or not {"shard", "corrupted_by", "corrupted_since"} <= set(previous.columns):
        return pl.DataFrame(schema=schema)
    return previous.select(
        pl.col("shard").cast(pl.String),
        previous_by=pl.col("corrupted_by").cast(pl.String),
        previous_since=pl.col("corrupted_since").cast(pl.Float64),
    ).unique(subset=["shard"], keep="first")


def _count_by(frame: pl.DataFrame, column: str) -> dict[str, int]:
    counts = frame.group_by(column).len().sort(column)
    return {str(key): int(n) for key, n in counts.iter_rows()}


def build_report(
    *,
    checks: pl.DataFrame | None,
    metadata: pl.DataFrame | None,
    images: pl.DataFrame | None,
    codes: pl.DataFrame | None,
    exclusions: dict[str, str],
    previous: pl.DataFrame | None = None,
    num_shards: int,
    n_embed: int,
) -> ShardReport:
    """One row per shard seen in any input or in `exclusions`, sorted by shard; see the module docstring
    for the verdict rules. Totals (images, codes, code usage) count every shard on record, excluded and
    corrupted ones included: they say what the pipeline did; the dataset card counts what it publishes."""
    checks = _latest(_conform(checks, CHECKS_SCHEMA, "checks"), ["shard", "check"], "checked_at")
    metadata = _latest(_conform(metadata, METADATA_SCHEMA, "metadata"), ["shard"], "materialized_at")
    for optional in ("removed", "filtered"):
        if images is not None and optional not in images.columns:
            images = images.with_columns(pl.lit(0, pl.Int64).alias(optional))
    images = _latest(_conform(images, IMAGES_SCHEMA, "images"), ["shard"], "materialized_at")
    codes = _latest(_conform(codes, CODES_SCHEMA_REPORT, "codes"), ["shard"], "materialized_at")
    excluded = pl.DataFrame(
        {"shard": list(exclusions), "excluded_reason": list(exclusions.values())},
        schema={"shard": pl.String, "excluded_reason": pl.String},
    )

    shards = pl.concat([frame.select("shard") for frame in (checks, metadata, images, codes, excluded)])
    table = (
        shards.unique()
        .join(excluded, on="shard", how="left")
        .with_columns(excluded=pl.col("shard").is_in(excluded.get_column("shard").implode()))
        .join(metadata.select("shard", metadata_rows="rows"), on="shard", how="left")
        .join(
            images.select("shard", "successes", "tar_bytes", "removed", "filtered", image_rows="rows"),
            on="shard",
            how="left",
        )
        .join(
            codes.select("shard", "encoded", "undecodable", "distinct_codes", "checkpoint_sha256"),
            on="shard",
            how="left",
        )
    )
    table = table.with_columns(success_rate=_success_rates(table))
    check_frames = _check_columns(checks)
    for frame in check_frames:
        table = table.join(frame, on="shard", how="left")

    failures = _failures(checks)
    table = (
        table.join(_verdicts(failures), on="shard", how="left")
        .join(_previous_since(previous), on="shard", how="left")
        .with_columns(
            corrupted=(pl.col("corrupted_by").is_not_null() & pl.col("excluded").not_()),
            warned=(pl.col("failing").fill_null(False) & pl.col("corrupted_by").is_null() & pl.col("excluded").not_()),
            corrupted_since=pl.when(pl.col("corrupted_by").is_null())
            .then(None)
            .when((pl.col("previous_by") == pl.col("corrupted_by")) & pl.col("previous_since").is_not_null())
            .then(pl.col("previous_since"))
            .otherwise(pl.col("failing_since")),
        )
    )
    check_column_names = [name for frame in check_frames for name in frame.columns[1:]]
    table = table.select(
        "shard", "excluded", "excluded_reason", "metadata_rows", "image_rows", "successes", "success_rate",
        "tar_bytes", "removed", "filtered", "encoded", "undecodable", "distinct_codes", "checkpoint_sha256",
        *check_column_names,
        "corrupted", "warned", "corrupted_by", "reason", "detail", "corrupted_since",
    ).sort("shard")  # fmt: skip

    usage, unreadable = sum_code_usage(codes, n_embed)
    summary = _summary(table, failures, usage, num_shards=num_shards, n_embed=n_embed)
    summary["usage_unreadable_shards"] = len(unreadable)
    return ShardReport(table=table, summary=summary, code_usage=usage)


def _success_rates(table: pl.DataFrame) -> pl.Series:
    """Each shard's `success_rate` (null: not downloaded, or no row left to download)."""
    columns = [table.get_column(c).to_list() for c in ("successes", "image_rows", "removed", "filtered")]
    rates = [
        None if rows is None else success_rate(successes or 0, rows, removed or 0, filtered or 0)
        for successes, rows, removed, filtered in zip(*columns, strict=True)
    ]
    return pl.Series("success_rate", rates, dtype=pl.Float64)


def _summary(table: pl.DataFrame, failures: pl.DataFrame, usage: np.ndarray, *, num_shards: int, n_embed: int) -> dict:
    def total(column: str) -> int:
        return int(table.get_column(column).sum() or 0)

    def present(column: str) -> int:
        return int(table.get_column(column).is_not_null().sum())

    corrupted = table.filter("corrupted").get_column("shard").implode()
    warned = table.filter("warned").get_column("shard").implode()
    error_failures = failures.filter(pl.col("is_error") & pl.col("shard").is_in(corrupted))
    warn_failures = failures.filter(pl.col("is_error").not_() & pl.col("shard").is_in(warned))

    def shards_by_reason(frame: pl.DataFrame) -> dict[str, int]:
        pairs = frame.select("shard", pl.col("reason").fill_null(NO_REASON)).unique()
        return _count_by(pairs, "reason")

    attempted, downloaded, removed = total("image_rows"), total("successes"), total("removed")
    rate = success_rate(downloaded, attempted, removed, total("filtered"))
    return {
        "num_shards": int(num_shards),
        "shards_with_metadata": present("metadata_rows"),
        "shards_downloaded": present("image_rows"),
        "shards_encoded": present("encoded"),
        "images_attempted": attempted,
        "images_downloaded": downloaded,
        "overall_success_rate": rate if rate is not None else 0.0,
        "codes": total("encoded"),
        "images_removed": removed,
        "shards_with_removals": int((table.get_column("removed").fill_null(0) > 0).sum()),
        "corrupted_shards": int(table.get_column("corrupted").sum()),
        "warned_shards": int(table.get_column("warned").sum()),
        "excluded_shards": int(table.get_column("excluded").sum()),
        "corrupted_by_check": _count_by(error_failures, "check"),
        "corrupted_by_reason": shards_by_reason(error_failures),
        "warned_by_reason": shards_by_reason(warn_failures),
        "codebook_used": int(np.count_nonzero(usage)),
        "n_embed": int(n_embed),
    }


def corrupted_table(report: ShardReport) -> pl.DataFrame:
    """The rows someone has to look at: corrupted, warned or excluded shards."""
    return report.table.filter(pl.col("corrupted") | pl.col("warned") | pl.col("excluded"))


def write_report(table: pl.DataFrame, url: str) -> int:
    """Publish the table as parquet atomically (the old report or the new one, never half of one); returns bytes."""
    buffer = io.BytesIO()
    table.write_parquet(buffer, compression="zstd")
    return publish_bytes(buffer.getvalue(), url)


def read_report(url: str) -> pl.DataFrame | None:
    """The report written last, or None before the first one (its `previous` is then nothing)."""
    if not exists(url):
        return None
    return pl.read_parquet(io.BytesIO(read_bytes(url)))


def _iso_utc(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cell(value: object, width: int = 160) -> str:
    """A markdown table cell: no pipe or line break may end it early; long texts are cut."""
    text = "—" if value is None else " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def summary_markdown(report: ShardReport, limit: int = 50) -> str:
    """Markdown for the Dagster UI: the counts, the corrupted shards (first `limit`) and the excluded ones. Short
    lines and narrow tables: the UI's metadata column is ~500 px wide and cuts what does not fit; each shard's
    detail (long: file paths) goes in a list below its table, where lines wrap."""
    s = report.summary
    lines = [
        f"- **{s['corrupted_shards']} corrupted** of {s['num_shards']} shards",
        f"- {s['warned_shards']} warned, {s['excluded_shards']} excluded",
        f"- {s['images_downloaded']:,} of {s['images_attempted']:,} images downloaded "
        f"({s['overall_success_rate']:.1%}{' of those not removed' if s.get('images_removed') else ''}), "
        f"{s['codes']:,} encoded",
        *(
            [
                f"- {s['images_removed']:,} removed by removal lists (withheld at download or taken out since), "
                f"in {s['shards_with_removals']} shard(s)"
            ]
            if s.get("images_removed")
            else []
        ),
        "",
    ]
    corrupted = report.table.filter("corrupted")
    if corrupted.height:
        lines += ["| shard | checks | reason | since (UTC) |", "| --- | --- | --- | --- |"]
        shown = list(corrupted.head(limit).iter_rows(named=True))
        for row in shown:
            cells = (row["shard"], row["corrupted_by"], row["reason"], _iso_utc(row["corrupted_since"]))
            lines.append("| " + " | ".join(_cell(c, 60) for c in cells) + " |")
        lines += ["", "**What failed**", ""]
        lines += [f"- `{row['shard']}`: {_cell(row['detail'], 300)}" for row in shown]
        if corrupted.height > limit:
            lines.append(f"\n… and {corrupted.height - limit} more in the report parquet.")
        lines.append("")
    warned = report.table.filter(pl.col("warned") & pl.col("corrupted").not_())
    if warned.height:
        lines += ["**Warned shards** (quality, not corruption: encoded like the rest)", ""]
        for row in warned.head(limit).iter_rows(named=True):
            lines.append(f"- `{row['shard']}`: {_cell(row['detail'], 300)}")
        if warned.height > limit:
            lines.append(f"\n… and {warned.height - limit} more in the report parquet.")
        lines.append("")
    excluded = report.table.filter("excluded")
    if excluded.height:
        lines += ["**Excluded shards**", ""]
        for row in excluded.head(limit).iter_rows(named=True):
            failing = f" (failing: {_cell(row['corrupted_by'])})" if row["corrupted_by"] else ""
            lines.append(f"- `{row['shard']}`: {_cell(row['excluded_reason'])}{failing}")
        if excluded.height > limit:
            lines.append(f"\n… and {excluded.height - limit} more in the report parquet.")
    return "\n".join(lines).rstrip() + "\n"


def code_usage_plot_png(usage: np.ndarray, width: int = 512, height: int = 128) -> bytes:
    """Codebook usage over all shards as PNG: codes sorted by count (rank → count, log scale), labelled
    "N codes, X used". A rank curve shows dead codes and a collapsed codebook at a glance, where a
    per-code histogram of 8192 bars looks like noise. Drawn by `previews.code_usage_png`."""
    usage = np.asarray(usage)
    return code_usage_png(np.sort(usage)[::-1], width=width, height=height)
