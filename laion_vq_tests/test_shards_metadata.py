"""Shard slicing: our footer-based numbering must equal img2dataset's own Reader, part by part."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
from img2dataset.reader import Reader  # the oracle for shard numbering

from laion_vq.shards.metadata import LaionMetadata, ShardOutOfRange
from laion_vq.shards.schema import LAION_SCHEMA, SchemaError
from laion_vq.testing.synthetic_metadata import laion_table, write_parts

PART_SIZES = (23, 8, 17)  # partial last shards in parts 0 and 2, an exact fit in part 1
SAMPLES = 8


@pytest.fixture()
def parts_dir(tmp_path):
    urls, n = [], 0
    for size in PART_SIZES:
        urls.append([f"http://127.0.0.1:9/img/{n + i}.jpg" for i in range(size)])
        n += size
    write_parts(str(tmp_path / "meta"), urls, row_group_size=5)
    return str(tmp_path / "meta")


def img2dataset_shards(source: str, tmp_path) -> dict[int, list[str]]:
    """Shard id → URLs, as img2dataset's Reader cuts them."""
    os.makedirs(tmp_path / "i2d", exist_ok=True)
    reader = Reader(
        url_list=source,
        input_format="parquet",
        url_col="URL",
        caption_col="TEXT",
        verify_hash_col=None,
        verify_hash_type=None,
        save_additional_columns=None,
        number_sample_per_shard=SAMPLES,
        done_shards=set(),
        tmp_path=str(tmp_path / "i2d"),
    )
    return {shard_id: feather.read_table(path).column("url").to_pylist() for shard_id, path in reader}


def test_numbering_matches_img2dataset_reader(parts_dir, tmp_path):
    meta = LaionMetadata(parts_dir, SAMPLES)
    expected = img2dataset_shards(parts_dir, tmp_path)
    assert meta.num_shards == len(expected) == 3 + 1 + 3
    for shard_id, urls in expected.items():
        table = meta.read_shard(shard_id)
        assert table.schema == LAION_SCHEMA
        assert table.column("URL").to_pylist() == urls, shard_id
    # partial last shards: part 0 ends with 23 - 16 = 7 rows, part 2 with 17 - 16 = 1 row
    assert meta.read_shard(2).num_rows == 7
    assert meta.read_shard(6).num_rows == 1
    assert meta.locate(3).part.url.endswith("part-00001.parquet")


def test_reads_only_overlapping_row_groups(tmp_path):
    path = str(tmp_path / "big.parquet")
    pq.write_table(laion_table([f"u{i}" for i in range(1000)]), path, row_group_size=100)
    meta = LaionMetadata(path, 250)
    where = meta.locate(1)
    assert (where.start, where.stop) == (250, 500)
    assert meta.read_shard(1).column("URL").to_pylist() == [f"u{i}" for i in range(250, 500)]


def test_shard_beyond_metadata_names_the_count(parts_dir):
    meta = LaionMetadata(parts_dir, SAMPLES)
    with pytest.raises(ShardOutOfRange, match=r"make 7 shard\(s\) \(00000 … 00006\)"):
        meta.read_shard(7)


def test_glob_and_single_file_sources(parts_dir):
    by_glob = LaionMetadata(os.path.join(parts_dir, "part-0000[02].parquet"), SAMPLES)
    assert by_glob.num_shards == 3 + 3
    single = LaionMetadata(os.path.join(parts_dir, "part-00001.parquet"), SAMPLES)
    assert single.num_shards == 1


def test_missing_source_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _ = LaionMetadata(str(tmp_path / "nope"), 10).num_shards


def test_missing_url_column_is_clear(tmp_path):
    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"TEXT": ["a", "b"]}), path)
    with pytest.raises(SchemaError, match=r"missing the URL/caption column\(s\) \['URL'\]"):
        LaionMetadata(path, 10).read_shard(0)


def test_wrong_type_is_clear(tmp_path):
    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"URL": ["a"], "TEXT": ["b"], "SAMPLE_ID": ["not-a-number"]}), path)
    with pytest.raises(SchemaError, match="SAMPLE_ID"):
        LaionMetadata(path, 10).read_shard(0)


def test_missing_optional_columns_become_nulls(tmp_path):
    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"URL": ["a"], "TEXT": ["b"]}), path)
    table = LaionMetadata(path, 10).read_shard(0)
    assert table.schema == LAION_SCHEMA
    assert table.column("NSFW").to_pylist() == [None]


def test_not_parquet_is_clear(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(SchemaError, match="not a readable parquet"):
        _ = LaionMetadata(str(path), 10).num_shards
