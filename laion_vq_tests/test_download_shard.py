"""Downloading one shard with the real img2dataset from the real loopback image server.

One mixed shard (every photo plus every kind of broken URL) is downloaded once per module and the
tests below inspect its real tar / parquet / stats files.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_vq.download import DownloadOptions, ShardDownloadResult, download_shard, expected_key
from laion_vq.shards.schema import LAION_SCHEMA
from laion_vq.testing.image_server import BROKEN_KINDS, ImageServer

LAION_TEST_SCHEMA = LAION_SCHEMA
FAST = DownloadOptions(timeout=1, thread_count=8)
SHARD = 3
PHOTOS = ImageServer.photo_paths()
BROKEN = ImageServer.broken_paths()
PATHS = PHOTOS + BROKEN
NOAI_MESSAGE = "Use of image disallowed by X-Robots-Tag directive"
GRAYSCALE = {"/img/camera.jpg", "/img/page.png", "/img/coins.jpg"}


def laion_table(server: ImageServer, paths: list[str], first_sample_id: int = 1000) -> pa.Table:
    """A LAION-schema table, one row per server path, with per-row distinguishable extra columns."""
    photos = server.photos()
    return pa.Table.from_pylist(
        [
            {
                "SAMPLE_ID": first_sample_id + i,
                "URL": server.url(path),
                "TEXT": f"caption {i}: {path}",
                "HEIGHT": photos[path].height if path in photos else None,
                "WIDTH": photos[path].width if path in photos else None,
                "LICENSE": "?" if i % 2 else "creativecommons",
                "NSFW": ["UNLIKELY", "UNSURE", "NSFW"][i % 3],
                "similarity": 0.25 + i / 100,
            }
            for i, path in enumerate(paths)
        ],
        schema=LAION_TEST_SCHEMA,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer(slow_delay_s=3.0) as s:
        yield s


@pytest.fixture(scope="module")
def mixed(server: ImageServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, ShardDownloadResult]:
    rows = laion_table(server, PATHS)
    out = tmp_path_factory.mktemp("mixed")
    return rows, download_shard(rows, SHARD, str(out), samples_per_shard=10_000, options=FAST)


@pytest.fixture(scope="module")
def status(mixed: tuple[pa.Table, ShardDownloadResult]) -> dict[str, dict]:
    """key → status-parquet row."""
    _, result = mixed
    return {row["key"]: row for row in pq.read_table(result.parquet_path).to_pylist()}


@pytest.fixture(scope="module")
def tar_members(mixed: tuple[pa.Table, ShardDownloadResult]) -> dict[str, dict[str, bytes]]:
    """key → {extension: bytes} from the webdataset tar."""
    _, result = mixed
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(result.tar_path) as tar:
        for m in tar:
            f = tar.extractfile(m)
            assert f is not None
            key, ext = m.name.split(".", 1)
            members[key][ext] = f.read()
    return dict(members)


def key_of(path: str) -> str:
    return expected_key(SHARD, PATHS.index(path), 10_000)


def image_of(tar_members: dict[str, dict[str, bytes]], path: str) -> Image.Image:
    return Image.open(io.BytesIO(tar_members[key_of(path)]["jpg"]))


def test_outputs_are_named_for_the_shard(mixed: tuple[pa.Table, ShardDownloadResult]) -> None:
    _, result = mixed
    assert Path(result.tar_path).name == "00003.tar"
    assert Path(result.parquet_path).name == "00003.parquet"
    assert Path(result.stats_path).name == "00003_stats.json"
    assert result.shard_id == SHARD
    assert result.bytes_tar == Path(result.tar_path).stat().st_size > 0
    assert result.seconds > 0


def test_counts_reconcile(mixed: tuple[pa.Table, ShardDownloadResult], status: dict[str, dict]) -> None:
    rows, result = mixed
    assert result.count == rows.num_rows == len(status)
    assert result.count == result.successes + result.failed_to_download + result.failed_to_resize
    assert result.successes == len(PHOTOS)
    assert result.failed_to_download == sum(s == "failed_to_download" for s in BROKEN_KINDS.values())
    assert result.failed_to_resize == sum(s == "failed_to_resize" for s in BROKEN_KINDS.values())
    assert result.status_counts["success"] == result.successes
    assert sum(result.status_counts.values()) == result.count
    stats = json.loads(Path(result.stats_path).read_text())
    assert stats["count"] == result.count and stats["status_dict"] == result.status_counts


def test_keys_are_pinned_for_10000_per_shard(status: dict[str, dict]) -> None:
    # Literal strings on purpose: a change in img2dataset's key scheme must break this test.
    assert expected_key(3, 0, 10_000) == "000030000"
    assert expected_key(3, 1, 10_000) == "000030001"
    assert expected_key(3, 9_999, 10_000) == "000039999"
    assert expected_key(9_999, 9_999, 10_000) == "099999999"
    assert expected_key(0, 0, 10_000) == "000000000"
    assert sorted(status) == [f"00003{i:04d}" for i in range(len(PATHS))]
    assert status["000030000"]["SAMPLE_ID"] == 1000  # row 0
    assert status["000030016"]["SAMPLE_ID"] == 1016  # row 16


def test_keys_are_pinned_for_small_shards() -> None:
    # ceil(log10(samples_per_shard)) index digits after the 5 shard digits.
    assert [expected_key(3, i, 8) for i in (0, 1, 7)] == ["000030", "000031", "000037"]
    assert [expected_key(3, i, 10) for i in (0, 9)] == ["000030", "000039"]
    assert [expected_key(3, i, 11) for i in (0, 10)] == ["0000300", "0000310"]
    assert expected_key(3, 0, 1) == "00003"
    assert expected_key(3, 5, 100, shard_digits=6) == "00000305"
    with pytest.raises(ValueError, match="index"):
        expected_key(3, 8, 8)


def test_status_parquet_carries_laion_columns(
    mixed: tuple[pa.Table, ShardDownloadResult], status: dict[str, dict]
) -> None:
    rows, _ = mixed
    for i, row in enumerate(rows.to_pylist()):
        got = status[expected_key(SHARD, i, 10_000)]
        assert got["status"] in {"success", "failed_to_download", "failed_to_resize"}
        assert got["url"] == row["URL"]
        assert got["caption"] == row["TEXT"]
        for col in ("SAMPLE_ID", "LICENSE", "NSFW", "similarity", "HEIGHT", "WIDTH"):
            assert got[col] == row[col], col
    schema = pq.read_schema(mixed[1].parquet_path)
    assert schema.field("SAMPLE_ID").type == pa.int64()
    assert schema.field("HEIGHT").type == LAION_SCHEMA.field("HEIGHT").type
    assert schema.field("similarity").type == pa.float64()
    assert "sha256" in schema.names and "URL" not in schema.names and "TEXT" not in schema.names


@pytest.mark.parametrize(
    ("path", "status_name", "reason", "message"),
    [
        ("/missing/0.jpg", "failed_to_download", "404", "HTTP Error 404: Not Found"),
        ("/garbage/0.jpg", "failed_to_resize", "not an image", "not an image: unknown format starting "),
        ("/truncated/0.jpg", "failed_to_resize", "truncated image", "truncated image: JPEG ends without an"),
        ("/slow/0.jpg", "failed_to_download", "timeout", "timeout: no data for 1 s"),
        ("/huge/0.png", "failed_to_resize", "decompression bomb", "decompression bomb: 12000x12000 = 144 Mpx"),
        ("/robots-noai/astronaut.jpg", "failed_to_download", "robots opt-out", NOAI_MESSAGE),
    ],
)
def test_each_failure_has_its_status_reason_and_message(
    status: dict[str, dict],
    tar_members: dict[str, dict[str, bytes]],
    mixed: tuple[pa.Table, ShardDownloadResult],
    path: str,
    status_name: str,
    reason: str,
    message: str,
) -> None:
    row = status[key_of(path)]
    assert row["status"] == status_name == BROKEN_KINDS[ImageServer.broken_kind(path)]
    assert row["error_message"].startswith(message)
    assert row["failure_reason"] == reason
    assert row["width"] is None and row["sha256"] is None and row["jpg_sha256"] is None
    assert key_of(path) not in tar_members  # failures are only in the parquet
    assert mixed[1].status_counts[row["error_message"]] >= 1
    assert mixed[1].failures_by_reason[reason] >= 1
    assert row["url"] in mixed[1].failure_examples[reason]


def test_status_parquet_is_sorted_and_hashes_the_stored_jpegs(
    mixed: tuple[pa.Table, ShardDownloadResult], tar_members: dict[str, dict[str, bytes]]
) -> None:
    import hashlib

    table = pq.read_table(mixed[1].parquet_path)
    keys = table.column("key").to_pylist()
    assert keys == sorted(keys)
    for row in table.to_pylist():
        if row["status"] == "success":
            assert row["failure_reason"] is None
            assert row["jpg_sha256"] == hashlib.sha256(tar_members[row["key"]]["jpg"]).hexdigest()
            assert row["jpg_sha256"] != row["sha256"]  # ours hashes the stored JPEG, img2dataset's the original
    stats = json.loads(Path(mixed[1].stats_path).read_text())
    assert stats["laion_vq"]["failures_by_reason"] == mixed[1].failures_by_reason
    assert sum(mixed[1].failures_by_reason.values()) == mixed[1].count - mixed[1].successes


def test_every_success_has_jpg_txt_json(status: dict[str, dict], tar_members: dict[str, dict[str, bytes]]) -> None:
    successes = {k for k, row in status.items() if row["status"] == "success"}
    assert successes == {key_of(p) for p in PHOTOS}
    assert set(tar_members) == successes
    for key in successes:
        assert set(tar_members[key]) == {"jpg", "txt", "json"}
        assert tar_members[key]["txt"].decode() == status[key]["caption"]
        meta = json.loads(tar_members[key]["json"])
        assert meta["key"] == key and meta["status"] == "success"
        assert meta["SAMPLE_ID"] == status[key]["SAMPLE_ID"]
        assert (meta["width"], meta["height"]) == (256, 256)
        assert len(meta["sha256"]) == 64


def test_images_are_256_square(tar_members: dict[str, dict[str, bytes]], server: ImageServer) -> None:
    photos = server.photos()
    for path in PHOTOS:
        img = image_of(tar_members, path)
        assert img.format == "JPEG" and img.size == (256, 256), path
        # img2dataset keeps grayscale sources single-channel ("L" JPEGs); everything else is RGB.
        assert img.mode == ("L" if path in GRAYSCALE else "RGB"), path
        assert photos[path].mode in ("L", "RGB", "RGBA")


def test_original_sizes_recorded(status: dict[str, dict], server: ImageServer) -> None:
    for path, photo in server.photos().items():
        row = status[key_of(path)]
        assert (row["original_width"], row["original_height"]) == (photo.width, photo.height), path


@pytest.mark.parametrize(
    ("path", "pad_axis"),
    [
        ("/img/hubble.jpg", "rows"),
        ("/img/chelsea.jpg", "rows"),
        ("/img/cat.jpg", "cols"),
        ("/img/rocket.jpg", "rows"),
    ],
)
def test_non_square_sources_get_white_border(
    tar_members: dict[str, dict[str, bytes]], path: str, pad_axis: str
) -> None:
    arr = np.asarray(image_of(tar_members, path).convert("RGB")).astype(int)
    for y, x in [(0, 0), (0, 255), (255, 0), (255, 255)]:
        assert arr[y, x].min() >= 250, (path, y, x, arr[y, x])
    band = arr[:8, :, :] if pad_axis == "rows" else arr[:, :8, :]
    assert band.min() >= 240  # the whole padding band is white, not just the corners
    assert arr[128, 128].min() < 250 or arr[100:156, 100:156].std() > 5  # the photo itself is not blank


def test_rgba_png_becomes_rgb_jpeg_on_white(tar_members: dict[str, dict[str, bytes]], server: ImageServer) -> None:
    logo = server.photos()["/img/logo.png"]
    source = np.asarray(Image.open(io.BytesIO(logo.data)))
    # The source corner is fully transparent and black underneath: only alpha matting makes it white.
    assert logo.mode == "RGBA" and source[0, 0].tolist() == [0, 0, 0, 0]
    img = image_of(tar_members, "/img/logo.png")
    assert img.mode == "RGB" and img.size == (256, 256)
    arr = np.asarray(img).astype(int)
    assert arr[0, 0].min() >= 250 and arr[255, 255].min() >= 250  # transparency matted onto white


def test_small_shard_keys_and_missing_optional_columns(server: ImageServer, tmp_path: Path) -> None:
    paths = ["/img/astronaut.jpg", "/missing/x.jpg", "/img/ihc.png"]
    rows = laion_table(server, paths).drop_columns(["HEIGHT", "WIDTH", "LICENSE"])
    result = download_shard(rows, 3, str(tmp_path), samples_per_shard=8, options=FAST)
    table = pq.read_table(result.parquet_path)
    got = {r["key"]: r for r in table.to_pylist()}
    assert sorted(got) == ["000030", "000031", "000032"]
    assert got["000031"]["status"] == "failed_to_download"
    assert got["000032"]["SAMPLE_ID"] == 1002 and got["000032"]["status"] == "success"
    # Absent LAION columns are skipped, not invented.
    assert not {"HEIGHT", "WIDTH", "LICENSE"} & set(table.column_names)
    assert {"SAMPLE_ID", "NSFW", "similarity"} <= set(table.column_names)
    with tarfile.open(result.tar_path) as tar:
        names = sorted(tar.getnames())
    assert names == [f"0000{k}.{e}" for k in ("30", "32") for e in ("jpg", "json", "txt")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00003.parquet", "00003.tar", "00003_stats.json"]


def test_empty_shard_is_a_complete_empty_shard(server: ImageServer, tmp_path: Path) -> None:
    rows = laion_table(server, [])
    result = download_shard(rows, 7, str(tmp_path), samples_per_shard=10_000, options=FAST)
    assert (result.count, result.successes) == (0, 0)
    assert pq.read_metadata(result.parquet_path).num_rows == 0
