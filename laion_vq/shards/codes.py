"""The code parquet: build it, write it, and prove it keeps the seed dataset's contract.

Contract (VQGAN LAION-100M): one parquet per shard, one row per encoded image, sorted by `key`;
`code` holds `grid*grid` little-endian int16 (2048 bytes at f8/256 px) that
`np.frombuffer(b, np.int16).reshape(grid, grid)` decodes, every value in `[0, n_embed)`. Files written
from now on also carry `image_sha256` (see `OPTIONAL_CODE_COLUMNS`): 64 lowercase hex characters per row.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_vq.shards.numbering import shard_key
from laion_vq.shards.schema import (
    CODE_DTYPE,
    CODES_SCHEMA,
    CODES_SCHEMA_REQUIRED,
    OPTIONAL_CODE_COLUMNS,
    codes_schema,
)
from laion_vq.shards.storage import filesystem, publish_file


def build_codes_table(
    keys: Sequence[str],
    codes: np.ndarray,
    meta: Mapping[str, Mapping[str, object]],
    image_sha256: Sequence[str] | None = None,
    source_schema: pa.Schema | None = None,
) -> pa.Table:
    """Rows sorted by key; `meta[key]` holds the sample's img2dataset row (caption, url, source columns);
    `image_sha256[i]` the hex sha256 of image i's JPEG bytes (without it: the older layout, no such column).
    `source_schema` is the status parquet's schema: every source column in it is kept (`codes_schema`);
    without it, LAION-400M's columns (CODES_SCHEMA)."""
    if len(keys) != len(codes):
        raise ValueError(f"{len(keys)} keys but {len(codes)} code grids")
    if image_sha256 is not None and len(image_sha256) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(image_sha256)} image hashes")
    if source_schema is not None:
        schema = codes_schema(source_schema, with_image_sha256=image_sha256 is not None)
    else:
        schema = CODES_SCHEMA if image_sha256 is not None else CODES_SCHEMA_REQUIRED
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable") if keys else np.array([], dtype=int)
    little = np.ascontiguousarray(codes.astype(CODE_DTYPE, copy=False))
    columns: dict[str, list] = {name: [] for name in schema.names}
    for i in order:
        key = keys[i]
        row = meta.get(key, {})
        columns["key"].append(key)
        columns["code"].append(little[i].tobytes())
        for name in schema.names[2:]:
            if name == "image_sha256":
                assert image_sha256 is not None  # the schema has this column only when the hashes are given
                columns[name].append(image_sha256[i])
            else:
                columns[name].append(row.get(name))
    return pa.Table.from_pydict(columns, schema=schema)


def write_codes_parquet(table: pa.Table, dest_url: str, file_metadata: Mapping[str, object]) -> int:
    """Write atomically with our provenance (model, grid, source) in the parquet key-value metadata."""
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[b"laion_vq"] = json.dumps(dict(file_metadata), sort_keys=True).encode()
    table = table.replace_schema_metadata(schema_meta)
    fd, tmp = tempfile.mkstemp(suffix=".parquet")
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        return publish_file(tmp, dest_url)
    finally:
        os.unlink(tmp)


def read_codes_provenance(url: str) -> dict:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return codes_provenance(pq.ParquetFile(f))


def codes_provenance(parquet: pq.ParquetFile) -> dict:
    """The provenance a code parquet's footer carries (empty for a file written without it)."""
    raw = (parquet.schema_arrow.metadata or {}).get(b"laion_vq")
    return json.loads(raw) if raw else {}


def decode_codes(table: pa.Table, grid: int) -> np.ndarray:
    """All rows' codes as an (N, grid, grid) int16 array, the way a seed-dataset user decodes one row."""
    blobs = table.column("code").to_pylist()
    if not blobs:
        return np.zeros((0, grid, grid), np.int16)
    return np.stack([np.frombuffer(b, np.int16).reshape(grid, grid) for b in blobs])


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass
class ContractReport:
    """What `check_codes_table` found: the numbers and every violated rule, as (reason, detail) pairs
    whose detail names the first offending key."""

    rows: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    code_min: int | None = None
    code_max: int | None = None
    distinct_codes: int = 0
    usage: np.ndarray | None = None

    @property
    def problems(self) -> list[str]:
        return [detail for _, detail in self.failures]

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, reason: str, detail: str) -> None:
        self.failures.append((reason, detail))


