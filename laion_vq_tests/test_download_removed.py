"""Removal lists are never downloaded again: rows listed by index are never requested (the loopback server's
request log proves it), images whose downloaded or stored hash is listed are dropped before the tar; both
end as status `removed` with the list's reason, and every other row keeps its key. Real img2dataset, the real
loopback image server, a real stage download over a stored shard, then the tar audit."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_vq.audit import audit_image_shard
from laion_vq.download import DownloadOptions, download_shard, expected_key
from laion_vq.download.shard_files import WITHHELD_MESSAGE
from laion_vq.shards.storage import StorageLayout
from laion_vq.stages import ImageShardResult, download_image_shard
from laion_vq.testing.image_server import ImageServer
from laion_vq.testing.synthetic_metadata import laion_table

SHARD = 3
SAMPLES = 10
OPTIONS = DownloadOptions(timeout=2, thread_count=8)
#: 7 photos and a 404: 8 rows
PATHS = [*ImageServer.photo_paths()[:7], "/missing/x.jpg"]
#: rows listed by url / domain / sample id, resolved to row indices
WITHHELD = {1: "Re-LAION removal: url listed", 5: "takedown request #17"}
#: rows whose image is listed by hash: row 2 by its downloaded bytes, row 4 by its stored JPEG
BY_ORIGINAL, BY_JPG = 2, 4
HASH_REASONS = {BY_ORIGINAL: "Re-LAION removal: image hash listed", BY_JPG: "takedown request #18"}
REMOVED = {**WITHHELD, **HASH_REASONS}


def key(index: int) -> str:
    return expected_key(SHARD, index, SAMPLES)


def tar_images(tar_path: str) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name[:-4]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}  # type: ignore[union-attr]


@dataclass
class Download:
    result: ImageShardResult
    status: dict[str, dict]  # key → status row
    images: dict[str, bytes]  # key → stored JPEG
    stats: dict
    requested: list[str]  # paths the server received during this download


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer() as s:  # our own: its request log holds this module's requests only
        yield s


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, server: ImageServer) -> StorageLayout:
    layout = StorageLayout(str(tmp_path_factory.mktemp("removed")))
    Path(layout.metadata_shard(SHARD)).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(laion_table([server.url(p) for p in PATHS]), layout.metadata_shard(SHARD))
    return layout


def _download(layout: StorageLayout, server: ImageServer, **removals: object) -> Download:
    before = len(server.hits)
    result = download_image_shard(layout, SHARD, SAMPLES, OPTIONS, **removals)  # type: ignore[arg-type]
    status = {row["key"]: row for row in pq.read_table(layout.image_status(SHARD)).to_pylist()}
    images = tar_images(layout.image_tar(SHARD))
    stats = json.loads(Path(layout.image_stats(SHARD)).read_text())
    return Download(result, status, images, stats, server.hits[before:])


@pytest.fixture(scope="module")
def plain(layout: StorageLayout, server: ImageServer) -> Download:
    """The shard downloaded without removal lists (stored; the next download replaces it)."""
    return _download(layout, server)


@pytest.fixture(scope="module")
def removed(layout: StorageLayout, server: ImageServer, plain: Download) -> Download:
    """The same shard re-downloaded over the stored one with the removal lists."""
    original = hashlib.sha256(server.photos()[PATHS[BY_ORIGINAL]].data).hexdigest()
    assert plain.status[key(BY_ORIGINAL)]["sha256"] == original  # img2dataset's sha256: the served bytes
    stored = plain.status[key(BY_JPG)]["jpg_sha256"]
    hashes = {original: HASH_REASONS[BY_ORIGINAL], stored.upper(): HASH_REASONS[BY_JPG]}  # any case
    return _download(layout, server, removed_rows=WITHHELD, removed_hashes=hashes)


def test_plain_download_is_the_reference(plain: Download) -> None:
    assert plain.result.successes == 7 and plain.result.removed == 0 and plain.result.removed_by_reason == {}
    assert sorted(plain.requested) == sorted(PATHS)
    assert plain.stats["removed"] == 0 and plain.stats["laion_vq"]["removed_by_reason"] == {}


def test_listed_rows_are_never_requested(removed: Download) -> None:
    assert sorted(removed.requested) == sorted(p for i, p in enumerate(PATHS) if i not in WITHHELD)
    for i in WITHHELD:
        assert PATHS[i] not in removed.requested


def test_listed_rows_are_removed_with_their_reason_and_real_columns(removed: Download, server: ImageServer) -> None:
    metadata = laion_table([server.url(p) for p in PATHS]).to_pylist()
    for i, reason in WITHHELD.items():
        row = removed.status[key(i)]
        assert (row["status"], row["failure_reason"], row["error_message"]) == ("removed", reason, WITHHELD_MESSAGE)
        assert (row["url"], row["caption"]) == (metadata[i]["URL"], None)  # the identifier stays, the caption not
        for col in ("SAMPLE_ID", "HEIGHT", "WIDTH", "LICENSE", "NSFW", "similarity"):
            assert row[col] == metadata[i][col], col
        assert row["sha256"] is row["jpg_sha256"] is row["width"] is None
        assert key(i) not in removed.images


def test_hash_listed_images_are_dropped_before_the_tar(removed: Download, plain: Download) -> None:
    for i, reason in HASH_REASONS.items():
        row = removed.status[key(i)]
        assert (row["status"], row["failure_reason"]) == ("removed", reason)
        assert row["jpg_sha256"] is None and key(i) not in removed.images
        assert PATHS[i] in removed.requested  # downloaded, then dropped: a hash is only known after download
    original = removed.status[key(BY_ORIGINAL)]["error_message"]
    assert original == f"removed: downloaded image sha256 {plain.status[key(BY_ORIGINAL)]['sha256']} is listed"
    stored = removed.status[key(BY_JPG)]["error_message"]
    assert stored == f"removed: stored jpg sha256 {plain.status[key(BY_JPG)]['jpg_sha256']} is listed"
    # the stored image is still what the plain download stored: nothing else in the tar changed
    assert all(removed.images[k] == plain.images[k] for k in removed.images)


def test_other_rows_keep_their_keys(removed: Download, plain: Download) -> None:
    assert sorted(removed.status) == sorted(plain.status) == [key(i) for i in range(len(PATHS))]
    for i in range(len(PATHS)):
        if i not in REMOVED:
            before, after = plain.status[key(i)], removed.status[key(i)]
            assert (after["url"], after["SAMPLE_ID"], after["status"]) == (
                before["url"],
                before["SAMPLE_ID"],
                before["status"],
            )
            assert after["jpg_sha256"] == before["jpg_sha256"]
    assert set(removed.images) == set(plain.images) - {key(i) for i in REMOVED}
    with tarfile.open(removed.result.tar_path) as tar:
        metas = {m.name[:-5]: json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")}  # type: ignore[arg-type]
    assert all(meta["key"] == k for k, meta in metas.items())  # the sample json names its own key
    keys = pq.read_table(removed.result.status_path).column("key").to_pylist()
    assert keys == sorted(keys)


def test_accounting_and_stats(removed: Download) -> None:
    result, stats = removed.result, removed.stats
    assert result.rows == len(PATHS) == len(removed.status)
    assert (result.successes, result.failed_to_download, result.failed_to_resize, result.removed) == (3, 1, 0, 4)
    assert result.rows == result.successes + result.failed_to_download + result.failed_to_resize + result.removed
    assert result.failures_by_reason == {"404": 1}  # removals are not failures
    assert result.removed_by_reason == {reason: 1 for reason in REMOVED.values()}
    listed_urls = {removed.status[key(i)]["url"] for i in REMOVED}
    assert not listed_urls & {u for urls in result.failure_examples.values() for u in urls}
    assert (stats["count"], stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == (8, 3, 1, 0)
    assert stats["removed"] == 4
    assert stats["laion_vq"]["removed_by_reason"] == result.removed_by_reason
    assert stats["laion_vq"]["failures_by_reason"] == {"404": 1}
    assert sum(stats["status_dict"].values()) == stats["count"]
    # status_dict counts every row: successes under "success", removals under "removed", failures by message
    assert stats["status_dict"]["removed"] == 4 and stats["status_dict"]["success"] == 3
    assert not [m for m in stats["status_dict"] if m.startswith("removed:")]


def test_removals_do_not_make_a_re_download_look_worse(removed: Download) -> None:
    """3/8 images after 7/8 is under half the stored rate, but 3 of the 4 rows still requested came through:
    a removal list is deliberate, not a broken network, so the download was published."""
    assert removed.result.previous_success_rate == pytest.approx(7 / 8)
    assert removed.result.success_rate == pytest.approx(3 / 4)  # over the rows requested: removals are no failures


def test_the_audit_passes(layout: StorageLayout, removed: Download) -> None:
    verdict = audit_image_shard(layout, f"{SHARD:05d}", min_success_rate=0.7)  # 3/4 requested rows: no WARN
    assert verdict.passed, (verdict.errors, verdict.warnings)
    assert verdict.counts["rows"] == 8 and verdict.counts["successes"] == 3 and verdict.counts["removed"] == 4
    assert verdict.counts["success_rate"] == pytest.approx(3 / 4)


def test_the_audit_catches_a_removed_image_left_in_the_tar(
    layout: StorageLayout, removed: Download, tmp_path: Path
) -> None:
    copy = StorageLayout(str(tmp_path / "copy"))
    shutil.copytree(layout.root, copy.root)
    status = pq.read_table(copy.image_status(SHARD))
    success = next(k for k, row in removed.status.items() if row["status"] == "success")
    flipped = [
        "removed" if k == success else st
        for k, st in zip(status["key"].to_pylist(), status["status"].to_pylist(), strict=True)
    ]
    pq.write_table(
        status.set_column(status.schema.get_field_index("status"), "status", pa.array(flipped)),
        copy.image_status(SHARD),
    )
    stats = dict(removed.stats, successes=2, removed=5)
    Path(copy.image_stats(SHARD)).write_text(json.dumps(stats))
    verdict = audit_image_shard(copy, f"{SHARD:05d}")
    assert [(p.reason, p.detail) for p in verdict.errors] == [
        ("removed item in tar", f"1 removed item(s) still in the tar, first {success}")
    ]
    Path(copy.image_stats(SHARD)).write_text(json.dumps(dict(stats, removed=4)))
    assert "stats disagree" in [p.reason for p in audit_image_shard(copy, f"{SHARD:05d}").errors]


def test_a_shard_whose_rows_are_all_listed_requests_nothing(server: ImageServer, tmp_path: Path) -> None:
    rows = laion_table([server.url(p) for p in PATHS[:3]])
    before = len(server.hits)
    result = download_shard(
        rows,
        SHARD,
        str(tmp_path),
        samples_per_shard=SAMPLES,
        options=OPTIONS,
        removed_rows=dict.fromkeys(range(3), "x"),
    )
    assert server.hits[before:] == []
    assert (result.count, result.successes, result.removed, result.removed_by_reason) == (3, 0, 3, {"x": 3})
    table = pq.read_table(result.parquet_path)
    assert table["key"].to_pylist() == [key(i) for i in range(3)]
    assert set(table["status"].to_pylist()) == {"removed"}
    assert tar_images(result.tar_path) == {}


def test_a_listed_row_without_a_reason_still_says_removed(server: ImageServer, tmp_path: Path) -> None:
    rows = laion_table([server.url(p) for p in PATHS[:2]])
    result = download_shard(
        rows, SHARD, str(tmp_path), samples_per_shard=SAMPLES, options=OPTIONS, removed_rows={0: ""}
    )
    row = pq.read_table(result.parquet_path).to_pylist()[0]
    assert (row["status"], row["failure_reason"]) == ("removed", "removed")
    assert result.successes == 1 and result.removed_by_reason == {"removed": 1}


@pytest.mark.parametrize(
    ("removals", "error", "match"),
    [
        ({"removed_rows": {8: "x"}}, ValueError, r"row 8 is not a row of this shard \(0 … 7\)"),
        ({"removed_rows": {-1: "x"}}, ValueError, "row -1 is not a row"),
        ({"removed_rows": {"3": "x"}}, TypeError, "row indices"),
        ({"removed_hashes": {"abc": "x"}}, ValueError, "not a sha256 hex digest"),
        ({"removed_hashes": {"g" * 64: "x"}}, ValueError, "not a sha256 hex digest"),
    ],
)
def test_removal_lists_that_do_not_fit_the_shard_are_refused(
    server: ImageServer, tmp_path: Path, removals: dict, error: type[Exception], match: str
) -> None:
    rows = laion_table([server.url(p) for p in PATHS])
    before = len(server.hits)
    with pytest.raises(error, match=match):
        download_shard(rows, SHARD, str(tmp_path), samples_per_shard=SAMPLES, options=OPTIONS, **removals)
    assert server.hits[before:] == [] and list(tmp_path.iterdir()) == []


def test_jpeg_hash_of_the_plain_download_matches_its_tar(plain: Download) -> None:
    """The stored-JPEG hash the removal list uses is the one the tar's bytes hash to."""
    for k, data in plain.images.items():
        assert hashlib.sha256(data).hexdigest() == plain.status[k]["jpg_sha256"]
        assert io.BytesIO(data).read(2) == b"\xff\xd8"


def test_a_re_download_that_removes_every_row_is_not_refused(server: ImageServer, tmp_path: Path) -> None:
    """Nothing requested says nothing about the network: a shard whose rows are all listed is published over
    a stored good shard without `replace_worse`."""
    layout = StorageLayout(str(tmp_path))
    Path(layout.metadata_shard(SHARD)).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(laion_table([server.url(p) for p in PATHS[:2]]), layout.metadata_shard(SHARD))
    assert download_image_shard(layout, SHARD, SAMPLES, OPTIONS).successes == 2
    result = download_image_shard(layout, SHARD, SAMPLES, OPTIONS, removed_rows={0: "a", 1: "b"})
    assert (result.successes, result.removed, result.previous_success_rate) == (0, 2, 1.0)
    assert audit_image_shard(layout, f"{SHARD:05d}").passed
