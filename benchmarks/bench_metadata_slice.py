"""Reading one shard from a LAION-sized metadata part: our row-group slice vs reading the whole part.

Writes a part shaped like LAION-400M's (default 1,000,000 rows, row groups of 100,000, LAION columns
with URL/caption-length strings), then times in the same run:

- reference: `pyarrow.parquet.read_table(part)` and slicing the shard out (what a naive asset does);
- ours: `LaionMetadata.read_shard` (footer → overlapping row groups only).

Prints seconds, bytes read from disk and the ratio reference/ours.

    python benchmarks/bench_metadata_slice.py --rows 1000000 --samples-per-shard 10000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_vq.shards.metadata import LaionMetadata
from laion_vq.shards.schema import LAION_SCHEMA

T = TypeVar("T")


def make_part(path: str, rows: int, row_group: int) -> None:
    rng = np.random.default_rng(0)
    words = np.array(["cat", "photo", "of", "a", "red", "house", "vintage", "poster", "blue", "sky"])
    with pq.ParquetWriter(path, LAION_SCHEMA) as writer:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            captions = [" ".join(rng.choice(words, 8)) for _ in range(n)]
            table = pa.table(
                {
                    "SAMPLE_ID": np.arange(start, start + n, dtype=np.int64),
                    "URL": [f"https://example.com/i/{start + i:012d}/{rng.integers(1 << 40):x}.jpg" for i in range(n)],
                    "TEXT": captions,
                    "HEIGHT": rng.integers(64, 4000, n),
                    "WIDTH": rng.integers(64, 4000, n),
                    "LICENSE": ["?"] * n,
                    "NSFW": ["UNLIKELY"] * n,
                    "similarity": rng.random(n),
                },
                schema=LAION_SCHEMA,
            )
            writer.write_table(table)


def read_bytes_of(fn: Callable[[], T]) -> tuple[float, int, T]:
    """Wall time and bytes read from disk (Linux /proc/self/io `rchar`) of one call."""

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar")).split()[1])

    before, start = rchar(), time.perf_counter()
    out = fn()
    return time.perf_counter() - start, rchar() - before, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--row-group", type=int, default=100_000)
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--shard", type=int, default=42)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "part-00000.parquet")
        make_part(path, args.rows, args.row_group)
        size = os.path.getsize(path)
        s = args.samples_per_shard

        def naive():
            return pq.read_table(path).slice(args.shard * s, s)

        def ours():
            return LaionMetadata(path, s).read_shard(args.shard)

        naive(), ours()  # page cache warm for both
        t_ref, b_ref, ref = read_bytes_of(naive)
        t_ours, b_ours, got = read_bytes_of(ours)
    assert got.column("URL").equals(ref.column("URL")), "slices differ"
    print(f"part: {args.rows} rows, {size / 1e6:.1f} MB, row groups of {args.row_group}; shard {args.shard} of {s}")
    print(f"reference (read whole part, slice): {t_ref:7.3f} s  {b_ref / 1e6:8.1f} MB read")
    print(f"ours (footer + overlapping groups): {t_ours:7.3f} s  {b_ours / 1e6:8.1f} MB read")
    print(f"ratio reference/ours: {t_ref / t_ours:.1f}x time, {b_ref / max(b_ours, 1):.1f}x bytes")


if __name__ == "__main__":
    main()
