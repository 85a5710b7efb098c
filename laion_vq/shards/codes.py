"""The code parquet: build it, write it, and prove it keeps the seed dataset's contract.

Contract (VQGAN LAION-100M): one parquet per shard, one row per encoded image, sorted by `key`;
`code` holds `grid*grid` little-endian int16 (2048 bytes at f8/256 px) that
`np.frombuffer(b, np.int16).reshape(grid, grid)` decodes, every value in `[0, n_embed)`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_vq.shards.numbering import shard_key
from laion_vq.shards.schema import CODE_DTYPE, CODES_SCHEMA
from laion_vq.shards.storage import filesystem, publish_file


def build_codes_table(
    keys: Sequence[str], codes: np.ndarray, meta: Mapping[str, Mapping[str, object]]
) -> pa.Table:
    """Rows sorted by key; `meta[key]` holds the sample's img2dataset row (caption, url, LAION columns)."""
    if len(keys) != len(codes):
        raise ValueError(f"{len(keys)} keys but {len(codes)} code grids")
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable") if keys else np.array([], dtype=int)
    little = np.ascontiguousarray(codes.astype(CODE_DTYPE, copy=False))
    columns: dict[str, list] = {name: [] for name in CODES_SCHEMA.names}
    for i in order:
        key = keys[i]
        row = meta.get(key, {})
        columns["key"].append(key)
        columns["code"].append(little[i].tobytes())
        for name in CODES_SCHEMA.names[2:]:
            columns[name].append(row.get(name))
    return pa.Table.from_pydict(columns, schema=CODES_SCHEMA)


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
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    raw = meta.get(b"laion_vq")
    return json.loads(raw) if raw else {}


def decode_codes(table: pa.Table, grid: int) -> np.ndarray:
    """All rows' codes as an (N, grid, grid) int16 array, the way a seed-dataset user decodes one row."""
    blobs = table.column("code").to_pylist()
    if not blobs:
        return np.zeros((0, grid, grid), np.int16)
    return np.stack([np.frombuffer(b, np.int16).reshape(grid, grid) for b in blobs])


@dataclass
class ContractReport:
    """What `check_codes_table` found: the numbers and every violated rule."""

    rows: int = 0
    problems: list[str] = field(default_factory=list)
    code_min: int | None = None
    code_max: int | None = None
    distinct_codes: int = 0
    usage: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def check_codes_table(table: pa.Table, shard_id: int, grid: int, n_embed: int) -> ContractReport:
    """Check shape, dtype, code range, keys (unique, sorted, of this shard) and schema."""
    report = ContractReport(rows=table.num_rows)
    missing = [name for name in CODES_SCHEMA.names if name not in table.column_names]
    if missing:
        report.problems.append(f"missing columns {missing}")
        return report
    code_type = table.schema.field("code").type
    if not (pa.types.is_binary(code_type) or pa.types.is_large_binary(code_type)):
        report.problems.append(f"column code has type {code_type}, expected binary")
        return report
    expected_bytes = grid * grid * np.dtype(CODE_DTYPE).itemsize
    blobs = table.column("code").to_pylist()
    bad = [i for i, b in enumerate(blobs) if b is None or len(b) != expected_bytes]
    if bad:
        report.problems.append(
            f"{len(bad)} row(s) whose code is not {expected_bytes} bytes ({grid}×{grid} int16), e.g. rows {bad[:5]}"
        )
    good = [b for b in blobs if b is not None and len(b) == expected_bytes]
    if good:
        values = np.frombuffer(b"".join(good), dtype=CODE_DTYPE)
        report.code_min, report.code_max = int(values.min()), int(values.max())
        if report.code_min < 0 or report.code_max >= n_embed:
            report.problems.append(f"codes span [{report.code_min}, {report.code_max}], outside [0, {n_embed})")
        in_range = values[(values >= 0) & (values < n_embed)].astype(np.int64)
        report.usage = np.bincount(in_range, minlength=n_embed)
        report.distinct_codes = int((report.usage > 0).sum())
    keys = table.column("key").to_pylist()
    if any(k is None for k in keys):
        report.problems.append("null keys")
    else:
        if len(set(keys)) != len(keys):
            report.problems.append(f"{len(keys) - len(set(keys))} duplicate key(s)")
        if keys != sorted(keys):
            report.problems.append("rows are not sorted by key")
        prefix = shard_key(shard_id)
        foreign = [k for k in keys if not k.startswith(prefix)]
        if foreign:
            report.problems.append(f"{len(foreign)} key(s) not of shard {prefix}, e.g. {foreign[:3]}")
    return report
