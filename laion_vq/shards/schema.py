"""The shard schemas: LAION metadata in, VQGAN code parquets out. One place for both."""

from __future__ import annotations

import pyarrow as pa

#: Columns of a LAION-400M metadata part, with the types LAION publishes them in.
#: URL and TEXT are required; the others ride along when a part has them.
LAION_SCHEMA = pa.schema(
    [
        pa.field("SAMPLE_ID", pa.int64()),
        pa.field("URL", pa.string()),
        pa.field("TEXT", pa.string()),
        pa.field("HEIGHT", pa.int64()),
        pa.field("WIDTH", pa.int64()),
        pa.field("LICENSE", pa.string()),
        pa.field("NSFW", pa.string()),
        pa.field("similarity", pa.float64()),
    ]
)
URL_COLUMN = "URL"
CAPTION_COLUMN = "TEXT"
REQUIRED_COLUMNS = (URL_COLUMN, CAPTION_COLUMN)
#: LAION columns img2dataset is asked to carry through into its status parquet and tar json.
EXTRA_COLUMNS = tuple(name for name in LAION_SCHEMA.names if name not in REQUIRED_COLUMNS)

#: Bytes per code row: 32×32 little-endian int16 for a 256×256 image at f8.
CODE_DTYPE = "<i2"

#: The seed dataset's output schema (VQGAN LAION-100M): `code` raw int16 bytes, `caption`/`url` renamed
#: the way img2dataset renames them, the other LAION columns as LAION spells them; then ours:
#: `image_sha256`, the sha256 (lowercase hex) of the exact JPEG bytes the encoder read from the tar (equal to
#: the status parquet's `jpg_sha256`), so a changed code can be told from a changed image.
CODES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("code", pa.binary(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("SAMPLE_ID", pa.int64()),
        pa.field("HEIGHT", pa.int64()),
        pa.field("WIDTH", pa.int64()),
        pa.field("LICENSE", pa.string()),
        pa.field("NSFW", pa.string()),
        pa.field("similarity", pa.float64()),
        pa.field("image_sha256", pa.string()),
    ]
)
#: CODES_SCHEMA columns added after code parquets were first published: written from then on, checked when
#: present, not required of older files (readers must not assume them).
OPTIONAL_CODE_COLUMNS = ("image_sha256",)
#: The schema of a code parquet without the optional columns (an older file, or a table built without them).
CODES_SCHEMA_REQUIRED = pa.schema([f for f in CODES_SCHEMA if f.name not in OPTIONAL_CODE_COLUMNS])
#: What every code parquet holds whatever its source: the rest follows the source's columns.
CORE_CODE_COLUMNS = ("key", "code", "caption", "url")

#: Status-parquet columns that describe the download (img2dataset's, then ours), not the source: they stay in
#: the status parquet. Every other status column is a source column (a reserved name kept as `source_<name>`)
#: and rides into the code parquet.
DOWNLOAD_COLUMNS = frozenset(
    {
        "key",
        "caption",
        "url",
        "status",
        "error_message",
        "width",
        "height",
        "original_width",
        "original_height",
        "exif",
        "md5",
        "sha256",
        "sha512",
        "failure_reason",
        "jpg_sha256",
    }
)


def codes_schema(status_schema: pa.Schema, with_image_sha256: bool = True) -> pa.Schema:
    """The code parquet's schema for a shard whose status parquet has `status_schema`: key, code, caption and
    url, then every source column with its type, in source order, then `image_sha256`. For a LAION-400M shard
    this is CODES_SCHEMA (the seed's layout)."""
    core = [f for f in CODES_SCHEMA if f.name in CORE_CODE_COLUMNS]
    source = [pa.field(f.name, f.type) for f in status_schema if f.name not in DOWNLOAD_COLUMNS]
    tail = [CODES_SCHEMA.field("image_sha256")] if with_image_sha256 else []
    return pa.schema([*core, *source, *tail])


#: Status of a status-parquet row a removal list took out (never downloaded, or removed after): one home for
#: the download stage, the removal lists and the audits.
REMOVED_STATUS = "removed"
#: Status of a status-parquet row the metadata's filter (`LAION_VQ_FILTER`) rejected: never requested.
FILTERED_STATUS = "filtered"


def success_rate(successes: int, rows: int, removed: int = 0, filtered: int = 0) -> float | None:
    """A shard's download success rate: images in the tar over the rows still subject to download. Rows a
    removal list or the filter took out were never to be downloaded (or were removed since), so they count
    neither for nor against it; a removal must not read as a failed download. None when no row is left to
    judge (every row removed or filtered, or no row at all). The one definition: the stage, the partitions'
    metadata, the audit, the report and the card all use it."""
    requested = rows - removed - filtered
    return successes / requested if requested > 0 else None


class SchemaError(ValueError):
    """Input whose columns or types do not match what a stage needs."""


def conform_laion_table(table: pa.Table, source: str) -> pa.Table:
    """Return `table` with exactly LAION_SCHEMA's columns, in order, cast to LAION's types.

    Missing optional columns become nulls (LAION parts differ a little); a missing URL or caption
    column, or a column that cannot be cast, is a SchemaError naming the source and the columns seen.
    """
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise SchemaError(
            f"{source}: missing required LAION column(s) {missing}; columns present: {table.column_names}"
        )
    columns = []
    for field in LAION_SCHEMA:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise SchemaError(
                f"{source}: column {field.name!r} has type {column.type}, cannot be read as {field.type}: {err}"
            ) from err
    return pa.Table.from_arrays(columns, schema=LAION_SCHEMA)
