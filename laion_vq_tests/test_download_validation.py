"""Input validation, the img2dataset version pin and the partial-shard guard (no network needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_vq.download import (
    PINNED_IMG2DATASET_VERSION,
    DownloadOptions,
    check_img2dataset_version,
    download_shard,
    expected_key,
    img2dataset_shard,
    installed_img2dataset_version,
    shard_name,
)
from laion_vq.download.shard_files import verify_shard_files
from laion_vq.testing.image_server import ImageServer


def rows(n: int, **drop: bool) -> pa.Table:
    table = pa.table(
        {
            "SAMPLE_ID": pa.array(range(n), pa.int64()),
            "URL": [f"http://127.0.0.1:9/img/{i}.jpg" for i in range(n)],
            "TEXT": [f"caption {i}" for i in range(n)],
            "NSFW": ["UNLIKELY"] * n,
            "similarity": [0.3] * n,
        }
    )
    return table.drop_columns([c for c, d in drop.items() if d])


def test_version_pin_is_recorded_and_checked() -> None:
    assert PINNED_IMG2DATASET_VERSION == "1.47.0"
    assert installed_img2dataset_version() == "1.47.0"
    check_img2dataset_version("1.47.0")
    with pytest.raises(ImportError, match=r"img2dataset==1\.47\.0.*1\.48\.0 is installed"):
        check_img2dataset_version("1.48.0")


def test_missing_url_column_is_named(tmp_path: Path) -> None:
    named = r"URL column 'URL' is missing.*columns present: \['SAMPLE_ID', 'TEXT'"
    with pytest.raises(ValueError, match=named):
        download_shard(rows(2, URL=True), 0, str(tmp_path), samples_per_shard=10)


def test_missing_caption_column_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"caption column 'TEXT' is missing"):
        download_shard(rows(2, TEXT=True), 0, str(tmp_path), samples_per_shard=10)


def test_custom_column_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"URL column 'url_link' is missing"):
        download_shard(rows(1), 0, str(tmp_path), samples_per_shard=10, url_col="url_link")


def test_too_many_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shard 4 has 9 rows, more than samples_per_shard=8"):
        download_shard(rows(9), 4, str(tmp_path), samples_per_shard=8)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("shard_id", "digits"), [(-1, 5), (100_000, 5), (10, 1)])
def test_shard_id_must_fit_the_digits(tmp_path: Path, shard_id: int, digits: int) -> None:
    with pytest.raises(ValueError, match=rf"shard_id {shard_id} does not fit in {digits} digits"):
        download_shard(rows(1), shard_id, str(tmp_path), samples_per_shard=10, shard_digits=digits)


def test_shard_name() -> None:
    assert shard_name(3) == "00003"
    assert shard_name(9_999) == "09999"
    assert shard_name(12, shard_digits=3) == "012"


def test_reserved_and_unserialisable_columns_are_kept_renamed_or_aside() -> None:
    """A source column named like one of img2dataset's goes through as `source_<name>`; a type a sample's json
    cannot hold (binary, timestamp) stays out of img2dataset, to be joined into the status parquet by key."""
    table = (
        rows(2)
        .append_column("status", pa.array(["x", "y"]))
        .append_column("BLOB", pa.array([b"\x00", b"\x01"], pa.binary()))
        .append_column("boxes", pa.array([[[0.1, 0.2]], []], pa.list_(pa.list_(pa.float64()))))
    )
    extra = ("SAMPLE_ID", "status", "BLOB", "boxes")
    prepared, column_list, aside = img2dataset_shard._prepare_rows(table, 0, 10, 5, "URL", "TEXT", extra)
    assert column_list == ["SAMPLE_ID", "source_status", "boxes", "caption", "url"]
    assert prepared.column("source_status").to_pylist() == ["x", "y"]
    assert prepared.schema.field("boxes").type == pa.list_(pa.list_(pa.float64()))
    assert aside.column_names == ["BLOB"] and aside.schema.field("BLOB").type == pa.binary()
    with pytest.raises(ValueError, match="is the URL or caption column"):
        img2dataset_shard._prepare_rows(rows(1), 0, 10, 5, "URL", "TEXT", ("URL",))
    with pytest.raises(ValueError, match="hash column 'sha256' is missing"):
        img2dataset_shard._prepare_rows(rows(1), 0, 10, 5, "URL", "TEXT", (), "sha256", "sha256")


def test_url_column_must_be_strings(tmp_path: Path) -> None:
    table = rows(1).drop_columns(["URL"]).append_column("URL", pa.array([1], pa.int64()))
    with pytest.raises(ValueError, match="must be strings"):
        download_shard(table, 0, str(tmp_path), samples_per_shard=10)


def test_output_dir_must_be_local(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="local directory"):
        download_shard(rows(1), 0, "s3://bucket/shards", samples_per_shard=10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resize_mode": "stretch"},
        {"encode_format": "gif"},
        {"timeout": 0},
        {"thread_count": 0},
        {"retries": -1},
        {"max_image_area": 0},
        {"compute_hash": "crc32"},
        {"disallowed_header_directives": "noai"},
    ],
)
def test_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DownloadOptions(**kwargs)


def test_options_defaults_are_laion_400m() -> None:
    o = DownloadOptions(disallowed_header_directives=["noai"])
    assert o.disallowed_header_directives == ("noai",)
    d = DownloadOptions()
    assert (d.image_size, d.resize_mode, d.encode_format, d.encode_quality) == (256, "border", "jpg", 95)
    assert d.disallowed_header_directives == ("noai", "noimageai", "noindex", "noimageindex")
    assert d.max_image_area == 100_000_000 and d.retries == 0 and d.user_agent_token == "img2dataset"
    hash(d)


def test_border_padding_self_check_passes() -> None:
    img2dataset_shard._check_border_padding_is_white()


def test_partial_shard_is_never_reported_as_done(tmp_path: Path) -> None:
    """img2dataset only prints when a sample's handling raises and leaves it out of the outputs;
    the verification must turn such a shard into an error."""
    with ImageServer() as server:
        table = pa.table(
            {
                "URL": [server.url(p) for p in ImageServer.photo_paths()[:3]],
                "TEXT": ["a", "b", "c"],
            }
        )
        result = download_shard(
            table, 2, str(tmp_path / "ok"), samples_per_shard=4, options=DownloadOptions(thread_count=4)
        )
    assert result.successes == 3
    ok = tmp_path / "ok"
    hashed = set(pq.read_table(ok / "00002.parquet").column("key").to_pylist())
    KEYS = {expected_key(2, i, 4) for i in range(3)}
    outputs = [str(ok / "00002.tar"), str(ok / "00002.parquet"), str(ok / "00002_stats.json")]
    verify_shard_files(*outputs, 2, KEYS, "jpg", hashed)
    with pytest.raises(RuntimeError, match="the writer stored 2"):  # an image the writer never hashed
        verify_shard_files(*outputs, 2, KEYS, "jpg", set(sorted(hashed)[1:]))
    broken = tmp_path / "broken"
    shutil.copytree(ok, broken)
    parquet = broken / "00002.parquet"
    pq.write_table(pq.read_table(parquet).slice(0, 2), parquet)
    broken_outputs = [str(broken / "00002.tar"), str(parquet), str(broken / "00002_stats.json")]
    with pytest.raises(RuntimeError, match="status parquet has 2 rows for 3 input rows"):
        verify_shard_files(*broken_outputs, 2, KEYS, "jpg", hashed)
    (broken / "00002_stats.json").unlink()
    with pytest.raises(RuntimeError, match="did not write"):
        verify_shard_files(*broken_outputs, 2, KEYS, "jpg", hashed)


def test_stale_outputs_are_replaced(tmp_path: Path) -> None:
    """Files left by an earlier attempt are removed first, so they can never pass for this attempt's."""
    for name in ("00001.tar", "00001.parquet", "00001_stats.json"):
        (tmp_path / name).write_bytes(b"stale")
    with ImageServer() as server:
        table = pa.table({"URL": [server.url("/missing/a.jpg")], "TEXT": ["a"]})
        result = download_shard(table, 1, str(tmp_path), samples_per_shard=10)
    assert (result.count, result.failed_to_download) == (1, 1)
    assert pq.read_table(result.parquet_path).column("status").to_pylist() == ["failed_to_download"]
