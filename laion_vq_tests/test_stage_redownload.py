"""Re-downloading a shard never loses a good one: a much worse re-download is refused and the stored
files stay byte for byte; a download killed with SIGKILL leaves no partial file on storage, and a re-run
gives a complete shard. Real img2dataset, real loopback servers, real files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laion_vq.download import DownloadOptions
from laion_vq.shards.storage import StorageLayout
from laion_vq.stages import (
    SCRATCH_PREFIX,
    ImageShardResult,
    WorseDownloadError,
    download_image_shard,
    refuse_worse_download,
    remove_stale_scratch,
)
from laion_vq.testing.hostile_server import HostileServer
from laion_vq.testing.image_server import ImageServer
from laion_vq.testing.synthetic_metadata import laion_table

SAMPLES = 100
FAST = DownloadOptions(timeout=2, thread_count=8)
PHOTOS = ImageServer.photo_paths()


def _layout_with_metadata(root: Path, urls: list[str], shard: int = 0) -> StorageLayout:
    layout = StorageLayout(str(root))
    os.makedirs(os.path.dirname(layout.metadata_shard(shard)), exist_ok=True)
    pq.write_table(laion_table(urls), layout.metadata_shard(shard))
    return layout


def _files(layout: StorageLayout, shard: int = 0) -> dict[str, bytes]:
    paths = (layout.image_tar(shard), layout.image_status(shard), layout.image_stats(shard))
    return {p: Path(p).read_bytes() for p in paths if Path(p).exists()}


def test_a_download_while_the_image_server_is_down_keeps_the_stored_shard(tmp_path: Path) -> None:
    server = ImageServer().start()
    urls = [server.url(p) for p in PHOTOS] + [server.url("/missing/0.jpg")]
    layout = _layout_with_metadata(tmp_path, urls)
    first = download_image_shard(layout, 0, SAMPLES, FAST)
    assert first.successes == len(PHOTOS) and first.previous_success_rate is None
    stored = _files(layout)
    server.stop()  # the operator re-materializes while the image host is down

    with pytest.raises(WorseDownloadError) as refused:
        download_image_shard(layout, 0, SAMPLES, FAST)
    message = str(refused.value)
    assert f"got 0/{len(urls)} images (0%)" in message and f"has {first.successes}/{len(urls)}" in message
    assert "connection refused" in message and "stored shard is kept" in message
    assert "LAION_VQ_DOWNLOAD_REPLACE_WORSE=1" in message
    assert _files(layout) == stored  # byte for byte

    forced = download_image_shard(layout, 0, SAMPLES, FAST, replace_worse=True)
    assert forced.successes == 0 and forced.previous_success_rate == pytest.approx(first.success_rate)
    assert _files(layout) != stored


def _result(successes: int, rows: int = 100) -> ImageShardResult:
    return ImageShardResult(
        shard_id=0,
        tar_path="",
        status_path="",
        stats_path="",
        rows=rows,
        successes=successes,
        failed_to_download=rows - successes,
        failed_to_resize=0,
        failures_by_reason={"timeout": rows - successes},
        bytes_tar=0,
        seconds=0.0,
    )


@pytest.mark.parametrize(
    ("previous", "now", "refused"),
    [
        (None, 0, False),  # a first download has nothing to protect
        ((0, 100), 0, False),  # nor does an empty stored shard
        ((90, 100), 0, True),  # 0 % after 90 %
        ((90, 100), 44, True),  # below half the stored rate
        ((90, 100), 45, False),  # exactly half: the web does lose images
        ((90, 100), 95, False),  # better
        ((1, 100), 0, True),  # any images → none
    ],
)
def test_which_re_downloads_are_refused(previous: tuple[int, int] | None, now: int, refused: bool) -> None:
    if refused:
        with pytest.raises(WorseDownloadError, match=r"timeout ×"):
            refuse_worse_download(0, previous, _result(now), min_rate_ratio=0.5)
    else:
        refuse_worse_download(0, previous, _result(now), min_rate_ratio=0.5)


_KILLABLE = textwrap.dedent(
    """
    import sys
    from laion_vq.download import DownloadOptions
    from laion_vq.shards.storage import StorageLayout
    from laion_vq.stages import download_image_shard

    print("downloading", flush=True)
    download_image_shard(StorageLayout(sys.argv[1]), 0, 100, DownloadOptions(timeout=5, deadline=60, thread_count=4))
    print("finished", flush=True)
    """
)


def _kill_mid_shard(layout: StorageLayout, scratch_root: Path) -> None:
    """Start a download of shard 0 in a child process and SIGKILL it once img2dataset is writing."""
    env = {**os.environ, "TMPDIR": str(scratch_root)}
    child = subprocess.Popen([sys.executable, "-c", _KILLABLE, layout.root], env=env, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(p.suffix == ".tar" for p in scratch_root.glob(f"{SCRATCH_PREFIX}*/*")):
            assert child.poll() is None, "the download ended before it could be killed"
            assert time.monotonic() < deadline, "the download never started writing its tar"
            time.sleep(0.05)
        time.sleep(0.5)  # the fast images are in the tar, the dripping ones still downloading
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def _storage_files(layout: StorageLayout) -> list[str]:
    return sorted(p.name for p in Path(layout.images_dir()).glob("*")) if Path(layout.images_dir()).exists() else []


def test_sigkill_mid_shard_leaves_nothing_partial_and_a_rerun_completes(tmp_path: Path) -> None:
    with HostileServer(drip_interval_s=0.5) as web:
        photos = [web.url(p) for p in HostileServer.images()]
        urls = photos + [web.url("/drip.jpg")] * 3
        layout = _layout_with_metadata(tmp_path / "data", urls)
        scratch_root = tmp_path / "scratch"
        scratch_root.mkdir()

        _kill_mid_shard(layout, scratch_root)
        assert _storage_files(layout) == []  # nothing published, not even a temp file
        assert len(list(scratch_root.glob(f"{SCRATCH_PREFIX}*"))) == 1  # the dead process's scratch …
        assert remove_stale_scratch(str(scratch_root))  # … is found by the next download and removed
        assert list(scratch_root.glob(f"{SCRATCH_PREFIX}*")) == []

        # the re-run (drip URLs now cut off by a short deadline) gives a complete, consistent shard
        result = download_image_shard(layout, 0, SAMPLES, DownloadOptions(timeout=2, deadline=1, thread_count=8))
        assert result.rows == len(urls) and result.successes == len(photos)
        assert result.failures_by_reason == {"deadline": 3}
        assert _storage_files(layout) == ["00000.parquet", "00000.tar", "00000_stats.json"]

        # killed again while re-downloading over a good shard: the good shard stays as it was
        stored = _files(layout)
        _kill_mid_shard(layout, scratch_root)
        assert _files(layout) == stored
        assert _storage_files(layout) == ["00000.parquet", "00000.tar", "00000_stats.json"]