def check_codes_table(
    table: pa.Table, shard_id: int, grid: int, n_embed: int, required: Sequence[str] | None = None
) -> ContractReport:
    """Check shape, dtype, code range, keys (unique, sorted, of this shard), image hashes and schema.

    `required` are the columns the file must hold (for a source other than LAION-400M: the core columns and
    the source's, from its status parquet); by default every CODES_SCHEMA column, except
    `OPTIONAL_CODE_COLUMNS`, which older files lack. `image_sha256`, when present, must be 64 lowercase hex
    characters on every row."""
    report = ContractReport(rows=table.num_rows)
    wanted = CODES_SCHEMA.names if required is None else list(required)
    missing = [name for name in wanted if name not in table.column_names and name not in OPTIONAL_CODE_COLUMNS]
    if missing:
        report.fail("missing columns", f"missing columns {missing}")
        return report
    code_type = table.schema.field("code").type
    if not (pa.types.is_binary(code_type) or pa.types.is_large_binary(code_type)):
        report.fail("wrong code dtype", f"column code has type {code_type}, expected binary (raw int16 bytes)")
        return report
    keys = table.column("key").to_pylist()
    expected_bytes = grid * grid * np.dtype(CODE_DTYPE).itemsize
    blobs = table.column("code").to_pylist()
    bad = [i for i, b in enumerate(blobs) if b is None or len(b) != expected_bytes]
    if bad:
        first = bad[0]
        got = None if blobs[first] is None else len(blobs[first])
        report.fail(
            "wrong code size",
            f"{len(bad)} row(s) whose code is not {expected_bytes} bytes ({grid}×{grid} int16), "
            f"first {keys[first]} ({got} bytes)",
        )
    good_rows = [i for i, b in enumerate(blobs) if b is not None and len(b) == expected_bytes]
    if good_rows:
        values = np.frombuffer(b"".join(blobs[i] for i in good_rows), dtype=CODE_DTYPE).reshape(len(good_rows), -1)
        report.code_min, report.code_max = int(values.min()), int(values.max())
        outside = (values < 0) | (values >= n_embed)
        if outside.any():
            rows_out = np.flatnonzero(outside.any(axis=1))
            report.fail(
                "code out of range",
                f"{len(rows_out)} row(s) with codes outside [0, {n_embed}) (span [{report.code_min}, "
                f"{report.code_max}]), first {keys[good_rows[rows_out[0]]]}",
            )
        in_range = values[~outside].astype(np.int64)
        report.usage = np.bincount(in_range, minlength=n_embed)
        report.distinct_codes = int((report.usage > 0).sum())
    if "image_sha256" in table.column_names:
        hashes = table.column("image_sha256").to_pylist()
        bad = [i for i, h in enumerate(hashes) if not (isinstance(h, str) and _SHA256_HEX.fullmatch(h))]
        if bad:
            report.fail(
                "bad image hash",
                f"{len(bad)} row(s) whose image_sha256 is not 64 lowercase hex characters, first {keys[bad[0]]} "
                f"({hashes[bad[0]]!r:.80})",
            )
    if any(k is None for k in keys):
        report.fail("null keys", f"{sum(k is None for k in keys)} null key(s)")
        return report
    duplicated = sorted(k for k, count in Counter(keys).items() if count > 1)
    if duplicated:
        report.fail("duplicate keys", f"{len(keys) - len(set(keys))} duplicate key(s), first {duplicated[0]}")
    unsorted = next((keys[i + 1] for i in range(len(keys) - 1) if keys[i + 1] < keys[i]), None)
    if unsorted is not None:
        report.fail("unsorted keys", f"rows are not sorted by key, first out of order {unsorted}")
    prefix = shard_key(shard_id)
    foreign = [k for k in keys if not k.startswith(prefix)]
    if foreign:
        report.fail("foreign keys", f"{len(foreign)} key(s) not of shard {prefix}, first {foreign[0]}")
    return report
