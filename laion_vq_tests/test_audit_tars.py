"""The image-tar audit reads every tar to the end against its status parquet: a tar truncated to half its
size, a flipped byte inside a stored JPEG and a status parquet that disagrees are each caught on their
own shard, and the intact shard beside them passes. Real downloads from the loopback server."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_vq.audit import audit_image_shard
from laion_vq.download import DownloadOptions
from laion_vq.shards.storage import StorageLayout
from laion_vq.stages import download_image_shard
from laion_vq.testing.image_server import ImageServer
from laion_vq.testing.synthetic_metadata import laion_table

SHARDS = 4


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, image_server: ImageServer) -> StorageLayout:
    """Four identical-looking downloaded shards (7 photos + a 404 each)."""
    layout = StorageLayout(str(tmp_path_factory.mktemp("audit")))
    urls = [image_server.url(p) for p in ImageServer.photo_paths()[:7]] + [image_server.url("/missing/x.jpg")]
    for shard in range(SHARDS):
        os.makedirs(os.path.dirname(layout.metadata_shard(shard)), exist_ok=True)
        pq.write_table(laion_table(urls), layout.metadata_shard(shard))
        download_image_shard(layout, shard, 10, DownloadOptions(timeout=2, thread_count=8))
    return layout


def _first_jpeg(tar_path: str) -> tuple[str, int, int]:
    """(key, offset of its data in the tar, size) of the first stored JPEG."""
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        return member.name[:-4], member.offset_data, member.size


def _audit(layout: StorageLayout) -> dict[str, list[str]]:
    """{shard: [problem details]} for every shard with an ERROR."""
    verdicts = [audit_image_shard(layout, f"{shard:05d}", min_success_rate=0.3) for shard in range(SHARDS)]
    return {v.shard: [p.detail for p in v.errors] for v in verdicts if v.errors}


def test_intact_shards_pass(layout: StorageLayout) -> None:
    verdicts = [audit_image_shard(layout, f"{shard:05d}", min_success_rate=0.3) for shard in range(SHARDS)]
    assert all(v.passed for v in verdicts)
    assert [v.counts["rows"] for v in verdicts] == [8] * SHARDS


def test_each_defect_is_caught_on_its_own_shard(layout: StorageLayout) -> None:
    # shard 1: the tar truncated to half its size
    tar1 = Path(layout.image_tar(1))
    # not at a 512-byte boundary: a cut exactly between two members reads as a shorter, well-formed tar
    tar1.write_bytes(tar1.read_bytes()[: tar1.stat().st_size // 2 + 100])
    # shard 2: one byte flipped inside a stored JPEG (the tar itself stays well-formed)
    key, offset, size = _first_jpeg(layout.image_tar(2))
    data = bytearray(Path(layout.image_tar(2)).read_bytes())
    data[offset + size // 2] ^= 0xFF
    Path(layout.image_tar(2)).write_bytes(bytes(data))
    # shard 3: the status parquet says one of the tar's images failed
    status = pq.read_table(layout.image_status(3))
    statuses = status.column("status").to_pylist()
    flipped = statuses.index("success")
    statuses[flipped] = "failed_to_download"
    status = status.set_column(status.column_names.index("status"), "status", pa.array(statuses))
    pq.write_table(status, layout.image_status(3))

    corrupted = _audit(layout)
    assert sorted(corrupted) == ["00001", "00002", "00003"]
    assert corrupted["00001"][0].startswith("tar unreadable:")
    assert corrupted["00002"] == [f"1 image(s) whose bytes differ from the sha256 recorded at download, first {key}"]
    assert f"1 tar sample(s) without a success row, first {status.column('key')[flipped]}" in corrupted["00003"]
