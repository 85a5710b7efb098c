"""Storage layout, atomic publishing, webdataset tar reading and the code-parquet contract."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from laion_vq.shards.codes import build_codes_table, check_codes_table, decode_codes
from laion_vq.shards.numbering import parse_shard_key, shard_key, shard_keys
from laion_vq.shards.schema import CODES_SCHEMA, CODES_SCHEMA_REQUIRED, OPTIONAL_CODE_COLUMNS
from laion_vq.shards.storage import StorageLayout, publish_bytes, publish_file
from laion_vq.shards.tar_reader import CorruptShardError, iter_samples


def test_shard_keys():
    assert shard_key(3) == "00003"
    assert parse_shard_key("09999") == 9999
    assert shard_keys(10_000)[-1] == "09999" and len(shard_keys(10_000)) == 10_000
    with pytest.raises(ValueError):
        shard_key(100_000)
    with pytest.raises(ValueError):
        parse_shard_key("3")


def test_layout_paths():
    layout = StorageLayout("s3://bucket/prefix/")
    assert layout.metadata_shard(7) == "s3://bucket/prefix/metadata/00007.parquet"
    assert layout.image_tar(7) == "s3://bucket/prefix/images/00007.tar"
    assert layout.image_status(7) == "s3://bucket/prefix/images/00007.parquet"
    assert layout.image_stats(7) == "s3://bucket/prefix/images/00007_stats.json"
    assert layout.code_shard("vqgan_gumbel_f8", 7) == "s3://bucket/prefix/codes/vqgan_gumbel_f8/00007.parquet"


def test_publish_replaces_whole_file(tmp_path):
    dest = str(tmp_path / "out" / "00000.parquet")
    publish_bytes(b"old", dest)
    publish_bytes(b"new contents", dest)
    assert Path(dest).read_bytes() == b"new contents"
    assert os.listdir(tmp_path / "out") == ["00000.parquet"]


def test_crash_mid_publish_keeps_old_file(tmp_path, monkeypatch):
    dest = str(tmp_path / "00000.tar")
    publish_bytes(b"old complete file", dest)
    src = tmp_path / "new.tar"
    src.write_bytes(b"x" * 100_000)

    def crash(fsrc, fdst, length=0):
        fdst.write(fsrc.read(10))
        raise OSError("disk full (simulated crash mid-copy)")

    monkeypatch.setattr(shutil, "copyfileobj", crash)
    with pytest.raises(OSError, match="simulated"):
        publish_file(str(src), dest)
    assert Path(dest).read_bytes() == b"old complete file"
    assert sorted(os.listdir(tmp_path)) == ["00000.tar", "new.tar"], "no temp file left behind"


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_iter_samples_groups_by_key(tmp_path):
    path = tmp_path / "00000.tar"
    path.write_bytes(_tar([("000000000.jpg", b"a"), ("000000000.json", b'{"x": 1}'), ("000000001.jpg", b"b")]))
    samples = list(iter_samples(str(path)))
    assert [s.key for s in samples] == ["000000000", "000000001"]
    assert samples[0].image == b"a" and samples[0].meta == {"x": 1}


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"this is not a tar file at all" * 50, id="garbage"),
        pytest.param("truncated", id="truncated"),
    ],
)
def test_corrupt_tar_is_a_clear_error(tmp_path, payload):
    if payload == "truncated":
        whole = _tar([(f"{i:09d}.jpg", os.urandom(4000)) for i in range(5)])
        payload = whole[: len(whole) // 2]
    path = tmp_path / "00000.tar"
    path.write_bytes(payload)
    with pytest.raises(CorruptShardError, match="00000.tar"):
        list(iter_samples(str(path)))


def test_split_key_is_corrupt(tmp_path):
    path = tmp_path / "00000.tar"
    path.write_bytes(_tar([("000000000.jpg", b"a"), ("000000001.jpg", b"b"), ("000000000.json", b"{}")]))
    with pytest.raises(CorruptShardError, match="two separate places"):
        list(iter_samples(str(path)))


def _codes_table(keys, codes, hashes=True):
    meta = {k: {"caption": f"c{k}", "url": f"http://x/{k}", "SAMPLE_ID": i} for i, k in enumerate(keys)}
    image_sha256 = [hashlib.sha256(k.encode()).hexdigest() for k in keys] if hashes else None
    return build_codes_table(keys, codes, meta, image_sha256)


def test_codes_table_matches_seed_format():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 8192, size=(3, 32, 32)).astype(np.int16)
    keys = ["000010002", "000010000", "000010001"]
    table = _codes_table(keys, codes)
    assert table.schema == CODES_SCHEMA
    assert table.column("key").to_pylist() == sorted(keys)
    row = table.to_pylist()[0]
    assert len(row["code"]) == 2048
    assert np.array_equal(np.frombuffer(row["code"], np.int16).reshape(32, 32), codes[1])
    assert row["caption"] == "c000010000" and row["url"] == "http://x/000010000"
    assert row["image_sha256"] == hashlib.sha256(b"000010000").hexdigest()  # follows its row when sorting
    assert np.array_equal(decode_codes(table, 32), codes[[1, 2, 0]])
    report = check_codes_table(table, 1, 32, 8192)
    assert report.ok and report.rows == 3 and report.distinct_codes > 2000


def test_contract_catches_each_violation():
    codes = np.zeros((2, 32, 32), np.int16)
    good = _codes_table(["000010000", "000010001"], codes)
    assert check_codes_table(good, 1, 32, 8192).ok

    def with_codes(blobs):
        return good.set_column(1, pa.field("code", pa.binary(), nullable=False), pa.array(blobs, pa.binary()))

    short = check_codes_table(with_codes([b"\0" * 2048, b"\0" * 100]), 1, 32, 8192)
    assert any("not 2048 bytes" in p for p in short.problems)

    out_of_range = np.full((32, 32), 9000, np.int16).tobytes()
    report = check_codes_table(with_codes([out_of_range] * 2), 1, 32, 8192)
    assert any("outside [0, 8192)" in p for p in report.problems)
    negative = np.full((32, 32), -1, np.int16).tobytes()
    assert check_codes_table(with_codes([negative] * 2), 1, 32, 8192).problems

    assert any("not of shard 00002" in p for p in check_codes_table(good, 2, 32, 8192).problems)
    unsorted = good.take([1, 0])
    assert any("not sorted" in p for p in check_codes_table(unsorted, 1, 32, 8192).problems)
    dup = pa.concat_tables([good.slice(0, 1), good.slice(0, 1)])
    assert any("duplicate" in p for p in check_codes_table(dup, 1, 32, 8192).problems)
    assert any("missing columns" in p for p in check_codes_table(good.drop(["url"]), 1, 32, 8192).problems)


def test_image_sha256_is_optional_but_checked_when_present():
    codes = np.zeros((2, 32, 32), np.int16)
    older = _codes_table(["000010000", "000010001"], codes, hashes=False)  # a file written before the column
    assert older.schema == CODES_SCHEMA_REQUIRED and "image_sha256" in OPTIONAL_CODE_COLUMNS
    assert check_codes_table(older, 1, 32, 8192).ok
    good = _codes_table(["000010000", "000010001"], codes)
    for bad in (None, "abc", "G" * 64, hashlib.sha256(b"x").hexdigest().upper()):
        hashes = pa.array([hashlib.sha256(b"x").hexdigest(), bad], pa.string())
        report = check_codes_table(good.set_column(10, "image_sha256", hashes), 1, 32, 8192)
        assert report.failures and report.failures[0][0] == "bad image hash"
        detail = report.failures[0][1]
        assert "1 row(s) whose image_sha256 is not 64 lowercase hex characters, first 000010001" in detail
